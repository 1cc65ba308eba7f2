"""The update rules of the Triton kernels: per-element math on float32 tiles, and the host-side
constants each rule reads.

Device side: one ``@triton.jit`` function per rule of the reference (``reference.RULES``), in
exactly its order of float operations, with division and square root correctly rounded
(``div_rn`` / ``sqrt_rn``: plain ``/`` and ``tl.sqrt`` are approximate on the GPU).
``apply_rule`` picks one by the kernel's ``RULE`` switch (a compile-time constant), as
``cpu._math`` does for the Numba kernels.

Host side: ``FAMILIES`` maps a rule name to its switch, its number of states, and the function
of a ``Hyper`` that gives its ``Scalars``: the kernel's float arguments, each computed in double
exactly as the reference writes it; the launch rounds each to float32, as torch rounds a
Python scalar operand.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import triton
import triton.language as tl

from .types import Hyper

# The rules, a compile-time switch of the kernels (LARS is MOMENTUM with a trust ratio).
ADAM, ADEMAMIX, LION, MOMENTUM, RMSPROP, ADAGRAD, LAMB = (tl.constexpr(i) for i in range(7))

# Weight decay, a compile-time switch: none, added to the gradient (L2), or applied to the parameter.
NO_DECAY, L2_DECAY, DECOUPLED_DECAY = (tl.constexpr(i) for i in range(3))


class Scalars(NamedTuple):
    """The kernels' float arguments, in their order; a rule reads only its own, the rest keep
    these defaults."""

    beta1: float = 0.0  # RMSprop: its alpha
    one_minus_beta1: float = 0.0
    beta2: float = 0.0
    one_minus_beta2: float = 0.0
    beta3: float = 0.0  # AdEMAMix
    one_minus_beta3: float = 0.0
    alpha: float = 0.0  # AdEMAMix
    eps: float = 0.0
    weight_decay: float = 0.0
    decay_factor: float = 1.0  # 1 - lr * weight_decay (decoupled decay)
    step_size: float = 0.0  # the learning rate the update is multiplied by (Adam: bias-corrected)
    bias_correction1: float = 1.0  # AdEMAMix, LAMB
    bias_correction2: float = 1.0  # LAMB
    bias_correction2_sqrt: float = 1.0  # Adam, AdEMAMix
    one_minus_dampening: float = 1.0  # SGD, LARS
    gnorm_scale: float = 1.0  # percentile clipping's gradient multiplier (every rule)


# ---- device side: the rules ----------------------------------------------------------------


@triton.jit
def _adam(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size,
          bias_correction2_sqrt, DECAY: tl.constexpr):  # fmt: skip
    """reference.adam."""
    if DECAY == L2_DECAY:
        g = g + p * weight_decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    if DECAY == DECOUPLED_DECAY:
        p = p * decay_factor
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.math.div_rn(m, denom) * step_size
    return p, m, v


@triton.jit
def _ademamix(p, g, m1, m2, nu, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha, eps,
              decay_factor, step_size, bias_correction1, bias_correction2_sqrt, DECAY: tl.constexpr):  # fmt: skip
    """reference.ademamix."""
    m1 = m1 * beta1 + g * one_minus_beta1
    m2 = m2 * beta3 + g * one_minus_beta3
    nu = nu * beta2 + (g * g) * one_minus_beta2
    if DECAY == DECOUPLED_DECAY:
        p = p * decay_factor
    denom = tl.math.div_rn(tl.sqrt_rn(nu), bias_correction2_sqrt) + eps
    p = p - tl.math.div_rn(tl.math.div_rn(m1, bias_correction1) + m2 * alpha, denom) * step_size
    return p, m1, m2, nu


@triton.jit
def _lion(p, g, m, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor, step_size, DECAY: tl.constexpr):
    """reference.lion: the sign comes from the old momentum. torch's sign is (0 < x) - (x < 0):
    +0 for -0 and for NaN."""
    if DECAY == DECOUPLED_DECAY:
        p = p * decay_factor
    u = m * beta1 + g * one_minus_beta1
    sign = tl.where(u > 0, 1.0, 0.0) - tl.where(u < 0, 1.0, 0.0)
    p = p - sign * step_size
    m = m * beta2 + g * one_minus_beta2
    return p, m


@triton.jit
def _momentum(p, g, buf, beta1, weight_decay, one_minus_dampening, step_size, trust_factor, DECAY: tl.constexpr,
              TRUST: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr):  # fmt: skip
    """reference.momentum (SGD; LARS with ``TRUST``). The reference multiplies by the trust ratio
    only where it is not 1; multiplying by 1 changes no bit, so LARS always does."""
    if DECAY == L2_DECAY:
        g = g + p * weight_decay
    if TRUST:
        g = g * trust_factor
    if FIRST_STEP:
        buf = g
    else:
        buf = buf * beta1 + g * one_minus_dampening
    if NESTEROV:
        p = p - (g + buf * beta1) * step_size
    else:
        p = p - buf * step_size
    return p, buf


@triton.jit
def _rmsprop(p, g, square_avg, beta1, one_minus_beta1, eps, weight_decay, step_size, DECAY: tl.constexpr):
    """reference.rmsprop (``beta1`` is its alpha)."""
    if DECAY == L2_DECAY:
        g = g + p * weight_decay
    square_avg = square_avg * beta1 + (g * g) * one_minus_beta1
    p = p - tl.math.div_rn(g, tl.sqrt_rn(square_avg) + eps) * step_size
    return p, square_avg


@triton.jit
def _adagrad(p, g, sum_sq, eps, weight_decay, step_size, DECAY: tl.constexpr):
    """reference.adagrad (``step_size``: the decayed learning rate)."""
    if DECAY == L2_DECAY:
        g = g + p * weight_decay
    sum_sq = sum_sq + g * g
    p = p - tl.math.div_rn(g, tl.sqrt_rn(sum_sq) + eps) * step_size
    return p, sum_sq


@triton.jit
def lamb_direction(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, bias_correction1,
                   bias_correction2, DECAY: tl.constexpr):  # fmt: skip
    """reference.lamb_direction: the update direction and the new moments."""
    if DECAY == L2_DECAY:
        g = g + p * weight_decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    direction = tl.math.div_rn(tl.math.div_rn(m, bias_correction1), tl.sqrt_rn(tl.math.div_rn(v, bias_correction2)) + eps)
    if DECAY == DECOUPLED_DECAY:
        direction = direction + p * weight_decay
    return direction, m, v


@triton.jit
def apply_rule(p, g, s0, s1, s2, trust_factor,
               beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha, eps, weight_decay,
               decay_factor, step_size, bias_correction1, bias_correction2, bias_correction2_sqrt, one_minus_dampening,
               RULE: tl.constexpr, DECAY: tl.constexpr, TRUST: tl.constexpr, NESTEROV: tl.constexpr,
               FIRST_STEP: tl.constexpr):  # fmt: skip
    """New (p, s0, s1, s2) of one tile by ``RULE``; states past the rule's count come back as
    they came. ``trust_factor``: LARS's trust ratio, or LAMB's lr * trust ratio."""
    if RULE == ADAM:
        p, s0, s1 = _adam(p, g, s0, s1, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                          step_size, bias_correction2_sqrt, DECAY)  # fmt: skip
    elif RULE == ADEMAMIX:
        p, s0, s1, s2 = _ademamix(p, g, s0, s1, s2, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3,
                                  one_minus_beta3, alpha, eps, decay_factor, step_size, bias_correction1,
                                  bias_correction2_sqrt, DECAY)  # fmt: skip
    elif RULE == LION:
        p, s0 = _lion(p, g, s0, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor, step_size, DECAY)
    elif RULE == MOMENTUM:
        p, s0 = _momentum(p, g, s0, beta1, weight_decay, one_minus_dampening, step_size, trust_factor, DECAY, TRUST,
                          NESTEROV, FIRST_STEP)  # fmt: skip
    elif RULE == RMSPROP:
        p, s0 = _rmsprop(p, g, s0, beta1, one_minus_beta1, eps, weight_decay, step_size, DECAY)
    elif RULE == ADAGRAD:
        p, s0 = _adagrad(p, g, s0, eps, weight_decay, step_size, DECAY)
    else:
        tl.static_assert(RULE == LAMB)
        direction, s0, s1 = lamb_direction(p, g, s0, s1, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                                           bias_correction1, bias_correction2, DECAY)  # fmt: skip
        p = p - direction * trust_factor
    return p, s0, s1, s2


# ---- host side: each rule's constants ------------------------------------------------------


def _moment_rates(hp: Hyper) -> dict[str, float]:
    """The two moments' decay rates and their complements, as the rules with two moments take them."""
    return dict(beta1=hp.beta1, one_minus_beta1=1.0 - hp.beta1, beta2=hp.beta2, one_minus_beta2=1.0 - hp.beta2)


