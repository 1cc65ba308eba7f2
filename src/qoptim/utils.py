"""The part of ``bitsandbytes.utils`` that code written for bitsandbytes imports (its own test
suite does ``from bitsandbytes.utils import sync_gpu`` at module level)."""

from __future__ import annotations

import torch

__all__ = ["sync_gpu"]


def sync_gpu(t: torch.Tensor) -> None:
    """Wait until the accelerator holding ``t`` has finished its queued work (nothing on a CPU)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    elif t.device.type == "xpu":
        torch.xpu.synchronize(t.device)
