"""The CUDA pager (qoptim.paging.cuda) on the CPU, with a fake allocator standing for CUDA
managed memory (tests/support/paging.py): buffers alias the managed memory, live exactly as long
as their tensors, and a paged step is the unpaged step; and the lazy loader's fallback."""

from __future__ import annotations

import gc
import io
import warnings

import pytest
import torch

import qoptim
from qoptim.paging import cuda
from support.paging import CPU, is_paged, paged_cpu, paging_params, train


@pytest.fixture
def memory():
    with paged_cpu() as fake:
        yield fake


def test_pager_zeros_are_zeroed_tagged_and_alias_managed_memory(memory):
    t = cuda.ManagedPager(memory).zeros((3, 50_000), torch.float32, CPU)
    assert t.shape == (3, 50_000) and t.dtype == torch.float32 and is_paged(t)
    assert bool((t == 0).all())
    (ptr,) = memory.live
    assert t.data_ptr() == ptr and len(memory.live[ptr]) == 3 * 50_000 * 4


def test_paged_step_equals_unpaged_step(memory):
    params = paging_params()
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


def test_no_prefetch_without_concurrent_managed_access():
    with paged_cpu(can_prefetch=False) as memory:
        params = paging_params()
        train(qoptim.optim.PagedAdamW8bit(params, lr=1e-3), params, steps=2)
        assert memory.prefetches == [] and memory.syncs == 2 and memory.allocations == 2


def test_buffers_are_freed_with_the_optimizer_and_never_leak(memory):
    for round_ in range(1, 4):
        params = paging_params()
        opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
        train(opt, params)
        assert len(memory.live) == 2
        del opt
        gc.collect()
        assert memory.live == {} and memory.allocations == 2 * round_ and len(memory.freed) == 2 * round_


def test_state_reset_frees_buffers(memory):
    params = paging_params()
    opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    train(opt, params)
    opt.state.clear()
    gc.collect()
    assert memory.live == {}
    train(opt, params)  # fresh states, paged again
    assert len(memory.live) == 2 and memory.allocations == 4


def test_state_dict_holds_plain_tensors_and_loading_repages(memory):
    params = paging_params()
    opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    train(opt, params, steps=2)
    saved = opt.state_dict()
    inner = saved["state"][0]["__bnb_optimizer_quant_state__"]
    assert not is_paged(inner["state1"]) and inner["state1"].data_ptr() == opt.state[params[0]]["state1"].data_ptr()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert not is_paged(loaded["state"][0]["__bnb_optimizer_quant_state__"]["state1"])

    old = set(memory.live)
    fresh = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    fresh.load_state_dict(loaded)
    state = fresh.state[params[0]]
    assert is_paged(state["state1"]) and is_paged(state["state2"])
    assert state["state1"].data_ptr() in memory.live and state["state1"].data_ptr() not in old
    for key in ("state1", "state2"):
        assert torch.equal(state[key], opt.state[params[0]][key])
    del opt, saved, inner
    gc.collect()
    assert len(memory.live) == 2  # only the loaded optimizer's buffers remain
    train(fresh, params)


def test_lazy_pager_falls_back_to_ordinary_memory_without_a_cuda_runtime(monkeypatch):
    def no_runtime():
        raise OSError("no libcudart here")

    monkeypatch.setattr(cuda, "CudaRuntime", no_runtime)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    pager = cuda.LazyCudaPager()
    with pytest.warns(RuntimeWarning, match="paged optimizer states are unavailable"):
        t = pager.zeros((4,), torch.float32, CPU)
    assert torch.equal(t, torch.zeros(4)) and not is_paged(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per buffer
        pager.zeros((4,), torch.float32, CPU)
        pager.prefetch([t], CPU)
        pager.synchronize(CPU)
