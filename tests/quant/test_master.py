"""The master-weight encoding and stochastic rounding of ``quant.master``, at every edge."""

from __future__ import annotations

import pytest
import torch

from qoptim.quant import master as M

HALF = [torch.bfloat16, torch.float16]


def spread(n: int, low: int, high: int, seed: int = 0) -> torch.Tensor:
    """Random fp32 values of both signs over binades 2**low .. 2**high, plus the edges."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(low, high, (n,), generator=gen).float())
    edges = [0.0, -0.0, 1.0, -1.0, 1.5, 2.0**-126, 2.0**-149, -(2.0**-149), 2.0**-14, 2.0**-24, 2.0**-25, 65504.0, 65519.0,
             65520.0, 3.3895e38, 3.4028235e38, -3.4028235e38]  # fmt: skip
    return torch.cat([x, torch.tensor(edges)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def half_away(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to ``dtype`` by nearest, ties away from zero, written independently of the module:
    the candidate below and above by value, the nearer, on a tie the larger magnitude."""
    nearest = x.to(dtype)
    step = torch.where(nearest.float().abs() > x.abs(), -1, 1)  # pattern -1 / +1: toward / away from zero
    other = (nearest.view(torch.int16).to(torch.int32) + step).to(torch.int16)
    other = torch.where(nearest.float() == x, nearest.view(torch.int16), other).view(dtype)
    d_near, d_other = (nearest.float() - x).abs(), (other.float() - x).abs()
    pick_other = (d_other < d_near) | ((d_other == d_near) & (other.float().abs() > nearest.float().abs()))
    return torch.where(pick_other, other, nearest)


def test_bf16_32_bits_is_the_fp32_master_bit_for_bit():
    x = spread(200_000, -140, 127)
    x = torch.cat([x, torch.tensor([float("inf"), -float("inf")])])
    w, c = M.encode(x, torch.bfloat16, 32)
    assert c.dtype == torch.int16 and w.dtype == torch.bfloat16
    assert same_bits(M.decode(w, c), x)
    # the weight is the master rounded to nearest, ties away from zero
    finite = x.abs() < 3.3e38
    assert torch.equal(w[finite].view(torch.int16), half_away(x[finite], torch.bfloat16).view(torch.int16))


def test_bf16_24_bits_is_fp32_rounded_to_24_bits():
    x = spread(200_000, -120, 120)
    w, c = M.encode(x, torch.bfloat16, 24)
    assert c.dtype == torch.int8
    got = M.decode(w, c)
    pattern = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (((pattern + 0x80) >> 8) << 8) & 0xFFFFFFFF
    expected = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded).to(torch.int32).view(torch.float32)
    assert same_bits(got, expected)
    normal = (x.abs() > 2.0**-126) & (x.abs() < 3e38)
    assert float(((got - x).abs() / x.abs())[normal].max()) <= 2.0**-16
    assert torch.equal(w.view(torch.int16), half_away(got, torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("bits", [24, 32])
def test_fp16_master_precision(bits):
    x = spread(200_000, -40, 16)
    x = x[x.abs() < 65504]
    w, c = M.encode(x, torch.float16, bits)
    got = M.decode(w, c)
    normal = x.abs() >= 2.0**-14
    if bits == 32:  # fp16's normal range: the fp32 master itself
        assert same_bits(got[normal], x[normal])
        assert float((got - x)[~normal].abs().max()) <= 2.0**-38
    else:
        assert float(((got - x).abs() / x.abs())[normal].max()) <= 2.0**-18
        assert float((got - x)[~normal].abs().max()) <= 2.0**-32
    limit = torch.iinfo(c.dtype)
    assert int(c.abs().max()) <= (1 << M.FP16_UNIT_SHIFT[bits]) - 2 < limit.max
    assert torch.equal(w.view(torch.int16), half_away(got, torch.float16).view(torch.int16))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits", [24, 32])
def test_decode_then_encode_gives_back_the_pair(dtype, bits):
    """A master a step leaves unchanged keeps its weight and correction (also at ties and signed zeros)."""
    x = spread(100_000, -40 if dtype == torch.float16 else -140, 16 if dtype == torch.float16 else 127)
    x = torch.cat([x, -x, torch.tensor([-1e-10, 1e-12, -2.0**-40])])
    w, c = M.encode(x, dtype, bits)
    w2, c2 = M.encode(M.decode(w, c), dtype, bits)
    assert torch.equal(w2.view(torch.int16), w.view(torch.int16)) and torch.equal(c2, c)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits", [24, 32])
def test_specials(dtype, bits):
    big = 3.4e38 if dtype == torch.bfloat16 else 70000.0
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), big, -big])
    payloads = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FBFFFFF], dtype=torch.int32).view(torch.float32)  # NaNs whose rounding carries
    wn, cn = M.encode(payloads, dtype, bits)
    assert torch.isnan(wn).all() and not cn.any() and torch.equal(torch.signbit(wn), torch.signbit(payloads))
    w, c = M.encode(x, dtype, bits)
    got = M.decode(w, c)
    assert same_bits(got[:4], x[:4])  # signed zeros and infinities exactly
    assert torch.isnan(w[4:6]).all() and torch.isnan(got[4:6]).all() and (c[4:6] == 0).all()
    if dtype == torch.float16:  # past fp16's range: inf, like the cast
        assert torch.equal(w[6:], torch.tensor([float("inf"), -float("inf")], dtype=dtype)) and (c[6:] == 0).all()
    else:  # bf16: the weight is inf; at 32 bits the pair keeps the finite master
        assert torch.isinf(w[6:]).all()
        if bits == 32:
            assert same_bits(got[6:], x[6:])
        else:
            assert torch.isfinite(got[6:]).all() and float(((got[6:] - x[6:]) / x[6:]).abs().max()) <= 2.0**-16


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits", [24, 32])
def test_a_master_walking_across_binades_and_zero(dtype, bits):
    """Step by step from 2.5 down through 2, 1, 0.5, ..., zero, to -2.5: each master encodes on its
    own, whatever the exponent of the step before (the pair keeps no exponent of its own)."""
    path = torch.linspace(2.5, -2.5, 20_001)
    path = torch.cat([path, torch.tensor([2.0, 2.0 - 2.0**-20, 1.0, 1.0 - 2.0**-24, 2.0**-14, 2.0**-14 - 2.0**-30, 0.0, -0.0])])
    w, c = M.encode(path, dtype, bits)
    got = M.decode(w, c)
    if bits == 32 and (dtype == torch.bfloat16):
        assert same_bits(got, path)
    elif bits == 32:
        normal = path.abs() >= 2.0**-14
        assert same_bits(got[normal], path[normal])
    else:
        assert float(((got - path).abs() / path.abs().clamp(min=2.0**-14)).max()) <= 2.0**-15
    assert torch.equal(torch.signbit(got), torch.signbit(path))


