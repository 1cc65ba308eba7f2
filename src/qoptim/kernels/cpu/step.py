"""One parameter's step: its passes over memory, each split into tasks (``launch``) and run on
the best path that compiles (``paths``).

- LAMB and LARS first take a pass of their own for the norms of their layer-wise trust ratio
  (``trust_ratio``); their step then runs with it.
- fp32 states, 8-bit states in 256-blocks and 4-bit states take one pass: every block its own
  new scales (``four_bit``: two per state, one per 128 elements).
- 8-bit states with one scale per tensor take two, as the reference does: the first finds the
  new states' peaks (``Pass.PEAKS``), the second steps with their reciprocals.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import reference
from ..rules import RULES
from ..types import BLOCK, NEAREST, Hyper, StateSlot, WeightFormat
from . import four_bit, launch, paths, tasks
from .bits import ZERO
from .layout import Layout, as_numpy, kernel_kind, kernel_states, weight_view
from .rules import KERNEL_STATES, constants, marker_of
from .tasks import Pass

__all__ = ["run", "trust_ratio"]


def run(rule: str, layout: Layout, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool, ntasks: int,
        weights: WeightFormat = NEAREST) -> int:  # fmt: skip
    """One step of ``rule`` on ``p`` in place (and its correction: ``weights``, which
    ``layout.weights_fit``), its states laid out as ``layout`` (``layout.plan``), in ``ntasks``
    tasks; returns the number of skipped blocks."""
    if RULES[rule].trust:  # the layer-wise ratio first: a pass of its own
        hp = hp._replace(trust_ratio=trust_ratio(rule, layout, p, g, slots, hp, skip_nonfinite, ntasks, weights))
    marker = marker_of(rule)
    skipped = np.zeros(ntasks, dtype=np.int64)
    head = (marker, weight_view(p, weights), as_numpy(g))
    states = kernel_states(p.numel(), slots, layout)
    step = (np.float32(hp.gnorm_scale), constants(rule, hp), skip_nonfinite)
    if layout == Layout.FP32:
        launch.run(tasks.fp32_task, ntasks, skipped, (*head, *states, *step))
        return int(skipped.sum())
    kind = kernel_kind(layout, slots)
    if layout == Layout.FOUR_BIT:
        paths.on_best_path(lambda path: launch.run(four_bit.four_bit_task, ntasks, skipped, (*head, *states, *step, path)), kind)
        return int(skipped.sum())
    peaks = paths.on_best_path(lambda path: _run_8bit(marker.states, (*head, *states, *step), layout, ntasks, skipped, path), kind)
    if layout == Layout.WHOLE:
        for slot, peak in zip(slots, peaks):  # the rule's states only
            slot.absmax.fill_(float(peak))
    return int(skipped.sum())


def _run_8bit(count: int, args: tuple, layout: Layout, ntasks: int, skipped: np.ndarray, path) -> list | None:
    """The 8-bit task on every block; returns the new one-per-tensor scales of the rule's
    ``count`` states (``Layout.WHOLE``) or None. (Layout and pass go in as ints: see ``Layout``.)"""
    peaks = np.zeros((ntasks, KERNEL_STATES), dtype=np.float32)
    inverse = (ZERO,) * KERNEL_STATES
    new_scales = None
    if layout == Layout.WHOLE:  # one scale per tensor: a first pass finds the new scales, as in the reference
        launch.run(tasks.eight_bit_task, ntasks, skipped, (*args, int(layout), int(Pass.PEAKS), inverse, path, peaks))
        new_scales = [np.float32(np.nan) if np.isnan(column).any() else column.max() for column in peaks.T[:count]]
        inverse = tuple(_inverse(x) for x in new_scales) + (ZERO,) * (KERNEL_STATES - count)
    launch.run(tasks.eight_bit_task, ntasks, skipped, (*args, int(layout), int(Pass.STEP), inverse, path, peaks))
    return new_scales


def _inverse(scale: np.float32) -> np.float32:
    return np.float32(1.0) / scale if scale > 0 else np.float32(0.0)


def trust_ratio(rule: str, layout: Layout, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool, ntasks: int,
                weights: WeightFormat = NEAREST) -> float:  # fmt: skip
    """reference.trust_ratio from one fused pass over the blocks (``tasks.trust_task``; a
    parameter with a master: of the master's values): each
    block's float64 sums of squares, added up by numpy (pairwise) in an order that does not
    depend on the thread count. torch sums in another order in the reference: the norms
    differ by ~1e-16 relative."""
    sums = np.zeros((-(-p.numel() // BLOCK), 2))
    states = kernel_states(p.numel(), slots, layout)
    read = weight_view(p, WeightFormat(correction=weights.correction))  # (a draw writes, and this pass reads only)
    args = (marker_of(rule), read, as_numpy(g), *states, np.float32(hp.gnorm_scale), constants(rule, hp), skip_nonfinite)
    task = four_bit.four_bit_trust_task if layout == Layout.FOUR_BIT else tasks.trust_task
    paths.on_best_path(lambda path: launch.run(task, ntasks, np.zeros(ntasks, np.int64), (*args, path, sums)), kernel_kind(layout, slots, reads_only=True))
    param_norm, term_norm = np.sqrt(sums.sum(axis=0))
    _, ratio = reference.TRUST_RATIOS[rule]
    return ratio(float(param_norm), float(term_norm), hp)
