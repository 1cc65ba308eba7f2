"""The CUDA backend: fused Triton kernels for every rule of the reference (Adam / AdamW, AdEMAMix,
Lion, SGD, LARS, RMSprop, Adagrad, LAMB), with 8-bit states in 256-blocks, 8-bit states with one
scale per tensor, 4-bit states in 128-blocks (two states' codes in one byte per element: rules of
at most two states), or fp32 states, the block-wise ones (8-bit or 4-bit) rounded to nearest or,
with a draw (one for a parameter's states), stochastically; on fp32 / fp16 / bf16 parameters, in
every weight format (``types.WeightFormat``: a 24- or 32-bit master decoded, updated and encoded
again in the same pass, or stochastic rounding; ``weights``).

The modules, one idea each (what a rule is, its states, decay and float constants, is
``kernels.rules``', shared with every backend):
  * ``rules``: each rule's per-element math on the device, and ``apply_rule``;
  * ``weights``: reading and writing a parameter in its weight format (``quant.master`` on tiles);
  * ``draws``: the random bits of stochastic rounding, of weights and of block-wise states;
  * ``states``: reading and writing the states in each layout, and the quantizers;
  * ``block``: the one block kernel that dequantizes, applies a rule, requantizes;
  * ``launch``: what a launch takes: layouts, pointers, a step's floats and switches, rounding tables;
  * ``trust``: LAMB's and LARS's trust ratio, made on the device;
  * ``batch``: many small parameters in one launch;
  * here: the seam (``supports``, ``update``, ``update_many``, ...) and ``Step``, a step's passes.

Exactness against the reference (same IEEE float32 result for every element):
  * division and square root use the correctly rounded ``div_rn`` / ``sqrt_rn`` (plain ``/`` and
    ``tl.sqrt`` are approximate on the GPU);
  * launches pass ``enable_fp_fusion=False`` so that no multiply and add are contracted into an
    FMA that torch's separate ops would round twice;
  * every Python-side constant (``1 - beta1``, ``lr / (1 - beta1**step)``, ...) is computed in
    double exactly as the reference writes it and handed to the kernel as float32, as torch does
    with a Python scalar (``kernels.rules.Scalars``).
The one exception is the trust ratio of LAMB / LARS, whose float64 sums cannot add in the
reference's order (see ``trust``).

A step is one or more passes of the block kernel, all queued on the device with no host sync:
a norms pass first for LAMB / LARS, a peaks pass for the whole-tensor 8-bit layout (the new
global scale must be known before any element is requantized: a ``torch.amax`` over the
programs' peaks gives it), then the step itself. Skipped (NaN/Inf-gradient) blocks are counted by
one atomic add per program into a device int64 counter, read by the optimizer once per step.
"""

from __future__ import annotations

import contextlib

import torch
import triton

from .. import reference
from ..rules import RULES
from ..types import BLOCK, NEAREST, Hyper, Job, StateSlot, UpdateResult, WeightFormat, state_draw
from . import batch
from .block import NORMS_PASS, PEAKS_PASS, STEP_PASS, block_kernel
from .launch import (INTERPRETED, LAUNCH_OPTIONS, SCALAR_LAUNCH_OPTIONS, draw_args, layout_of, pointer_args, rows_per_program,
                     states_layout, step_arguments)  # fmt: skip
from .rules import MATH_SWITCH
from .states import WHOLE_TENSOR_8BIT
from .trust import TrustRatio, ratio_from_sums

__all__ = [
    "INTERPRETED", "WEIGHT_FORMATS", "Step", "TrustRatio", "check_weights", "grad_norm_sq", "supports", "trust_ratio", "update",
    "update_many",
]  # fmt: skip

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WEIGHT_FORMATS = True  # master corrections and stochastic rounding are fused (``kernels.update`` reads this)


