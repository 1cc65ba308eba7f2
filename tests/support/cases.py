"""Test cases of the fused backends, made from the one table of rules (``kernels.rules.RULES``):
which rules, state layouts and parameter dtypes to cross; a parameter with fresh states of a rule
in a layout (each state's signed or unsigned map from ``RuleSpec.signed``, as the optimizers
choose it); gradients with NaN and Inf; each rule's hyperparameters, step by step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from qoptim.kernels import rules
from qoptim.kernels.types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot
from qoptim.quant.formats import FORMATS, state_map
from qoptim.quant.maps import signed_map, unsigned_map
from qoptim.quant.master import Draw

from .params import DTYPES

RULES: tuple[str, ...] = tuple(rules.RULES)
TRUST_RULES: tuple[str, ...] = tuple(name for name, spec in rules.RULES.items() if spec.trust)  # a pass for the norms first
# The state layouts: 8-bit in 256-blocks, 8-bit with one scale per tensor, fp32; and 4-bit in
# 128-blocks (``quant.formats``), two states' codes sharing each byte, for the rules with at most two.
LAYOUTS = ("blockwise", "whole_tensor", "fp32")
FOUR_BIT = "fourbit"
FOUR_BIT_RULES: tuple[str, ...] = tuple(name for name, spec in rules.RULES.items() if spec.states <= 2)
PARAM_DTYPES = tuple(DTYPES)


def dtype_id(dtype: torch.dtype) -> str:
    """A test id for a dtype: ``float32``, ``bfloat16``, ..."""
    return str(dtype).removeprefix("torch.")


def fresh(
    rule: str, n: int, layout: str, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, list[StateSlot]]:
    """A random parameter of ``n`` elements and zero states of ``rule`` in ``layout``."""
    p = (torch.randn(n, device=device) * 0.1).to(dtype)
    signed = rules.RULES[rule].signed
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n, device=device)) for _ in signed]
    if layout == FOUR_BIT:
        return p, four_bit_slots(signed, n, device)
    blocksize, scales = (BLOCK, math.ceil(n / BLOCK)) if layout == "blockwise" else (WHOLE_TENSOR, 1)
    slots = []
    for is_signed in signed:
        code = signed_map(device) if is_signed else unsigned_map(device)
        zero = int(torch.searchsorted(code, torch.tensor(0.0, device=device)))  # the code of 0.0
        values = torch.full((n,), zero, dtype=torch.uint8, device=device)
        slots.append(StateSlot(values, code, torch.zeros(scales, device=device), blocksize))
    return p, slots


def four_bit_slots(signed: tuple[bool, ...], n: int, device: torch.device | str = "cpu") -> list[StateSlot]:
    """Zero 4-bit states (at most two): one byte per element, the first state's code in its low 4
    bits and the second's in its high 4, as the optimizers keep them (``optim.state``)."""
    fmt = FORMATS[4]
    codes = [state_map(fmt.map_name(s), device) for s in signed]
    # the code of 0.0 (the zero-free unsigned map's lowest code, which decodes to 0 under a zero scale)
    zeros = [int(torch.searchsorted(code, torch.tensor(0.0, device=device))) for code in codes]
    values = torch.full((n,), sum(z << (4 * i) for i, z in enumerate(zeros)), dtype=torch.uint8, device=device)
    scales = math.ceil(n / fmt.blocksize)
    return [StateSlot(values, code, torch.zeros(scales, device=device), fmt.blocksize, 4 * i) for i, code in enumerate(codes)]


def with_draws(rule: str, slots: list[StateSlot], draw: Draw, signed_too: bool = False) -> list[StateSlot]:
    """``slots`` with ``draw`` on ``rule``'s never-negative states, as the optimizers round a 4-bit
    second moment stochastically (``signed_too``: on every state); the values are the same tensors."""
    signs = rules.RULES[rule].signed
    return [s if signed and not signed_too else dataclasses.replace(s, draw=draw) for s, signed in zip(slots, signs, strict=True)]


