"""Block-wise quantization against its definition: nearest codes, bounded error, exact zeros."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qoptim.functional as F
from qoptim.quant.blockwise import BLOCK, dequantize_flat, quantize_with_absmax
from qoptim.quant.maps import signed_map, unsigned_map

SIZES = [1, 255, 256, 257, 4097]


def _brute_force_nearest(u: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (u[:, None].double() - code[None, :].double()).abs()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_code(n, signed):
    code = signed_map() if signed else unsigned_map()
    x = torch.randn(n) * torch.logspace(-8, 0, n)  # magnitudes over eight decades
    x = x if signed else x.abs()
    q, qs = F.quantize_blockwise(x, code=code, blocksize=256)
    assert q.dtype == torch.uint8 and q.shape == x.shape and qs.absmax.shape == (-(-n // 256),)
    scale = qs.absmax.repeat_interleave(256)[:n]
    u = x * torch.where(scale > 0, 1 / scale, 0)
    distance = _brute_force_nearest(u, code)
    chosen = distance.gather(1, q.long()[:, None])[:, 0]
    # the chosen code is as near as any (the float32 midpoint can only break exact ties)
    assert bool((chosen <= distance.min(dim=1).values + 1e-7).all())


@pytest.mark.parametrize("n", SIZES)
def test_round_trip_error_is_within_half_a_code_gap(n):
    x = torch.randn(n)
    q, qs = F.quantize_blockwise(x, blocksize=256)
    back = F.dequantize_blockwise(q, qs)
    code = signed_map()
    # widest gap is in the top decade; -1 itself is as far from the lowest code (-0.99297)
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    scale = qs.absmax.repeat_interleave(256)[:n]
    assert bool(((back - x).abs() <= (half_gap + 1e-6) * scale).all())  # 1e-6: float32 rounding


def test_zero_stays_exactly_zero():
    x = torch.randn(1000)
    x[::3] = 0
    x[256:512] = 0  # an all-zero block
    for code, zero_index in [(signed_map(), 127), (unsigned_map(), 0)]:
        y = x if code is signed_map() else x.abs()
        q, qs = F.quantize_blockwise(y, code=code)
        assert bool((q[y == 0] == zero_index).all())
        assert bool((F.dequantize_blockwise(q, qs)[y == 0] == 0).all())
        assert qs.absmax[1] == 0


def test_huge_and_tiny_values():
    x = torch.tensor([3e38, -1e-38, 1e-45, 0.0, -3e38] + [1.0] * 300)
    q, qs = F.quantize_blockwise(x)
    back = F.dequantize_blockwise(q, qs)
    assert torch.isfinite(back).all()
    assert back[0] == pytest.approx(3e38, rel=1e-6)
    assert back[4] == pytest.approx(-3e38 * 0.992968738, rel=1e-6)


def test_blocksize_and_buffers_are_validated():
    x = torch.randn(300)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        F.quantize_blockwise(x, blocksize=100)
    with pytest.raises(ValueError, match="code must be"):
        F.quantize_blockwise(x, code=torch.zeros(255))
    with pytest.raises(ValueError, match="absmax must be"):
        F.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8), absmax=torch.ones(1), blocksize=256)
    with pytest.raises(ValueError, match="out must be"):
        F.quantize_blockwise(x, out=torch.zeros(299, dtype=torch.uint8))


def test_output_buffers_are_filled():
    x = torch.randn(600)
    out, absmax = torch.empty(600, dtype=torch.uint8), torch.empty(3)
    q, qs = F.quantize_blockwise(x, absmax=absmax, out=out)
    assert q.data_ptr() == out.data_ptr() and qs.absmax.data_ptr() == absmax.data_ptr()
    expected, _ = F.quantize_blockwise(x)
    assert torch.equal(out, expected)


def test_other_blocksizes_and_dtypes():
    x = torch.randn(5000, dtype=torch.bfloat16)
    q, qs = F.quantize_blockwise(x, blocksize=4096)
    assert qs.absmax.shape == (2,) and qs.dtype == torch.bfloat16
    back = F.dequantize_blockwise(q, qs)
    assert back.dtype == torch.bfloat16
    assert torch.allclose(back.float(), x.float(), atol=0.02 * x.abs().max().item())


# ---- properties ---------------------------------------------------------------------------

finite = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, allow_subnormal=False, width=32)
sizes = st.sampled_from([1, 2, 255, 256, 257, 511, 1000, 4097])


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=st.integers(0, 2**31 - 1), scale_exp=st.integers(-30, 30), signed=st.booleans())
def test_property_round_trip_bound_and_zeros(n, seed, scale_exp, signed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0**scale_exp
    x[torch.rand(n, generator=g) < 0.2] = 0
    code = signed_map() if signed else unsigned_map()
    x = x if signed else x.abs()
    q, qs = F.quantize_blockwise(x, code=code)
    back = F.dequantize_blockwise(q, qs)
    scale = qs.absmax.repeat_interleave(256)[:n]
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    assert bool(((back - x).abs() <= (half_gap + 1e-6) * scale + 1e-45).all())
    assert bool((back[x == 0] == 0).all())


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=300), signed=st.booleans())
def test_property_monotone_within_a_block(values, signed):
    x = torch.tensor(sorted(values), dtype=torch.float32)
    code = signed_map() if signed else unsigned_map()
    x = x if signed else x.abs().sort().values
    absmax = x.abs().max().reshape(1)
    q = quantize_with_absmax(x, absmax, code, 256 if x.numel() <= 256 else 4096)
    assert bool((q[1:] >= q[:-1]).all())


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=st.integers(0, 2**31 - 1), signed=st.booleans())
def test_property_requantizing_dequantized_values_is_idempotent(n, seed, signed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    code = signed_map() if signed else unsigned_map()
    x = x if signed else x.abs()
    q, qs = F.quantize_blockwise(x, code=code)
    again = quantize_with_absmax(dequantize_flat(q, qs.absmax, code, 256), qs.absmax, code, 256)
    assert torch.equal(again, q)


def test_block_is_the_default_blocksize():
    assert BLOCK == 256
    _, qs = F.quantize_blockwise(torch.randn(1000))
    assert qs.blocksize == BLOCK and qs.absmax.shape == (-(-1000 // BLOCK),)
