"""The reference backend: every update in plain torch ops, on any device.

It is the oracle that the fused kernels are tested against, so it is written to be read:
one small function of fp32 tensors per update rule, and one driver that loads a chunk of a
parameter's states, applies the rule and stores the result. Work goes chunk by chunk so a
step never allocates fp32 temporaries the size of a whole large parameter.

Per chunk, in this order (bitsandbytes' order):
  1. dequantize each state with its old scale,
  2. update parameter and states in fp32 (the rule),
  3. take each block's new scale from the updated fp32 state,
  4. requantize.
The parameter update uses the unquantized fp32 states of step 2.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..quant.blockwise import block_absmax, dequantize_flat, quantize_with_absmax
from .types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, UpdateResult

# Elements per chunk: a multiple of every block size, 4 MB per fp32 temporary.
CHUNK = 1 << 20

Rule = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], Hyper], None]


def adam(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """Adam / AdamW on fp32 tensors, in place (torch.optim.Adam's formula, bias-corrected)."""
    m, v = states
    if hp.weight_decay and not hp.decoupled:
        g = g + p * hp.weight_decay
    m.mul_(hp.beta1).add_(g * (1.0 - hp.beta1))
    v.mul_(hp.beta2).add_((g * g).mul_(1.0 - hp.beta2))
    if hp.weight_decay and hp.decoupled:
        p.mul_(1.0 - hp.lr * hp.weight_decay)
    step_size = hp.lr / (1.0 - hp.beta1**hp.step)
    bias_correction2_sqrt = math.sqrt(1.0 - hp.beta2**hp.step)
    denom = v.sqrt().div_(bias_correction2_sqrt).add_(hp.eps)
    p.sub_((m / denom).mul_(step_size))


RULES: dict[str, tuple[Rule, int]] = {
    # name: (update math, number of states)
    "adam": (adam, 2),
}


def update(
    rule: str,
    p: torch.Tensor,
    g: torch.Tensor,
    slots: list[StateSlot],
    hp: Hyper,
    skip_nonfinite: bool = True,
) -> UpdateResult:
    """One optimizer step of a flat contiguous parameter ``p`` with gradient ``g``.

    With ``skip_nonfinite``, every 256-block whose gradient holds a NaN or Inf keeps its
    parameter values and states exactly as they were.
    """
    math_fn, n_states = RULES[rule]
    if len(slots) != n_states:
        raise ValueError(f"rule {rule!r} keeps {n_states} states, got {len(slots)}")
    n = p.numel()
    whole = [i for i, s in enumerate(slots) if s.quantized and s.blocksize == WHOLE_TENSOR]
    new_scales: dict[int, torch.Tensor] = {}
    if whole:
        # One scale for the whole tensor: it must be known before any element is requantized.
        peaks = {i: [] for i in whole}
        for start in range(0, n, CHUNK):
            _, states, _ = _step_chunk(math_fn, p, g, slots, hp, start, min(n, start + CHUNK), skip_nonfinite)
            for i in whole:
                peaks[i].append(states[i].abs().amax())
        new_scales = {i: torch.stack(peaks[i]).amax().reshape(1) for i in whole}

    skipped = 0
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        p32, states, bad = _step_chunk(math_fn, p, g, slots, hp, start, end, skip_nonfinite)
        p[start:end].copy_(p32)
        for i, (slot, values) in enumerate(zip(slots, states)):
            _store(slot, values, start, end, bad, new_scales.get(i))
        if bad is not None:
            skipped += int(bad.sum())
    for i, scale in new_scales.items():
        slots[i].absmax.copy_(scale)
    return UpdateResult(skipped_blocks=skipped)


def _step_chunk(math_fn, p, g, slots, hp, start, end, skip_nonfinite):
    """Updated fp32 parameter and states of elements [start, end), and the mask of skipped
    256-blocks (None if none). Writes nothing."""
    p_old = p[start:end].float()
    g32 = g[start:end].float()
    old = [_load(slot, start, end) for slot in slots]
    bad = _nonfinite_blocks(g32) if skip_nonfinite else None
    if bad is not None and not bool(bad.any()):
        bad = None
    if hp.gnorm_scale != 1.0:
        g32 = g32 * hp.gnorm_scale
    p32 = p_old.clone()
    states = [s.clone() for s in old]
    math_fn(p32, g32, states, hp)
    if bad is not None:
        keep = _per_element(bad, end - start)
        p32 = torch.where(keep, p_old, p32)
        states = [torch.where(keep, o, s) for o, s in zip(old, states)]
    return p32, states, bad


def _load(slot: StateSlot, start: int, end: int) -> torch.Tensor:
    """fp32 values of a state's elements [start, end)."""
    values = slot.values[start:end]
    if not slot.quantized:
        return values.float()
    if slot.blocksize == WHOLE_TENSOR:
        return slot.code[values.long()] * slot.absmax[0]
    _check_blocksize(slot)
    blocks = slice(start // slot.blocksize, -(-end // slot.blocksize))
    return dequantize_flat(values, slot.absmax[blocks], slot.code, slot.blocksize)


def _store(slot: StateSlot, new: torch.Tensor, start: int, end: int, bad, whole_scale) -> None:
    """Write fp32 values back into a state's elements [start, end); skipped blocks keep
    their bytes and scales."""
    target = slot.values[start:end]
    if not slot.quantized:
        target.copy_(new)
        return
    if slot.blocksize == WHOLE_TENSOR:
        target.copy_(quantize_with_absmax(new, whole_scale, slot.code, end - start))
        return
    blocks = slice(start // slot.blocksize, -(-end // slot.blocksize))
    scales = block_absmax(new, slot.blocksize)
    codes = quantize_with_absmax(new, scales, slot.code, slot.blocksize)
    if bad is not None:
        scales = torch.where(bad, slot.absmax[blocks], scales)
        codes = torch.where(_per_element(bad, end - start), target, codes)
    slot.absmax[blocks] = scales
    target.copy_(codes)


def _nonfinite_blocks(g32: torch.Tensor) -> torch.Tensor:
    """bool per 256-block: does the block's gradient hold a NaN or Inf?"""
    return block_absmax(torch.isfinite(g32).logical_not_().float(), BLOCK) > 0


def _per_element(block_mask: torch.Tensor, n: int) -> torch.Tensor:
    return block_mask.repeat_interleave(BLOCK)[:n]


def _check_blocksize(slot: StateSlot) -> None:
    if slot.blocksize != BLOCK:
        raise ValueError(f"optimizer states are quantized in blocks of {BLOCK}, got blocksize {slot.blocksize}")


def grad_norm_sq(g: torch.Tensor) -> float:
    """Sum of squares of a flat gradient, accumulated in fp32 chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=g.device)
    for start in range(0, g.numel(), CHUNK):
        chunk = g[start : start + CHUNK].float()
        total += torch.dot(chunk, chunk)
    return float(total)
