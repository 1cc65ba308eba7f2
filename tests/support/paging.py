"""A fake CUDA managed memory, to test paging on the CPU, and the parameters and steps of those tests.

The fake stands for cudaMallocManaged / cudaMemPrefetchAsync / cudaFree: it hands out host
memory and records every call. Registered (through ``qoptim.paging.cuda.ManagedPager``) as the
pager of CPU tensors, it lets paged optimizers on CPU parameters run exactly the code they run on CUDA.
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import torch

from qoptim import paging
from qoptim.paging import PAGED_MIN_NUMEL
from qoptim.paging.cuda import ManagedPager

CPU = torch.device("cpu")


class FakeManagedMemory:
    """An Allocator over numpy buffers that records what the pager asks of it."""

    def __init__(self, can_prefetch: bool = True):
        self.live: dict[int, np.ndarray] = {}
        self.allocations = 0
        self.freed: list[int] = []
        self.prefetches: list[tuple[int, int]] = []
        self.syncs = 0
        self.prefetch_access = can_prefetch

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
        return self.prefetch_access

    def prefetch(self, ptr: int, nbytes: int, device: torch.device) -> None:
        assert ptr in self.live or any(start <= ptr < start + len(m) for start, m in self.live.items())
        self.prefetches.append((ptr, nbytes))

    def synchronize(self, device: torch.device) -> None:
        self.syncs += 1


@contextlib.contextmanager
def paged_cpu(can_prefetch: bool = True):
    """A fake managed memory serving as the pager of CPU tensors inside the block."""
    fake = FakeManagedMemory(can_prefetch)
    paging.register_pager("cpu", ManagedPager(fake))
    try:
        yield fake
    finally:
        gc.collect()  # frees what the block left behind, through the fake
        paging.unregister_pager("cpu")


def paging_params(big: int = PAGED_MIN_NUMEL, medium: int = 8192, small: int = 100) -> list[torch.nn.Parameter]:
    """A parameter just large enough to be paged, one with 8-bit states, one with fp32 states."""
    return [torch.nn.Parameter(torch.randn(n) * 0.1) for n in (big, medium, small)]


def train(opt, params, steps: int = 1) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        opt.step()


def is_paged(t: torch.Tensor) -> bool:
    return getattr(t, "is_paged", False)