def _adam_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        **_moment_rates(hp),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        decay_factor=1.0 - hp.lr * hp.weight_decay,
        step_size=hp.lr / (1.0 - hp.beta1**hp.step),
        bias_correction2_sqrt=math.sqrt(1.0 - hp.beta2**hp.step),
    )


def _ademamix_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        **_moment_rates(hp),
        beta3=hp.beta3,
        one_minus_beta3=1.0 - hp.beta3,
        alpha=hp.alpha,
        eps=hp.eps,
        decay_factor=1.0 - hp.lr * hp.weight_decay,
        step_size=hp.lr,
        bias_correction1=1.0 - hp.beta1**hp.step,
        bias_correction2_sqrt=math.sqrt(1.0 - hp.beta2**hp.step),
    )


def _lion_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        **_moment_rates(hp),
        decay_factor=1.0 - hp.lr * hp.weight_decay,
        step_size=hp.lr,
    )


def _momentum_scalars(hp: Hyper) -> Scalars:
    return Scalars(beta1=hp.momentum, weight_decay=hp.weight_decay, one_minus_dampening=1.0 - hp.dampening, step_size=hp.lr)


def _rmsprop_scalars(hp: Hyper) -> Scalars:
    return Scalars(beta1=hp.smoothing, one_minus_beta1=1.0 - hp.smoothing, eps=hp.eps, weight_decay=hp.weight_decay, step_size=hp.lr)