def supports(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> bool:
    """A rule of the reference with all its states in one layout this module has a kernel for."""
    spec = RULES.get(rule)
    if spec is None or p.dtype not in PARAM_DTYPES or len(slots) != spec.states:
        return False
    return states_layout(slots) is not None  # (which says which draws of the states the kernel takes)


def grad_norm_sq(g: torch.Tensor) -> float:
    # One torch.dot per chunk is already bandwidth-bound on the GPU: no kernel of our own needed.
    return reference.grad_norm_sq(g)


def update(
    rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True,
    weights: WeightFormat = NEAREST,
) -> UpdateResult:
    """One fused step of ``rule`` on a flat contiguous parameter (see the module docstring)."""
    check_weights(p, weights)
    if not supports(rule, p, slots):
        raise ValueError(f"the Triton backend has no kernel for rule {rule!r} with these states")
    if p.numel() == 0:
        return UpdateResult(skipped_blocks=0)
    with _on_device_of(p):
        return _update(rule, p, g, slots, hp, skip_nonfinite, weights)


def check_weights(p: torch.Tensor, weights: WeightFormat) -> None:
    """``reference.check_weights``, and what a kernel reading the correction's memory needs: a
    contiguous correction on the parameter's device."""
    reference.check_weights(p, weights)
    c = weights.correction
    if c is not None and (not c.is_contiguous() or c.device != p.device):
        raise ValueError(f"a master correction must be contiguous and on the parameter's device ({p.device}), "
                         f"got {'a strided one' if c.device == p.device else c.device}")  # fmt: skip


def _on_device_of(p: torch.Tensor):
    """Triton launches on the current device and stream: make them ``p``'s (a model spread over
    several GPUs has parameters on devices other than the current one)."""
    return torch.cuda.device(p.device) if p.device.type == "cuda" else contextlib.nullcontext()


def _update(rule, p, g, slots, hp, skip_nonfinite, weights) -> UpdateResult:
    step = Step(rule, p, g, slots, hp, skip_nonfinite, weights)
    if step.spec.trust:
        step.trust = step.trust_ratio()
    if step.layout == WHOLE_TENSOR_8BIT.value:
        new_scales = step.peaks()
        step.run(STEP_PASS, new_scales=new_scales)
        for i, slot in enumerate(slots):
            slot.absmax.copy_(new_scales[i])
    else:
        step.run(STEP_PASS)
    return UpdateResult(skipped_blocks=step.skipped[0] if skip_nonfinite else 0)  # read by the optimizer once per step


def update_many(jobs: list[Job]) -> list[UpdateResult]:
    """``update(*job)`` for every job (the reference's where this backend has no kernel), the
    small tensors of like jobs in one launch per kind (``batch``). A job refused is refused
    before any is done."""
    for job in jobs:
        check_weights(job.p, job.weights)
    results: list[UpdateResult | None] = [None] * len(jobs)
    batches: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        if not supports(job.rule, job.p, job.slots):
            results[i] = reference.update(*job)
            continue
        key = batch.batch_key(job)
        if key is None:
            results[i] = update(*job)
        else:
            batches.setdefault(key, []).append(i)
    for indices in batches.values():
        if len(indices) == 1:  # a launch of its own needs no table
            results[indices[0]] = update(*jobs[indices[0]])
            continue
        with _on_device_of(jobs[indices[0]].p):  # the batch key includes the device
            counts = batch.run([jobs[i] for i in indices])
        for i, count in zip(indices, counts):
            results[i] = UpdateResult(skipped_blocks=count if jobs[i].skip_nonfinite else 0)
    return results


def trust_ratio(
    rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True,
    weights: WeightFormat = NEAREST,
) -> TrustRatio:
    """LAMB's or LARS's trust ratio for this step, as device scalars (nothing is written):
    ``reference.trust_ratio`` on the device (of the master, where ``p`` has one)."""
    check_weights(p, weights)
    if not supports(rule, p, slots) or not RULES[rule].trust:
        raise ValueError(f"the Triton backend has no trust ratio for rule {rule!r} with these states")
    return Step(rule, p, g, slots, hp, skip_nonfinite, weights).trust_ratio()


class Step:
    """The launches of one step of one parameter: the kernel arguments every pass shares."""

    def __init__(self, rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool,
                 weights: WeightFormat = NEAREST):  # fmt: skip
        self.rule, self.spec = rule, RULES[rule]
        self.p, self.g, self.slots, self.hp, self.skip_nonfinite = p, g, slots, hp, skip_nonfinite
        self.weights = weights
        self.layout = layout_of(slots[0])
        self.n = p.numel()
        self.n_blocks = triton.cdiv(self.n, BLOCK)
        self.rows = rows_per_program(self.n_blocks)
        self.programs = triton.cdiv(self.n_blocks, self.rows)
        self.skipped = torch.zeros(1, dtype=torch.int64, device=p.device)
        self.trust = None  # TrustRatio, once made
        self.pointer_args = pointer_args(p, g, slots, weights)
        self.draw_args = (*draw_args(weights.draw), *draw_args(state_draw(slots)))  # the weight's, then the states'
        self.scalars, self.flags = step_arguments(self.spec, p, slots, hp, skip_nonfinite, weights)

    def run(self, pass_, new_scales=None, peaks=None, sums=None) -> None:
        """One pass of the block kernel; the buffers a pass does not read get placeholders."""
        trust_factor = None if self.trust is None else self.trust.factor
        buffers = [self.skipped if b is None else b for b in (new_scales, peaks, sums, trust_factor)]
        table = owner = self.skipped  # placeholders: not a batch
        block_kernel[(self.programs,)](*self.pointer_args, *buffers, self.skipped, table, owner, self.n, self.n_blocks,
                                       *self.draw_args, *self.scalars, PASS=pass_.value, ROWS=self.rows, BATCHED=False,
                                       **self.flags, **LAUNCH_OPTIONS)  # fmt: skip

    def peaks(self) -> torch.Tensor:
        """The new one-per-tensor scale of each state (NaN-propagating, like the reference's amax)."""
        peaks = torch.empty((self.programs, self.spec.states), dtype=torch.float32, device=self.p.device)
        self.run(PEAKS_PASS, peaks=peaks)
        return peaks.amax(dim=0)

    def trust_ratio(self) -> TrustRatio:
        """This step's trust ratio (LAMB, LARS), from a norms pass; read by the step pass on the device."""
        sums = torch.empty((self.programs, 2), dtype=torch.float64, device=self.p.device)
        self.run(NORMS_PASS, sums=sums)
        return ratio_from_sums(MATH_SWITCH[self.spec.math], sums, self.hp, SCALAR_LAUNCH_OPTIONS)
