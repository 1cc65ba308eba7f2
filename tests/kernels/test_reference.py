"""The reference backend's own invariants: chunking is invisible, the registry picks it when asked."""

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
