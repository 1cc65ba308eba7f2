"""Each update rule's per-element math on float32 tiles, and ``apply_rule``, which picks one.

One ``@triton.jit`` function per math of ``kernels.rules.MATHS`` (LARS runs momentum's), in
exactly the reference's order of float operations (``reference.MATHS``), with division and square
root correctly rounded (``div_rn`` / ``sqrt_rn``: plain ``/`` and ``tl.sqrt`` are approximate on
the GPU). ``apply_rule`` picks one by the kernel's ``RULE`` switch, a compile-time constant made
from ``RuleSpec.math`` by ``MATH_SWITCH``.

Everything else about a rule (its states, weight decay, trust ratio, and the float constants it
reads, ``rules.Scalars``) is ``kernels.rules``'; the launch side is ``launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..rules import MATHS, Decay

# The per-element math, a compile-time switch of the kernels (LARS is MOMENTUM with a trust ratio).
ADAM, ADEMAMIX, LION, MOMENTUM, RMSPROP, ADAGRAD, LAMB = (tl.constexpr(i) for i in range(7))

# RuleSpec.math -> the RULE switch.
MATH_SWITCH: dict[str, int] = {
    "adam": ADAM.value,
    "ademamix": ADEMAMIX.value,
    "lion": LION.value,
    "momentum": MOMENTUM.value,
    "rmsprop": RMSPROP.value,
    "adagrad": ADAGRAD.value,
    "lamb": LAMB.value,
}
assert set(MATH_SWITCH) == set(MATHS), "the Triton kernels must cover kernels.rules.MATHS exactly"

# Weight decay, a compile-time switch with the values of rules.Decay: none, added to the gradient
# (L2), or applied to the parameter (LAMB: added to its direction).
NO_DECAY, L2_DECAY, DECOUPLED_DECAY = (tl.constexpr(int(d)) for d in (Decay.NONE, Decay.L2, Decay.DECOUPLED))


@triton.jit
def _adam(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size,
          bias_correction2_sqrt, DECAY: tl.constexpr):  # fmt: skip
    """reference.adam."""
    if DECAY == L2_DECAY:
        g = g + p * weight_decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * one_minus_beta2) * g
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
    nu = nu * beta2 + (g * one_minus_beta2) * g
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
    square_avg = square_avg * beta1 + (g * one_minus_beta1) * g
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
    v = v * beta2 + (g * one_minus_beta2) * g
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
    they came. ``trust_factor``: LARS's trust ratio, or LAMB's lr * trust ratio, both made on the
    device (``trust``); LAMB never reads ``step_size`` (``rules.lamb_scalars``' lr * ratio, for a
    backend that knows the ratio on the host)."""
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