def _adagrad_scalars(hp: Hyper) -> Scalars:
    return Scalars(eps=hp.eps, weight_decay=hp.weight_decay, step_size=hp.lr / (1.0 + (hp.step - 1) * hp.lr_decay))


def _lamb_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        **_moment_rates(hp),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        bias_correction1=1.0 - hp.beta1**hp.step if hp.bias_correction else 1.0,
        bias_correction2=1.0 - hp.beta2**hp.step if hp.bias_correction else 1.0,
    )  # the step size is lr * trust ratio, made on the device (triton_trust)


class Family(NamedTuple):
    """What the host needs to know of a rule to launch it."""

    rule: int  # the RULE switch
    states: int
    scalars: Callable[[Hyper], Scalars]
    decay: str  # which weight decay the rule applies: "l2", "decoupled", or "either" (by Hyper.decoupled)
    trust: bool = False  # a layer-wise trust ratio (LAMB, LARS), from a norm pre-pass


FAMILIES: dict[str, Family] = {
    "adam": Family(ADAM.value, 2, _adam_scalars, "either"),
    "ademamix": Family(ADEMAMIX.value, 3, _ademamix_scalars, "decoupled"),
    "lion": Family(LION.value, 1, _lion_scalars, "decoupled"),
    "momentum": Family(MOMENTUM.value, 1, _momentum_scalars, "l2"),
    "lars": Family(MOMENTUM.value, 1, _momentum_scalars, "l2", trust=True),
    "rmsprop": Family(RMSPROP.value, 1, _rmsprop_scalars, "l2"),
    "adagrad": Family(ADAGRAD.value, 1, _adagrad_scalars, "l2"),
    "lamb": Family(LAMB.value, 2, _lamb_scalars, "either", trust=True),
}


def switches(family: Family, hp: Hyper) -> dict[str, int | bool]:
    """The rule's compile-time switches for this step. Momentum's first-step and Nesterov
    switches are set for momentum only, so that no other rule compiles twice."""
    decay = NO_DECAY
    if hp.weight_decay:
        decoupled = family.decay == "decoupled" or (family.decay == "either" and hp.decoupled)
        decay = DECOUPLED_DECAY if decoupled else L2_DECAY
    momentum = family.rule == MOMENTUM.value
    return dict(
        RULE=family.rule,
        DECAY=decay.value,
        TRUST=family.trust,
        NESTEROV=momentum and bool(hp.nesterov),
        FIRST_STEP=momentum and hp.step == 1,
    )