def test_exact_weights_have_zero_correction():
    for dtype in HALF:
        w = torch.randn(10_000).to(dtype)
        for bits in (24, 32):
            w2, c = M.encode(w.float(), dtype, bits)
            assert torch.equal(w2.view(torch.int16), w.view(torch.int16)) and not c.any()


def test_bad_formats_are_named():
    with pytest.raises(M.FormatError, match="24 or 32"):
        M.encode(torch.zeros(3), torch.bfloat16, 16)
    with pytest.raises(M.FormatError, match="bfloat16 or float16"):
        M.encode(torch.zeros(3), torch.float32, 24)
    with pytest.raises(M.FormatError, match="int8 or int16"):
        M.decode(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int32))


# ---- stochastic rounding --------------------------------------------------------------------


def python_lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_on_tensors_is_the_integer_hash():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    got = M.lowbias32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [python_lowbias32(v) for v in values]
    assert M.step_key(7, 3) == python_lowbias32(python_lowbias32(7) ^ 3)


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    x = spread(400_000, -20, 10, seed=3)
    x = x[x.abs() < 60000]
    r = M.stochastic_round(x, dtype, M.Draw(M.step_key(11, 1)))
    nearest = x.to(dtype)
    step = torch.where(nearest.float().abs() > x.abs(), -1, 1)
    other = (nearest.view(torch.int16).to(torch.int32) + step).to(torch.int16).view(dtype)
    low = torch.minimum(nearest.float(), other.float())
    high = torch.maximum(nearest.float(), other.float())
    exact = nearest.float() == x
    assert ((r.float() >= low) & (r.float() <= high) | exact).all()
    assert torch.equal(r[exact], nearest[exact])
    # unbiased: many draws of one value average to it
    one = torch.full((200_000,), 1.0 + 0.3 * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10))
    mean = M.stochastic_round(one, dtype, M.Draw(M.step_key(5, 9))).double().mean()
    assert abs(float(mean) - float(one[0])) < 3e-2 * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10)


@pytest.mark.parametrize("dtype", HALF)
def test_draws_are_keyed_on_seed_step_and_index(dtype):
    x = torch.full((50_000,), 1.0 + 0.5 * (2.0**-7 if dtype == torch.bfloat16 else 2.0**-10))
    a = M.stochastic_round(x, dtype, M.Draw(M.step_key(1, 1)))
    assert torch.equal(a, M.stochastic_round(x, dtype, M.Draw(M.step_key(1, 1))))
    assert not torch.equal(a, M.stochastic_round(x, dtype, M.Draw(M.step_key(1, 2))))
    assert not torch.equal(a, M.stochastic_round(x, dtype, M.Draw(M.step_key(2, 1))))
    # a slice with its first index draws what the whole tensor drew there (shards agree with the whole)
    tail = M.stochastic_round(x[1234:], dtype, M.Draw(M.step_key(1, 1), first_index=1234))
    assert torch.equal(tail, a[1234:])


@pytest.mark.parametrize("dtype", HALF)
def test_stochastic_rounding_specials(dtype):
    top = 3.3961e38 if dtype == torch.bfloat16 else 65504.0 + 8.0  # between the largest finite value and the next
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")] + [top] * 2000)
    r = M.stochastic_round(x, dtype, M.Draw(M.step_key(3, 4)))
    assert same_bits(r[:4].float(), x[:4]) and torch.isnan(r[4])
    tail = r[5:].float()
    assert (torch.isinf(tail) | (tail == x[5:].to(dtype).float()) | (tail < x[5])).all()
    assert torch.isinf(tail).any() and torch.isfinite(tail).any()  # it can round to inf, as nearest rounding can
