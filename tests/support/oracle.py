"""The one "backend equals reference" check of every fused backend: its update and
``reference.update`` side by side, step by step, every bit of the parameter, of each state's
values (8-bit codes or fp32) and of its scales equal after every step (any NaN equals any NaN).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from qoptim.kernels import reference
from qoptim.kernels.types import Hyper, StateSlot, UpdateResult
from qoptim.quant.master import Draw

from .cases import copy_state, with_draws
from .weights import WeightCase

# A backend's ``update(rule, p, g, slots, hp, skip_nonfinite[, weights])``.
UpdateFn = Callable[[str, torch.Tensor, torch.Tensor, list[StateSlot], Hyper, bool], UpdateResult]

_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, where: str = "") -> None:
    """Bit for bit (so -0.0 is not 0.0), except that any NaN equals any NaN."""
    if not ours.is_floating_point():
        assert torch.equal(ours, theirs), where
        return
    nan = ours.isnan()
    assert torch.equal(nan, theirs.isnan()), f"{where}: NaNs in other places"
    bits = _BITS[ours.element_size()]
    ours, theirs = ours[~nan], theirs[~nan]
    different = ours.view(bits) != theirs.view(bits)
    examples = f"e.g. {ours[different][:3]} vs {theirs[different][:3]}"
    assert not bool(different.any()), f"{where}: {int(different.sum())} differ, {examples}"


def assert_same_state(
    p: torch.Tensor, slots: list[StateSlot], p_ref: torch.Tensor, slots_ref: list[StateSlot], where: str = ""
) -> None:
    """A parameter and its states, bit for bit: the parameter, each state's values, and the
    scales of the 8-bit ones."""
    assert_same(p, p_ref, f"{where} parameter")
    for i, (ours, theirs) in enumerate(zip(slots, slots_ref, strict=True)):
        assert_same(ours.values, theirs.values, f"{where} state {i}")
        if ours.quantized:
            assert_same(ours.absmax, theirs.absmax, f"{where} scales of state {i}")


def assert_backend_matches_reference(
    update: UpdateFn,
    rule: str,
    p: torch.Tensor,
    slots: list[StateSlot],
    steps: Iterable[tuple[torch.Tensor, Hyper]],
    skip_nonfinite: bool,
    weights: WeightCase | None = None,
    draws: Callable[[Hyper], Draw] | None = None,
) -> list[int]:
    """``update`` on ``p`` and ``slots``, and ``reference.update`` on copies of them, for each
    (gradient, hyperparameters) of ``steps``: the same skipped-block count and the same bits
    after every step. The reference's skipped-block counts, step by step.

    With ``weights`` (``support.weights``), 16-bit ``p`` is first given that case's master (a
    correction, compared too after every step) or stochastic rounding. With ``draws``, the rule's
    never-negative states round stochastically with the draw ``draws(hp)`` of each step (a new key
    every step, as the optimizers draw them: ``optim.weights.step_draw``)."""
    correction = weights.start(p) if weights is not None else None
    p_ref, slots_ref = copy_state(p, slots)
    correction_ref = None if correction is None else correction.clone()
    counts = []
    for number, (g, hp) in enumerate(steps, start=1):
        ours = () if weights is None else (weights.at(correction, hp),)
        theirs = () if weights is None else (weights.at(correction_ref, hp),)
        if draws is not None:
            slots, slots_ref = with_draws(rule, slots, draws(hp)), with_draws(rule, slots_ref, draws(hp))
        got = update(rule, p, g, slots, hp, skip_nonfinite, *ours).skipped_blocks
        expected = reference.update(rule, p_ref, g, slots_ref, hp, skip_nonfinite, *theirs).skipped_blocks
        assert int(got) == expected, f"step {number}: {int(got)} blocks skipped, the reference {expected}"
        assert_same_state(p, slots, p_ref, slots_ref, f"step {number}:")
        if correction is not None:
            assert_same(correction, correction_ref, f"step {number}: master correction")
        counts.append(expected)
    return counts
