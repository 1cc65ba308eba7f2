"""The update jobs of a step: one ``ParamUpdate`` per parameter (the kernels' ``Job`` and what
the parameter's state takes once it ran), percentile clipping, and the step's skipped-block total."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..kernels import Hyper, Job, UpdateResult
from .state import GNORM_VEC

__all__ = ["ParamUpdate", "clip_gradient", "hyper_of", "percentile_clip", "run_jobs", "total_skipped"]


@dataclass
class ParamUpdate:
    """A parameter's update for the kernels, and the parameter it writes back to."""

    job: Job  # what the kernels take
    params: torch.Tensor  # the parameter (or its local shard); job.p is a flat view, or a copy
    state: dict[str, Any]  # the parameter's optimizer state
    commit: dict[str, Any]  # what the state takes once the update ran: the step count, clipping history

    def write_back(self) -> None:
        """Copy the update into a parameter that was updated as a contiguous copy (harmless if
        the update did not run: the copy started equal to the parameter)."""
        if self.job.p.data_ptr() != self.params.data_ptr():
            self.params.copy_(self.job.p.view(self.params.shape))

    def commit_state(self) -> None:
        """Count the update in the parameter's state (once the kernels ran)."""
        self.state.update(self.commit)


def run_jobs(jobs: list[Job]) -> list[UpdateResult]:
    """``kernels.update_many(jobs)``, where a parameter without elements has nothing to update
    (the kernels' one-scale-per-tensor layout has no scale to take of nothing); its step counts."""
    results = iter(kernels.update_many([job for job in jobs if job.p.numel()]))
    return [next(results) if job.p.numel() else UpdateResult(0) for job in jobs]


def hyper_of(config: dict[str, Any], step: int, decoupled: bool) -> Hyper:
    """A step's hyperparameters from a parameter's config: the moment decays from ``betas``
    (families whose ``betas`` mean something else, or with settings of their own, extend it)."""
    betas = config["betas"]
    return Hyper(
        lr=float(config["lr"]),
        beta1=float(betas[0]),
        beta2=float(betas[1]) if len(betas) > 1 else 0.0,
        eps=float(config["eps"]),
        weight_decay=float(config["weight_decay"]),
        step=step,
        decoupled=decoupled,
        beta3=float(betas[2]) if len(betas) > 2 else 0.0,
        alpha=float(config["alpha"]),
        max_unorm=float(config["max_unorm"]),
    )


def clip_gradient(hp: Hyper, state: dict[str, Any], flat_g: torch.Tensor, percentile: int, commit: dict[str, Any]) -> Hyper:
    """``hp`` with the gradient scale of percentile clipping; this step's history goes into
    ``commit`` (a new tensor: nothing changes before the update ran). The history is created here
    if clipping was switched on (an override) after the state was."""
    fresh = GNORM_VEC not in state
    history = torch.zeros(100, device=flat_g.device) if fresh else state[GNORM_VEC].clone()
    scale = percentile_clip(history, kernels.grad_norm_sq(flat_g), 1 if fresh else hp.step, percentile)
    commit[GNORM_VEC] = history
    return hp._replace(gnorm_scale=scale)


def percentile_clip(gnorm_vec: torch.Tensor, norm_sq: float, step: int, percentile: int) -> float:
    """Record this step's squared gradient norm in the 100-step history and return the factor
    that scales the gradient down to the history's ``percentile``-th smallest norm.

    A NaN/Inf norm is not recorded (it would poison the history for 100 steps) and scales
    nothing: the kernels' non-finite handling decides what such a gradient does."""
    if not math.isfinite(norm_sq):
        return 1.0
    if step == 1:
        gnorm_vec.fill_(norm_sq)
    else:
        gnorm_vec[step % 100] = norm_sq
    current = math.sqrt(float(torch.tensor(norm_sq, dtype=torch.float32)))  # as stored, without reading it back
    clip = math.sqrt(float(torch.kthvalue(gnorm_vec, percentile + 1).values))  # sorted(gnorm_vec)[percentile]
    return clip / current if current > clip else 1.0


def total_skipped(counts: list[int | torch.Tensor]) -> int:
    """Sum of skipped-block counts, reading device tensors with one synchronization."""
    total = sum(c for c in counts if not isinstance(c, torch.Tensor))
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for c in counts:
        if isinstance(c, torch.Tensor):
            by_device[c.device].append(c.to(torch.int64))
    return total + sum(int(torch.stack(tensors).sum()) for tensors in by_device.values())
