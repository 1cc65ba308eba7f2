"""The pager registry (qoptim.paging): which buffers are paged, when they are prefetched and
synchronized, and the CUDA pager registered by its module path, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qoptim
from qoptim import paging
from qoptim.paging import PAGED_MIN_NUMEL, cuda
from support.paging import is_paged, paged_cpu, paging_params, train


@pytest.fixture
def memory():
    with paged_cpu() as fake:
        yield fake


@pytest.mark.parametrize("name", ["PagedAdamW8bit", "PagedAdamW", "PagedAdam8bit"])
def test_only_state1_state2_of_large_params_are_paged(memory, name):
    params = paging_params()
    opt = getattr(qoptim.optim, name)(params, lr=1e-3)
    train(opt, params)
    big, medium, small = (opt.state[p] for p in params)
    assert is_paged(big["state1"]) and is_paged(big["state2"])
    assert memory.allocations == 2 and len(memory.live) == 2
    for key, value in big.items():
        if key not in ("state1", "state2") and isinstance(value, torch.Tensor):
            assert not is_paged(value), key
    for state in (medium, small):
        assert not any(is_paged(v) for v in state.values() if isinstance(v, torch.Tensor))


def test_prefetch_of_each_paged_state_then_one_synchronize_per_step(memory):
    params = paging_params()
    opt = qoptim.optim.PagedAdamW8bit(params, lr=1e-3)
    for step in range(1, 4):
        train(opt, params)
        state = opt.state[params[0]]
        expected = [(state["state1"].data_ptr(), PAGED_MIN_NUMEL), (state["state2"].data_ptr(), PAGED_MIN_NUMEL)]
        assert memory.prefetches == expected * step
        assert memory.syncs == step


def test_cuda_pager_is_registered_and_lazy():
    pager = paging.pager_for(torch.device("cuda"))
    assert pager is cuda and isinstance(cuda.PAGER, cuda.LazyCudaPager)
    pager.prefetch([], torch.device("cuda"))  # nothing to do: loads nothing
    assert cuda.PAGER.loaded is None or torch.cuda.is_available()


def test_importing_qoptim_imports_no_pager():
    code = "import sys, qoptim; print(sorted(m for m in sys.modules if m.startswith('qoptim.paging')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['qoptim.paging']"


def test_a_pager_registered_by_path_is_imported_on_first_use():
    paging.register_pager("meta", "support.paging")  # any importable module stands for a pager
    try:
        assert paging.pager_for(torch.device("meta")) is sys.modules["support.paging"]
    finally:
        paging.unregister_pager("meta")
    assert paging.pager_for(torch.device("meta")) is None
