"""One registry that picks the implementation of an optimizer update by device type.

A backend is a module (or any object) with two functions:

    update(rule, p, g, slots, hp, skip_nonfinite, weights) -> UpdateResult
    grad_norm_sq(g) -> float

and optionally ``supports(rule, p, slots) -> bool`` when it covers only some cases (the
reference backend covers every case on every device and is used for the rest), and
``update_many(jobs) -> list[UpdateResult]`` when it can do many parameters' updates at once
better than one by one (e.g. small tensors in one launch).

``QOPTIM_BACKEND=reference`` (environment) forces the reference backend, for debugging.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any

import torch

from . import reference
from .types import BLOCK, NEAREST, WHOLE_TENSOR, Hyper, Job, StateSlot, UpdateResult, WeightFormat

__all__ = [
    "BLOCK", "NEAREST", "WHOLE_TENSOR", "Hyper", "Job", "StateSlot", "UpdateResult", "WeightFormat", "backend_for", "register",
    "unregister", "update", "update_many",
]  # fmt: skip

# device type -> module path of its fused backend, imported on first use
_FUSED: dict[str, str] = {}
_loaded: dict[str, Any] = {}


def register(device_type: str, module_path: str) -> None:
    """Make ``module_path`` the fused backend for tensors on ``device_type``."""
    _FUSED[device_type] = module_path
    _loaded.pop(device_type, None)


def unregister(device_type: str) -> None:
    """Give tensors on ``device_type`` the reference backend again (e.g. after a test's fake backend)."""
    _FUSED.pop(device_type, None)
    _loaded.pop(device_type, None)


def backend_for(device: torch.device) -> Any:
    """The backend that updates parameters on ``device``."""
    choice = os.environ.get("QOPTIM_BACKEND", "auto").strip().lower()
    if choice == "reference" or device.type not in _FUSED:
        return reference
    if choice not in ("auto", "", "fused"):
        raise ValueError(f"QOPTIM_BACKEND must be 'auto', 'fused' or 'reference', got {choice!r}")
    if device.type not in _loaded:
        _loaded[device.type] = _import(device.type)
    return _loaded[device.type]


def _import(device_type: str) -> ModuleType:
    try:
        return importlib.import_module(_FUSED[device_type])
    except ImportError as e:  # an optional dependency is missing: the reference still works
        warnings.warn(
            f"qoptim: fused kernels for {device_type} are unavailable ({e}); using the slower reference backend",
            RuntimeWarning,
            stacklevel=3,
        )
        return reference


def update(rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True,
           weights: WeightFormat = NEAREST) -> UpdateResult:  # fmt: skip
    """Apply one update through the backend for ``p``'s device (the reference where that
    backend does not cover the case)."""
    backend = backend_for(p.device)
    supports = getattr(backend, "supports", None)
    if supports is not None and not supports(rule, p, slots):
        backend = reference
    return _backend_of(weights, backend).update(rule, p, g, slots, hp, skip_nonfinite, weights)


def update_many(jobs: list[Job]) -> list[UpdateResult]:
    """``update(*job)`` for every job, in any order (jobs are independent parameters): each
    backend gets its jobs together where it batches them (``update_many``)."""
    if len(jobs) == 1:  # gradient release's usual call: nothing to group (its dicts cost inside backward)
        return _update_together(_backend_of(jobs[0].weights, backend_for(jobs[0].p.device)), jobs)
    results: list[UpdateResult | None] = [None] * len(jobs)
    by_backend: dict[int, tuple[Any, list[int]]] = {}
    of_device: dict[torch.device, Any] = {}  # (backend_for reads the environment: once per device)
    for i, job in enumerate(jobs):
        device = job.p.device
        backend = of_device.get(device)
        if backend is None:
            backend = of_device[device] = backend_for(device)
        backend = _backend_of(job.weights, backend)
        by_backend.setdefault(id(backend), (backend, []))[1].append(i)
    for backend, indices in by_backend.values():
        for i, result in zip(indices, _update_together(backend, [jobs[i] for i in indices])):
            results[i] = result
    return results


def _backend_of(weights: WeightFormat, device_backend: Any) -> Any:
    """The backend that takes an update in ``weights``: its device's, unless that one has no weight formats."""
    if not weights.nearest and not getattr(device_backend, "WEIGHT_FORMATS", False):
        return reference
    return device_backend


def _update_together(backend: Any, jobs: list[Job]) -> list[UpdateResult]:
    """``jobs`` on ``backend``: in one ``update_many`` where it has one, else one by one."""
    many = getattr(backend, "update_many", None)
    return many(jobs) if many is not None else [update(*job) for job in jobs]


def grad_norm_sq(g: torch.Tensor) -> float:
    return backend_for(g.device).grad_norm_sq(g)


register("cpu", "qoptim.kernels.cpu")
register("cuda", "qoptim.kernels.triton")
