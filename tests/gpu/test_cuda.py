"""The CUDA backend on a real GPU: Triton kernels against the reference on the same device, and
paged states in CUDA managed memory. Skipped without CUDA."""

from __future__ import annotations

import gc
import io
import math

import pytest
import torch

import qoptim
from qoptim import kernels, paging, paging_cuda
from qoptim.kernels import reference
from qoptim.kernels.types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot
from qoptim.quant.maps import signed_map, unsigned_map

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    from qoptim.kernels import triton as tk

    assert not tk.INTERPRETED, "TRITON_INTERPRET is set: these tests need compiled kernels"
    return tk


def test_cuda_tensors_use_the_triton_backend(triton_backend):
    assert kernels.backend_for(CUDA) is triton_backend


# ---- kernels against the reference, on the GPU --------------------------------------------


def _fresh(n, layout, dtype):
    p = (torch.randn(n, device=CUDA) * 0.1).to(dtype)
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n, device=CUDA)), StateSlot(torch.zeros(n, device=CUDA))]
    blocksize = BLOCK if layout == "blockwise" else WHOLE_TENSOR
    scales = math.ceil(n / BLOCK) if layout == "blockwise" else 1
    zero = int(torch.searchsorted(signed_map(), torch.tensor(0.0)))
    signed, unsigned = signed_map(CUDA), unsigned_map(CUDA)
    return p, [
        StateSlot(torch.full((n,), zero, dtype=torch.uint8, device=CUDA), signed, torch.zeros(scales, device=CUDA), blocksize),
        StateSlot(torch.zeros(n, dtype=torch.uint8, device=CUDA), unsigned, torch.zeros(scales, device=CUDA), blocksize),
    ]


def _copy(p, slots):
    cloned = [StateSlot(s.values.clone(), s.code, None if s.absmax is None else s.absmax.clone(), s.blocksize) for s in slots]
    return p.clone(), cloned


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["blockwise", "whole_tensor", "fp32"])
def test_kernel_matches_reference_on_device(triton_backend, layout, dtype, decoupled):
    for n in (1, 257, 4097, 1_000_003):
        p_ref, slots_ref = _fresh(n, layout, dtype)
        for step in range(1, 6):
            g = (torch.randn(n, device=CUDA) * 0.01).to(dtype)
            g[(step * 997) % n] = math.nan
            hp = Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step, decoupled=decoupled,
                       gnorm_scale=0.5 if step % 2 else 1.0)  # fmt: skip
            p, slots = _copy(p_ref, slots_ref)
            before = p.clone()
            got = triton_backend.update("adam", p, g, slots, hp, True).skipped_blocks
            assert got == reference.update("adam", p_ref, g, slots_ref, hp, True).skipped_blocks == 1
            # torch on CUDA divides by a Python scalar as a multiply by its reciprocal: ~1 ulp in denom
            bound = 2 * torch.finfo(dtype).eps * (before.float().abs() + torch.maximum(p.float().abs(), p_ref.float().abs()))
            assert bool(((p.float() - p_ref.float()).abs() <= bound).all())
            for s, e in zip(slots, slots_ref):
                if s.quantized:
                    diff = (s.values.int() - e.values.int()).abs()
                    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(2, n // 10_000)
                    torch.testing.assert_close(s.absmax, e.absmax, rtol=1e-6, atol=0)
                else:
                    torch.testing.assert_close(s.values, e.values, rtol=1e-6, atol=1e-12)


# ---- training, Triton against the reference --------------------------------------------


def _train(optimizer_name, backend, monkeypatch, steps=30):
    monkeypatch.setenv("QOPTIM_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(CUDA)
    opt = getattr(qoptim.optim, optimizer_name)(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 512, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "Adam8bit", "AdamW"])
def test_training_matches_reference_backend(triton_backend, monkeypatch, name):
    fused, opt, fused_losses = _train(name, "auto", monkeypatch)
    ref, _, ref_losses = _train(name, "reference", monkeypatch)
    assert fused_losses[-1] < fused_losses[0]
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)
    if name.startswith("Paged"):
        big = opt.state[fused[0].weight]  # 131072 elements: paged
        assert getattr(big["state1"], "is_paged", False) and getattr(big["state2"], "is_paged", False)
        small = opt.state[fused[0].bias]
        assert not getattr(small["state1"], "is_paged", False)


def test_paged_checkpoint_round_trip(triton_backend, monkeypatch):
    model, opt, _ = _train("PagedAdamW8bit", "auto", monkeypatch, steps=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = qoptim.optim.PagedAdamW8bit(model.parameters(), lr=1e-3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(fresh.state[p][key], value), key
    state = fresh.state[model[0].weight]
    assert getattr(state["state1"], "is_paged", False)
    assert state["state1"].data_ptr() != opt.state[model[0].weight]["state1"].data_ptr()  # a buffer of its own


# ---- the managed-memory allocator --------------------------------------------------------


class _CountingRuntime(paging_cuda.CudaRuntime):
    def __init__(self):
        super().__init__()
        self.freed = 0
        self.prefetched = 0

    def free(self, ptr):
        super().free(ptr)
        self.freed += 1

    def prefetch(self, ptr, nbytes, device):
        super().prefetch(ptr, nbytes, device)
        self.prefetched += 1


def test_managed_buffers_are_paged_prefetched_and_freed():
    runtime = _CountingRuntime()
    pager = paging_cuda.ManagedPager(runtime)
    allocated_before = torch.cuda.memory_allocated()
    t = pager.zeros((1024, 1024), torch.float32, CUDA)
    assert t.is_cuda and t.is_paged and t.shape == (1024, 1024) and bool((t == 0).all())
    assert torch.cuda.memory_allocated() == allocated_before  # not from torch's caching allocator
    t += 1
    pager.prefetch([t], CUDA)
    pager.synchronize(CUDA)
    assert runtime.prefetched == (1 if runtime.can_prefetch(CUDA) else 0)
    assert float(t.sum()) == 1024 * 1024
    view = t[0]
    del t
    gc.collect()
    assert runtime.freed == 0  # a view still holds the buffer
    del view
    gc.collect()
    assert runtime.freed == 1


def test_the_registered_cuda_pager_pages_large_states():
    p = torch.nn.Parameter(torch.zeros(paging.PAGED_MIN_NUMEL, device=CUDA))
    assert getattr(paging.state_buffer(p, torch.uint8, True), "is_paged", False)
    assert not getattr(paging.state_buffer(p[:10], torch.uint8, True), "is_paged", False)


def test_paged_states_beyond_free_gpu_memory_still_step(triton_backend):
    """Fill the GPU so that the paged states do not fit next to the parameter: the driver must
    evict them to the host and page them back for each step."""
    n = 1 << 26  # 64M elements: 256 MB fp32 parameter, 256 MB gradient, 2 x 256 MB fp32 states
    p = torch.nn.Parameter(torch.randn(n, device=CUDA) * 0.1)
    p.grad = torch.randn(n, device=CUDA) * 0.01
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    headroom = 64 << 20  # room for the kernels' small buffers, not for the states
    blocker = torch.empty(max(0, free - headroom), dtype=torch.uint8, device=CUDA)
    before = p.detach().cpu()
    try:
        opt = qoptim.optim.PagedAdamW32bit([p], lr=1e-3)
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        assert opt.state[p]["state1"].is_paged and opt.state[p]["state2"].is_paged
    finally:
        del blocker
        torch.cuda.empty_cache()
    after = p.detach().cpu()
    assert bool(torch.isfinite(after).all()) and not torch.equal(after, before)
    assert float(opt.state[p]["state2"].abs().max()) > 0
