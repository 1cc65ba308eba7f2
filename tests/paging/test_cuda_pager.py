"""The paging logic of the CUDA pager (qoptim.paging_cuda), on the CPU with a fake allocator.

The fake stands for cudaMallocManaged / cudaMemPrefetchAsync / cudaFree: it hands out host
memory, records every call, and is registered as the pager of CPU tensors for the duration of a
test, so paged optimizers on CPU parameters go through exactly the code they use on CUDA.
"""

from __future__ import annotations

import gc
import io
import warnings

import numpy as np
import pytest
import torch

import qoptim
from qoptim import paging, paging_cuda
from qoptim.paging import PAGED_MIN_NUMEL

CPU = torch.device("cpu")


class FakeManagedMemory:
    """An Allocator over numpy buffers that records what the pager asks of it."""

    def __init__(self, can_prefetch: bool = True):
        self.live: dict[int, np.ndarray] = {}
        self.allocations = 0
        self.freed: list[int] = []
        self.prefetches: list[tuple[int, int]] = []
        self.syncs = 0
        self._can_prefetch = can_prefetch

    def allocate(self, nbytes: int, device: torch.device) -> int:
        memory = np.full(nbytes, 0xAB, dtype=np.uint8)  # managed memory comes uninitialized
        ptr = memory.ctypes.data
        self.live[ptr] = memory
        self.allocations += 1
        return ptr

    def free(self, ptr: int) -> None:
        del self.live[ptr]
        self.freed.append(ptr)

    def wrap(self, owner, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.asarray(owner))  # the array's base is the owner: it lives as long as the tensor

    def can_prefetch(self, device: torch.device) -> bool:
        return self._can_prefetch

    def prefetch(self, ptr: int, nbytes: int, device: torch.device) -> None:
        assert ptr in self.live or any(start <= ptr < start + len(m) for start, m in self.live.items())
        self.prefetches.append((ptr, nbytes))

    def synchronize(self, device: torch.device) -> None:
        self.syncs += 1


@pytest.fixture
def memory(monkeypatch):
    """A fake managed memory, serving as the pager of CPU tensors."""
    fake = FakeManagedMemory()
    monkeypatch.setitem(paging._pagers, "cpu", paging_cuda.ManagedPager(fake))
    yield fake
    gc.collect()


def _params(big: int = PAGED_MIN_NUMEL, medium: int = 8192, small: int = 100) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(n) * 0.1) for n in (big, medium, small)]


def _step(opt, params, steps: int = 1) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        opt.step()


def _is_paged(t: torch.Tensor) -> bool:
    return getattr(t, "is_paged", False)


def test_pager_zeros_are_zeroed_tagged_and_alias_managed_memory(memory):
    t = paging_cuda.ManagedPager(memory).zeros((3, 50_000), torch.float32, CPU)
    assert t.shape == (3, 50_000) and t.dtype == torch.float32 and _is_paged(t)
    assert bool((t == 0).all())
    (ptr,) = memory.live
    assert t.data_ptr() == ptr and len(memory.live[ptr]) == 3 * 50_000 * 4


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW", "PagedAdam8bit"])
def test_only_state1_state2_of_large_params_are_paged(memory, name):
    params = _params()
    opt = getattr(qoptim.optim, name)(params, lr=1e-3)
    _step(opt, params)
    big, medium, small = (opt.state[p] for p in params)
    assert _is_paged(big["state1"]) and _is_paged(big["state2"])
    assert memory.allocations == 2 and len(memory.live) == 2
    for key, value in big.items():
        if key not in ("state1", "state2") and isinstance(value, torch.Tensor):
            assert not _is_paged(value), key
    for state in (medium, small):
        assert not any(_is_paged(v) for v in state.values() if isinstance(v, torch.Tensor))


def test_paged_step_equals_unpaged_step(memory):
    params = _params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    paged, plain = qoptim.optim.PagedAdamW8bit(params, lr=1e-2), qoptim.optim.AdamW8bit(twins, lr=1e-2)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p) * 0.01
            q.grad = p.grad.clone()
        paged.step()
        plain.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in paged.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, plain.state[q][key]), key


def test_prefetch_of_each_paged_state_then_one_synchronize_per_step(memory):
    params = _params()
    opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    for step in range(1, 4):
        _step(opt, params)
        state = opt.state[params[0]]
        expected = [(state["state1"].data_ptr(), PAGED_MIN_NUMEL), (state["state2"].data_ptr(), PAGED_MIN_NUMEL)]
        assert memory.prefetches == expected * step
        assert memory.syncs == step


def test_no_prefetch_without_concurrent_managed_access(monkeypatch):
    memory = FakeManagedMemory(can_prefetch=False)
    monkeypatch.setitem(paging._pagers, "cpu", paging_cuda.ManagedPager(memory))
    params = _params()
    _step(qoptim.optim.PagedAdamW8bit(params, lr=1e-3), params, steps=2)
    assert memory.prefetches == [] and memory.syncs == 2 and memory.allocations == 2


def test_buffers_are_freed_with_the_optimizer_and_never_leak(memory):
    for round_ in range(1, 4):
        params = _params()
        opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
        _step(opt, params)
        assert len(memory.live) == 2
        del opt
        gc.collect()
        assert memory.live == {} and memory.allocations == 2 * round_ and len(memory.freed) == 2 * round_


def test_state_reset_frees_buffers(memory):
    params = _params()
    opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    _step(opt, params)
    opt.state.clear()
    gc.collect()
    assert memory.live == {}
    _step(opt, params)  # fresh states, paged again
    assert len(memory.live) == 2 and memory.allocations == 4


def test_state_dict_holds_plain_tensors_and_loading_repages(memory):
    params = _params()
    opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    _step(opt, params, steps=2)
    saved = opt.state_dict()
    inner = saved["state"][0]["__bnb_optimizer_quant_state__"]
    assert not _is_paged(inner["state1"]) and inner["state1"].data_ptr() == opt.state[params[0]]["state1"].data_ptr()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert not _is_paged(loaded["state"][0]["__bnb_optimizer_quant_state__"]["state1"])

    old = set(memory.live)
    fresh = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    fresh.load_state_dict(loaded)
    state = fresh.state[params[0]]
    assert _is_paged(state["state1"]) and _is_paged(state["state2"])
    assert state["state1"].data_ptr() in memory.live and state["state1"].data_ptr() not in old
    for key in ("state1", "state2"):
        assert torch.equal(state[key], opt.state[params[0]][key])
    del opt, saved, inner
    gc.collect()
    assert len(memory.live) == 2  # only the loaded optimizer's buffers remain
    _step(fresh, params)


def test_cuda_pager_is_registered_and_lazy():
    pager = paging.pager_for(torch.device("cuda"))
    assert isinstance(pager, paging_cuda._LazyCudaPager)
    pager.prefetch([], torch.device("cuda"))  # nothing to do: loads nothing
    assert pager._pager is None or torch.cuda.is_available()


def test_lazy_pager_falls_back_to_ordinary_memory_without_a_cuda_runtime(monkeypatch):
    def no_runtime():
        raise OSError("no libcudart here")

    monkeypatch.setattr(paging_cuda, "CudaRuntime", no_runtime)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    pager = paging_cuda._LazyCudaPager()
    with pytest.warns(RuntimeWarning, match="paged optimizer states are unavailable"):
        t = pager.zeros((4,), torch.float32, CPU)
    assert torch.equal(t, torch.zeros(4)) and not _is_paged(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per buffer
        pager.zeros((4,), torch.float32, CPU)
        pager.prefetch([t], CPU)
        pager.synchronize(CPU)
