"""The reference backend's own invariants: chunking is invisible, the registry picks it when asked,
its square root is correctly rounded."""

import numpy as np
import pytest
import torch

from qoptim import kernels
from qoptim.kernels import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, reference
from qoptim.quant.maps import signed_map, unsigned_map


def _slots(n, layout):
    if layout == "fp32":
        return [StateSlot(torch.zeros(n)), StateSlot(torch.zeros(n))]
    blocks = 1 if layout == "per-tensor" else -(-n // BLOCK)
    size = WHOLE_TENSOR if layout == "per-tensor" else BLOCK
    return [
        StateSlot(torch.zeros(n, dtype=torch.uint8).fill_(127), signed_map(), torch.zeros(blocks), size),
        StateSlot(torch.zeros(n, dtype=torch.uint8), unsigned_map(), torch.zeros(blocks), size),
    ]


@pytest.mark.parametrize("layout", ["blockwise", "per-tensor", "fp32"])
def test_chunk_size_does_not_change_results(layout, monkeypatch):
    n = 5 * 1024 + 77
    p0 = torch.randn(n)
    grads = [torch.randn(n) * 0.01 for _ in range(4)]
    grads[2][700] = float("nan")
    results = []
    for chunk in (reference.CHUNK, 1024):
        monkeypatch.setattr(reference, "CHUNK", chunk)
        p, slots = p0.clone(), _slots(n, layout)
        for step, g in enumerate(grads, start=1):
            hp = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step, decoupled=True)
            skipped = reference.update("adam", p, g, slots, hp).skipped_blocks
        results.append((p, slots, skipped))
    (p_a, slots_a, skipped_a), (p_b, slots_b, skipped_b) = results
    assert torch.equal(p_a, p_b) and skipped_a == skipped_b == 0  # the last step had no NaN
    for a, b in zip(slots_a, slots_b):
        assert torch.equal(a.values, b.values)
        if a.absmax is not None:
            assert torch.equal(a.absmax, b.absmax)


@pytest.fixture
def fake_fused_backend():
    """A fused backend registered for the meta device whose module cannot be imported."""
    kernels.register("meta", "nowhere.to.be.found")
    yield torch.device("meta")
    kernels.unregister("meta")


def test_reference_can_be_forced(monkeypatch, fake_fused_backend):
    monkeypatch.setenv("QOPTIM_BACKEND", "reference")
    assert kernels.backend_for(fake_fused_backend) is reference
    monkeypatch.setenv("QOPTIM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="QOPTIM_BACKEND must be"):
        kernels.backend_for(fake_fused_backend)


def test_a_missing_fused_backend_falls_back_with_a_warning(monkeypatch, fake_fused_backend):
    monkeypatch.delenv("QOPTIM_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="using the slower reference backend"):
        assert kernels.backend_for(fake_fused_backend) is reference


def test_grad_norm_sq():
    g = torch.randn(3 * reference.CHUNK + 5)
    assert reference.grad_norm_sq(g) == pytest.approx(float((g.double() ** 2).sum()), rel=1e-5)


# float32 bit patterns: zeros, the smallest and largest subnormals, the smallest normal, 1, 4, the
# largest finite, inf, a quiet NaN; negative: -1, the smallest subnormal, -inf
SQRT_EDGES = [0, 0x80000000, 1, 2, 0x7FFFFF, 0x800000, 0x3F800000, 0x40800000, 0x7F7FFFFF, 0x7F800000, 0x7FC00000,
              0xBF800000, 0x80000001, 0xFF800000]  # fmt: skip


def test_sqrt_of_float32_is_correctly_rounded():
    """On CPU float32 (where torch's own sqrt can be one ulp off): float64's root rounded to float32,
    bit for bit, and within the midpoints to its neighbours; random bit patterns (every exponent,
    subnormals, negatives, inf and NaN) and [0, 1)."""
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), generator=gen).to(torch.int32).view(torch.float32)
    edges = torch.from_numpy(np.array(SQRT_EDGES, dtype=np.uint32).view(np.float32))
    x = torch.cat([edges, random_bits, torch.rand(1 << 18, generator=gen)])
    before = x.clone()
    got = reference.sqrt(x)
    assert got.dtype == torch.float32 and torch.equal(x.view(torch.int32), before.view(torch.int32))
    expected = x.double().sqrt().float()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan) and bool(nan[x < 0].all()) and not bool(nan[x >= 0].any())
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    assert got[1].item() == 0.0 and torch.signbit(got[1]) and got[6].item() == 1.0 and got[7].item() == 2.0
    # correctly rounded: x lies between the squares of the midpoints to the root's neighbours (exact in float64)
    inside = (x > 0) & x.isfinite()
    root = got[inside]
    lower = (root.double() + torch.nextafter(root, torch.zeros_like(root)).double()) / 2
    upper = (root.double() + torch.nextafter(root, torch.full_like(root, float("inf"))).double()) / 2
    assert bool(((lower * lower <= x[inside].double()) & (x[inside].double() <= upper * upper)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_sqrt_of_other_dtypes_is_torchs(dtype):
    """Other dtypes take torch's own sqrt, bit for bit, in their dtype."""
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.tensor([0.0, -0.0, 1.0, float("inf"), float("nan"), -1.0]), torch.randn(4096, generator=gen) * 10])
    x = x.to(dtype)
    got = reference.sqrt(x)
    assert got.dtype == dtype
    bits = torch.int16 if dtype.itemsize == 2 else torch.int64
    assert torch.equal(got.view(bits), x.sqrt().view(bits))
