"""Where optimizer state buffers live.

Paged optimizers keep their large state buffers in memory that the driver can page between
the GPU and the host (CUDA managed memory), so that a memory spike pages optimizer state
out instead of failing. A *pager* provides that memory for one device type:

    zeros(shape, dtype, device) -> Tensor   a zero-filled paged buffer
    prefetch(tensors, device) -> None       ask for buffers to be resident before use
    synchronize(device) -> None             wait for the step's work (once per step)

Devices without a pager (the CPU, or CUDA without the managed-memory runtime) get ordinary
buffers, and a paged optimizer there behaves as the non-paged one, with one warning.

A pager is registered as an object or as the path of a module that is one (as ``kernels``
registers its backends): the module is imported the first time a paged buffer of that device
type is asked for, so importing qoptim loads no CUDA runtime.

Modules:
    __init__.py  the pager registry, and the state buffers, prefetches and synchronizes the optimizers ask for
    cuda.py      the CUDA pager: CUDA managed memory from the runtime torch has loaded (registered for "cuda")
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Iterable

import torch

__all__ = ["PAGED_MIN_NUMEL", "register_pager", "unregister_pager", "pager_for", "state_buffer", "prefetch", "synchronize"]

# Tensors with fewer elements stay in ordinary memory: paging them saves little (bitsandbytes' rule).
PAGED_MIN_NUMEL = 100_000

# device type -> its pager, or the module path of its pager until first use
_pagers: dict[str, Any] = {}


def register_pager(device_type: str, pager: Any) -> None:
    """Make ``pager`` (an object, or the path of a module imported on first use) the pager of
    tensors on ``device_type``."""
    _pagers[device_type] = pager


def unregister_pager(device_type: str) -> None:
    """Give ``device_type`` tensors ordinary buffers again (e.g. after a test's fake pager)."""
    _pagers.pop(device_type, None)


def pager_for(device: torch.device) -> Any | None:
    """The pager of ``device``'s type, or None."""
    pager = _pagers.get(device.type)
    if isinstance(pager, str):
        pager = _pagers[device.type] = importlib.import_module(pager)
    return pager


def state_buffer(p: torch.Tensor, dtype: torch.dtype, paged: bool, owner: Any = None, shape: tuple | None = None) -> torch.Tensor:
    """A zero-filled contiguous state buffer for ``p`` (of ``p``'s shape unless ``shape`` is
    given), paged when asked for and possible.

    ``owner`` (the optimizer) is warned once when paging was asked for but is not available.
    """
    shape = p.shape if shape is None else torch.Size(shape)
    if paged:
        pager = pager_for(p.device)
        if pager is None:
            _warn_unpaged(owner, p.device)
        elif p.numel() >= PAGED_MIN_NUMEL:
            return pager.zeros(shape, dtype, p.device)
    return torch.zeros(shape, dtype=dtype, device=p.device)


def prefetch(tensors: Iterable[torch.Tensor], device: torch.device) -> None:
    pager = pager_for(device)
    if pager is not None:
        pager.prefetch([t for t in tensors if getattr(t, "is_paged", False)], device)


def synchronize(device: torch.device) -> None:
    pager = pager_for(device)
    if pager is not None:
        pager.synchronize(device)


def _warn_unpaged(owner: Any, device: torch.device) -> None:
    if owner is not None and getattr(owner, "_warned_unpaged", False):
        return
    warnings.warn(
        f"Paged optimizers are not supported on {device.type.upper()}. Falling back to non-paged optimizer behavior.",
        UserWarning,
        stacklevel=4,
    )
    if owner is not None:
        owner._warned_unpaged = True


register_pager("cuda", "qoptim.paging.cuda")