def copy_state(p: torch.Tensor, slots: list[StateSlot]) -> tuple[torch.Tensor, list[StateSlot]]:
    """Copies of a parameter and its states' values and scales (the maps are shared, read only;
    states sharing their bytes, as 4-bit ones do, share the copy)."""
    copies: dict[int, torch.Tensor] = {}
    cloned = [StateSlot(copies.setdefault(id(s.values), s.values.clone()), s.code, None if s.absmax is None else s.absmax.clone(),
                        s.blocksize, s.shift, s.draw) for s in slots]  # fmt: skip
    return p.clone(), cloned


def gradient(n: int, dtype: torch.dtype, step: int) -> torch.Tensor:
    """Small random values; on steps 2, 3 and 5 a NaN, an Inf or a -Inf, and on step 5 also a NaN
    three blocks further, at places that move from step to step."""
    g = torch.randn(n) * 0.01
    if step in (2, 3, 5):
        g[(step * 37) % n] = (math.nan, math.inf, -math.inf)[step % 3]
    if step == 5:
        g[(step * 37 + 3 * BLOCK) % n] = math.nan
    return g.to(dtype)


def edge_gradient(n: int, step: int) -> torch.Tensor:
    """Zeros, subnormals, values near the float32 maximum (whose squares overflow), Inf and NaN."""
    g = torch.randn(n) * 1e-3
    tiny = torch.finfo(torch.float32).smallest_normal
    g[0::7] = 0.0
    g[1::7] = tiny * 2.0**-10
    g[2::7] = -tiny * 2.0**-3
    g[3::97] = 3.0e38 if step % 2 else -3.0e38
    if step == 3:
        g[130] = math.inf
        g[600] = math.nan
    return g


# Each rule's hyperparameters for a step, with its options switched on and off from step to step;
# ``common``: the step, eps, weight decay (none on step 4), AdamW's decoupled decay, and
# percentile clipping's gradient scale (on step 3).
def _adam(step: int, common: dict) -> Hyper:  # AdamW on odd steps, Adam's L2 decay on even ones
    return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, **{**common, "decoupled": step % 2 == 1})


def _ademamix(step: int, common: dict) -> Hyper:  # beta3 and alpha as if scheduled
    return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999 - 0.01 / step, alpha=min(5.0, 1.5 * step), **common)


def _lion(step: int, common: dict) -> Hyper:
    return Hyper(lr=1e-4, beta1=0.9, beta2=0.99, **common)


def _momentum(step: int, common: dict) -> Hyper:  # SGD: dampening on odd steps (the first must ignore it), Nesterov on even
    dampening = 0.1 if step % 2 else 0.0
    return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, momentum=0.9, nesterov=step % 2 == 0, dampening=dampening, **common)


def _lars(step: int, common: dict) -> Hyper:  # dampening, and a trust coefficient
    return Hyper(lr=1e-1, beta1=0.0, beta2=0.0, momentum=0.9, dampening=0.1, nesterov=step == 5, trust_coefficient=0.02, **common)


def _rmsprop(step: int, common: dict) -> Hyper:
    return Hyper(lr=1e-3, beta1=0.0, beta2=0.0, smoothing=0.99, **common)


def _adagrad(step: int, common: dict) -> Hyper:
    return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, lr_decay=0.01, **common)


def _lamb(step: int, common: dict) -> Hyper:  # decoupled decay on odd steps; no bias correction on step 2; a cap binding on 3, 5
    caps = {3: 0.05, 4: 10.0, 5: 0.05}
    return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, bias_correction=step != 2, max_unorm=caps.get(step, 0.0),
                 **{**common, "decoupled": step % 2 == 1})  # fmt: skip


STEP_HYPER: dict[str, Callable[[int, dict], Hyper]] = {
    "adam": _adam,
    "ademamix": _ademamix,
    "lion": _lion,
    "momentum": _momentum,
    "lars": _lars,
    "rmsprop": _rmsprop,
    "adagrad": _adagrad,
    "lamb": _lamb,
}
assert set(STEP_HYPER) == set(rules.RULES), "tests/support/cases.py: hyperparameters for every rule of kernels.rules"


def hyper(rule: str, step: int) -> Hyper:
    """``rule``'s hyperparameters for ``step`` (1-based; see ``STEP_HYPER``)."""
    common = dict(step=step, eps=1e-8, weight_decay=0.0 if step == 4 else 0.05, decoupled=True,
                  gnorm_scale=0.37 if step == 3 else 1.0)  # fmt: skip
    return STEP_HYPER[rule](step, common)
