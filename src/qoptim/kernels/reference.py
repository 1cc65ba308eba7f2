"""The reference backend: every update in plain torch ops, on any device.

It is the oracle that the fused kernels are tested against, so it is written to be read:
one small function of fp32 tensors per update rule, and one driver that loads a chunk of a
parameter's states, applies the rule and stores the result. Work goes chunk by chunk so a
step never allocates fp32 temporaries the size of a whole large parameter.

Per chunk, in this order (bitsandbytes' order):
  1. dequantize each state with its old scale,
  2. update parameter and states in fp32 (the rule),
  3. take each block's new scale from the updated fp32 state,
  4. requantize, to nearest (a never-negative 8-bit state: a positive value never to code 0, see
     ``quant.blockwise.raise_positive_from_zero``; the 4-bit unsigned map has no zero code) or,
     for a slot with a draw, stochastically (``quant.blockwise.quantize_stochastic``).
A state's format (8-bit: 256 codes, blocks of 256; 4-bit: 16 codes in half a byte, blocks of 128)
is ``quant.formats``'s; the slot says which (``StateSlot.bits``, ``shift``).
The parameter update uses the unquantized fp32 states of step 2. A bf16 / fp16 parameter with a
master correction is read as its fp32 master and written as the encoded pair; one without is
written rounded to nearest even, or stochastically (``types.WeightFormat``, ``quant.master``).

A squared gradient scaled by a constant is computed as ``(g * c) * g``, torch's order in
``addcmul_(g, g, value=c)`` (and bitsandbytes' CUDA kernel's): ``g * g`` first would overflow
float32 for |g| > 1.8e19, where torch's order holds up to |g| ~ 5e20 at c = 1e-3.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..quant import master
from ..quant.blockwise import block_absmax, dequantize_flat, quantize_stochastic, quantize_with_absmax, raise_positive_from_zero
from ..quant.formats import FORMATS
from . import rules
from .types import BLOCK, NEAREST, WHOLE_TENSOR, Hyper, StateSlot, UpdateResult, WeightFormat

# Elements per chunk: a multiple of every block size, 4 MB per fp32 temporary.
CHUNK = 1 << 20

Rule = Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor], Hyper], None]


def sqrt(t: torch.Tensor) -> torch.Tensor:
    """``t``'s square roots, correctly rounded, as the fused kernels' (and CUDA's): torch's CPU float32
    ``sqrt`` is one ulp off for some inputs on some CPUs (an Intel Xeon, torch 2.13: 1 element in ~400
    of a fresh Adam step). float64's, rounded to float32, is exact (a float32's root is never within
    2**-50 of a float32 rounding boundary, and float64's error is below 2**-53)."""
    if t.is_cpu and t.dtype == torch.float32:
        return t.double().sqrt_().float()
    return t.sqrt()


def adam(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """Adam / AdamW on fp32 tensors, in place (torch.optim.Adam's formula, bias-corrected)."""
    m, v = states
    if hp.weight_decay and not hp.decoupled:
        g = g + p * hp.weight_decay
    m.mul_(hp.beta1).add_(g * (1.0 - hp.beta1))
    v.mul_(hp.beta2).add_((g * (1.0 - hp.beta2)).mul_(g))
    if hp.weight_decay and hp.decoupled:
        p.mul_(1.0 - hp.lr * hp.weight_decay)
    step_size = hp.lr / (1.0 - hp.beta1**hp.step)
    bias_correction2_sqrt = math.sqrt(1.0 - hp.beta2**hp.step)
    denom = sqrt(v).div_(bias_correction2_sqrt).add_(hp.eps)
    p.sub_((m / denom).mul_(step_size))


def ademamix(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """AdEMAMix (Pagliardini et al., 2024): Adam plus a slow momentum ``m2`` weighted by alpha."""
    m1, m2, nu = states
    m1.mul_(hp.beta1).add_(g * (1.0 - hp.beta1))
    m2.mul_(hp.beta3).add_(g * (1.0 - hp.beta3))
    nu.mul_(hp.beta2).add_((g * (1.0 - hp.beta2)).mul_(g))
    if hp.weight_decay:
        p.mul_(1.0 - hp.lr * hp.weight_decay)
    bias_correction1 = 1.0 - hp.beta1**hp.step
    bias_correction2_sqrt = math.sqrt(1.0 - hp.beta2**hp.step)
    denom = sqrt(nu).div_(bias_correction2_sqrt).add_(hp.eps)
    p.sub_((m1 / bias_correction1).add_(m2 * hp.alpha).div_(denom).mul_(hp.lr))


def lion(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """Lion (Chen et al., 2023): the sign of an interpolation of momentum and gradient."""
    (m,) = states
    if hp.weight_decay:
        p.mul_(1.0 - hp.lr * hp.weight_decay)
    p.sub_((m * hp.beta1).add_(g * (1.0 - hp.beta1)).sign_().mul_(hp.lr))
    m.mul_(hp.beta2).add_(g * (1.0 - hp.beta2))


def momentum(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """SGD with momentum (torch.optim.SGD's formula); LARS scales the gradient term by its
    trust ratio (1 for SGD) before it enters the momentum."""
    (buf,) = states
    if hp.weight_decay:
        g = g + p * hp.weight_decay
    if hp.trust_ratio != 1.0:
        g = g * hp.trust_ratio
    if hp.step == 1:
        buf.copy_(g)
    else:
        buf.mul_(hp.momentum).add_(g * (1.0 - hp.dampening))
    step = g + buf * hp.momentum if hp.nesterov else buf
    p.sub_(step * hp.lr)


def rmsprop(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """RMSprop (torch.optim.RMSprop's formula, not centered)."""
    (square_avg,) = states
    if hp.weight_decay:
        g = g + p * hp.weight_decay
    square_avg.mul_(hp.smoothing).add_((g * (1.0 - hp.smoothing)).mul_(g))
    p.sub_((g / sqrt(square_avg).add_(hp.eps)).mul_(hp.lr))


def adagrad(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    """Adagrad (torch.optim.Adagrad's formula)."""
    (sum_sq,) = states
    if hp.weight_decay:
        g = g + p * hp.weight_decay
    lr = hp.lr / (1.0 + (hp.step - 1) * hp.lr_decay)
    sum_sq.add_(g * g)
    p.sub_((g / sqrt(sum_sq).add_(hp.eps)).mul_(lr))


def lamb_direction(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> torch.Tensor:
    """LAMB's per-element update direction (You et al., 2020): Adam's, plus decoupled decay.
    Updates the moments in place."""
    m, v = states
    if hp.weight_decay and not hp.decoupled:
        g = g + p * hp.weight_decay
    m.mul_(hp.beta1).add_(g * (1.0 - hp.beta1))
    v.mul_(hp.beta2).add_((g * (1.0 - hp.beta2)).mul_(g))
    bias_correction1 = 1.0 - hp.beta1**hp.step if hp.bias_correction else 1.0
    bias_correction2 = 1.0 - hp.beta2**hp.step if hp.bias_correction else 1.0
    direction = (m / bias_correction1).div_(sqrt(v / bias_correction2).add_(hp.eps))
    if hp.weight_decay and hp.decoupled:
        direction.add_(p * hp.weight_decay)
    return direction


def lamb(p: torch.Tensor, g: torch.Tensor, states: list[torch.Tensor], hp: Hyper) -> None:
    p.sub_(lamb_direction(p, g, states, hp).mul_(hp.lr * hp.trust_ratio))


def lamb_trust_terms(p, g, states, hp):
    """The vectors whose norms make LAMB's trust ratio: the parameter and the update direction."""
    return p, lamb_direction(p, g, states, hp)


def lamb_trust_ratio(p_norm: float, direction_norm: float, hp: Hyper) -> float:
    """|p| / |u| (1 when either is 0), at most ``max_unorm`` when that is > 0. At the default cap
    of 1 (the update never grows beyond Adam's) this is bitsandbytes' 32-bit LAMB step, whose
    ``max_unorm`` caps |u| at max_unorm * |p|: the same thing when it is 1."""
    ratio = p_norm / direction_norm if p_norm > 0 and direction_norm > 0 else 1.0
    return min(ratio, hp.max_unorm) if hp.max_unorm > 0 else ratio


def lars_trust_terms(p, g, states, hp):
    """The vectors whose norms make LARS's local learning rate: the parameter and the gradient."""
    return p, g


def lars_trust_ratio(p_norm: float, g_norm: float, hp: Hyper) -> float:
    """LARS (You et al., 2017): eta * |p| / (|g| + weight_decay * |p|), eta = ``trust_coefficient``."""
    denominator = g_norm + hp.weight_decay * p_norm
    return hp.trust_coefficient * p_norm / denominator if p_norm > 0 and denominator > 0 else 1.0


# The per-element math of each rule's ``math`` name (``rules.RULES``: LARS runs momentum's).
MATHS: dict[str, Rule] = {
    "adam": adam,
    "ademamix": ademamix,  # slots: fast momentum, slow momentum, second moment
    "lion": lion,
    "momentum": momentum,
    "rmsprop": rmsprop,
    "adagrad": adagrad,
    "lamb": lamb,
}
assert set(MATHS) == set(rules.MATHS), "reference.MATHS must cover kernels.rules.MATHS exactly"

# Layer-wise rules: (vectors whose norms are needed, ratio from those norms). Their step needs
# one more pass first, over the whole tensor, to know the ratio.
TRUST_RATIOS = {
    "lamb": (lamb_trust_terms, lamb_trust_ratio),
    "lars": (lars_trust_terms, lars_trust_ratio),
}
assert set(TRUST_RATIOS) == {name for name, spec in rules.RULES.items() if spec.trust}


def update(
    rule: str,
    p: torch.Tensor,
    g: torch.Tensor,
    slots: list[StateSlot],
    hp: Hyper,
    skip_nonfinite: bool = True,
    weights: WeightFormat = NEAREST,
) -> UpdateResult:
    """One optimizer step of a flat contiguous parameter ``p`` with gradient ``g``.

    With ``skip_nonfinite``, every 256-block whose gradient holds a NaN or Inf keeps its
    parameter values and states exactly as they were.
    """
    check_weights(p, weights)
    check_draws(slots)
    spec = rules.RULES[rule]
    math_fn, n_states = MATHS[spec.math], spec.states
    if len(slots) != n_states:
        raise ValueError(f"rule {rule!r} keeps {n_states} states, got {len(slots)}")
    n = p.numel()
    if rule in TRUST_RATIOS:
        hp = hp._replace(trust_ratio=trust_ratio(rule, p, g, slots, hp, skip_nonfinite, weights))
    whole = [i for i, s in enumerate(slots) if s.quantized and s.blocksize == WHOLE_TENSOR]
    new_scales: dict[int, torch.Tensor] = {}
    if whole:
        # One scale for the whole tensor: it must be known before any element is requantized.
        peaks = {i: [] for i in whole}
        for start in range(0, n, CHUNK):
            _, states, _ = _step_chunk(math_fn, p, g, slots, hp, start, min(n, start + CHUNK), skip_nonfinite, weights)
            for i in whole:
                peaks[i].append(states[i].abs().amax())
        new_scales = {i: torch.stack(peaks[i]).amax().reshape(1) for i in whole}

    skipped = 0
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        p32, states, bad = _step_chunk(math_fn, p, g, slots, hp, start, end, skip_nonfinite, weights)
        _store_param(p, weights, p32, start, end)
        for i, (slot, values) in enumerate(zip(slots, states)):
            _store(slot, values, start, end, bad, new_scales.get(i), signed=spec.signed[i])
        if bad is not None:
            skipped += int(bad.sum())
    for i, scale in new_scales.items():
        slots[i].absmax.copy_(scale)
    return UpdateResult(skipped_blocks=skipped)


def trust_ratio(rule: str, p, g, slots, hp: Hyper, skip_nonfinite: bool, weights: WeightFormat = NEAREST) -> float:
    """The layer-wise ratio of LAMB / LARS from norms over the whole tensor (skipped blocks
    left out); nothing is written."""
    terms_fn, ratio_fn = TRUST_RATIOS[rule]
    sums = torch.zeros(2, dtype=torch.float64, device=p.device)
    for start in range(0, p.numel(), CHUNK):
        end = min(p.numel(), start + CHUNK)
        p32, g32 = _load_param(p, weights, start, end), g[start:end].float()
        if hp.gnorm_scale != 1.0:
            g32 = g32 * hp.gnorm_scale
        states = [_load(slot, start, end).clone() for slot in slots]  # the rule may update them in place
        a, b = terms_fn(p32, g32, states, hp)
        if skip_nonfinite:
            good = _per_element(_nonfinite_blocks(g[start:end].float()).logical_not_(), end - start)
            a, b = a * good, torch.where(good, b, 0.0)
        sums += torch.stack([a.double().square().sum(), b.double().square().sum()])
    a_norm, b_norm = sums.sqrt().tolist()
    return ratio_fn(a_norm, b_norm, hp)


def _step_chunk(math_fn, p, g, slots, hp, start, end, skip_nonfinite, weights):
    """Updated fp32 parameter and states of elements [start, end), and the mask of skipped
    256-blocks (None if none). Writes nothing."""
    p_old = _load_param(p, weights, start, end)
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


def check_weights(p: torch.Tensor, weights: WeightFormat) -> None:
    """A correction has p's size and a 16-bit p; a master and stochastic rounding exclude each other."""
    if weights.correction is not None:
        if p.dtype not in master.HALF_PRECISION:
            raise ValueError(f"a master correction belongs to a bfloat16 or float16 parameter, not {p.dtype}")
        if weights.correction.numel() != p.numel() or weights.correction.dtype not in master.CORRECTION_DTYPES.values():
            raise ValueError(f"a master correction is int8 or int16 of the parameter's {p.numel()} elements, "
                             f"got {weights.correction.dtype} of {weights.correction.numel()}")  # fmt: skip
        if weights.draw is not None:
            raise ValueError("a parameter with a master correction is not rounded stochastically")


def check_draws(slots: list[StateSlot]) -> None:
    """Stochastic rounding is of block-wise codes: a draw on another slot is refused."""
    for slot in slots:
        if slot.draw is not None and (not slot.quantized or slot.blocksize == WHOLE_TENSOR):
            raise ValueError("a state rounded stochastically (a slot's draw) must be quantized block-wise")


def _load_param(p: torch.Tensor, weights: WeightFormat, start: int, end: int) -> torch.Tensor:
    """fp32 values of the parameter's elements [start, end): its master, where it has one."""
    if weights.correction is None:
        return p[start:end].float()
    return master.decode(p[start:end], weights.correction[start:end])


def _store_param(p: torch.Tensor, weights: WeightFormat, p32: torch.Tensor, start: int, end: int) -> None:
    """Write the updated fp32 values of elements [start, end) into the parameter (and its correction)."""
    if p.dtype == torch.float32:
        p[start:end].copy_(p32)
    elif weights.correction is not None:
        correction = weights.correction[start:end]
        w, c = master.encode(p32, p.dtype, master.bits_of(correction.dtype))
        p[start:end].copy_(w)
        correction.copy_(c)
    elif weights.draw is not None:
        draw = weights.draw._replace(first_index=weights.draw.first_index + start)
        p[start:end].copy_(master.stochastic_round(p32, p.dtype, draw))
    else:
        p[start:end].copy_(p32)


def _load(slot: StateSlot, start: int, end: int) -> torch.Tensor:
    """fp32 values of a state's elements [start, end)."""
    values = slot.values[start:end]
    if not slot.quantized:
        return values.float()
    codes = _codes_of(slot, values)
    if slot.blocksize == WHOLE_TENSOR:
        return slot.code[codes.long()] * slot.absmax[0]
    _check_blocksize(slot)
    blocks = slice(start // slot.blocksize, -(-end // slot.blocksize))
    return dequantize_flat(codes, slot.absmax[blocks], slot.code, slot.blocksize)


def _codes_of(slot: StateSlot, values: torch.Tensor) -> torch.Tensor:
    """A state's codes in its bytes ``values`` (4-bit codes: the 4 bits from ``shift`` up)."""
    return values if slot.bits == 8 else (values >> slot.shift) & 0xF


def _with_codes(slot: StateSlot, values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The bytes ``values`` holding ``codes`` in this state's bits, the other bits as they were."""
    if slot.bits == 8:
        return codes
    return (values & (0xF0 >> slot.shift)) | (codes << slot.shift)


def _store(slot: StateSlot, new: torch.Tensor, start: int, end: int, bad, whole_scale, *, signed: bool) -> None:
    """Write fp32 values back into a state's elements [start, end); skipped blocks keep
    their bytes and scales. ``signed``: the rule's state may be negative (``RuleSpec.signed``);
    a never-negative one never rounds a positive value to code 0."""
    target = slot.values[start:end]
    if not slot.quantized:
        target.copy_(new)
        return
    if slot.blocksize == WHOLE_TENSOR:
        codes = quantize_with_absmax(new, whole_scale, slot.code, end - start)
        target.copy_(codes if signed else raise_positive_from_zero(codes, new))
        return
    blocks = slice(start // slot.blocksize, -(-end // slot.blocksize))
    scales = block_absmax(new, slot.blocksize)
    if slot.draw is not None:
        draw = slot.draw._replace(first_index=slot.draw.first_index + start)
        codes = quantize_stochastic(new, scales, slot.code, slot.blocksize, draw)
    else:
        codes = quantize_with_absmax(new, scales, slot.code, slot.blocksize)
    if not signed and slot.bits == 8:  # (the 4-bit unsigned map has no zero code: formats.FORMATS)
        codes = raise_positive_from_zero(codes, new)
    codes = _with_codes(slot, target, codes)
    if bad is not None:
        scales = torch.where(bad.repeat_interleave(BLOCK // slot.blocksize)[: scales.numel()], slot.absmax[blocks], scales)
        codes = torch.where(_per_element(bad, end - start), target, codes)
    slot.absmax[blocks] = scales
    target.copy_(codes)


def _nonfinite_blocks(g32: torch.Tensor) -> torch.Tensor:
    """bool per 256-block: does the block's gradient hold a NaN or Inf?"""
    return block_absmax(torch.isfinite(g32).logical_not_().float(), BLOCK) > 0


def _per_element(block_mask: torch.Tensor, n: int) -> torch.Tensor:
    return block_mask.repeat_interleave(BLOCK)[:n]


def _check_blocksize(slot: StateSlot) -> None:
    """A state's blocks are its format's (8-bit: 256, 4-bit: 128; ``quant.formats``)."""
    expected = FORMATS[slot.bits].blocksize
    if slot.blocksize != expected:
        raise ValueError(f"{slot.bits}-bit optimizer states are quantized in blocks of {expected}, got blocksize {slot.blocksize}")


def grad_norm_sq(g: torch.Tensor) -> float:
    """Sum of squares of a flat gradient, accumulated in fp32 chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=g.device)
    for start in range(0, g.numel(), CHUNK):
        chunk = g[start : start + CHUNK].float()
        total += torch.dot(chunk, chunk)
    return float(total)
