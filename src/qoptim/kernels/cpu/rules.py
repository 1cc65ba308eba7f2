"""Each update rule's per-element math in Numba, op for op as in ``reference.py``, and its marker.

Everything else about a rule (its states, decay, trust ratio, scalars) is in ``kernels.rules``.
A math function is ``(p, g, s0, s1, s2, k) -> (p, s0, s1, s2)`` on float32 scalars (``g``
already scaled by the gradient's scale; states past the rule's count are ignored and returned
as they came), ``k`` the step's ``Constants``: the rule's named ``Scalars``, each rounded to
float32 from the double torch would use (torch casts a Python scalar operand to the float32
tensor's type), its ``Switches``, and LARS's trust ratio. The kernels take the rule's marker
as an argument, so each math is its own compiled (and cached) specialization of the same
kernels; ``math`` picks the function by the marker's type, at compile time.
"""

from __future__ import annotations

import struct
import typing
from typing import NamedTuple

import numpy as np
from numba import njit
from numba.extending import overload

from ..rules import MATHS, MAX_STATES, RULES, Decay, Scalars, Switches, switches
from ..types import Hyper
from .bits import ONE, ZERO
from .jit import KERNEL

__all__ = ["KERNEL_STATES", "MARKERS", "Constants", "constants", "marker_of", "math", "signed_states", "state_count", "trust_term", "unpack"]

# The kernels take three states whatever the rule (stand-ins past its count, which they never
# touch): Numba's drivers cannot take a tuple of them of varying length.
KERNEL_STATES = 3


class Constants(NamedTuple):
    """A step's constants as the math reads them (made inside the kernels by ``unpack``)."""

    scalars: Scalars  # each field a float32
    switches: Switches  # each field an int
    trust: np.float32  # LARS: the trust ratio its gradient is scaled by (LAMB's is in its step size)


def constants(rule: str, hp: Hyper) -> tuple:
    """A step's constants as the kernels take them: plain tuples, which Numba types in C (a
    NamedTuple argument goes through its Python typing, ~2 us more per task call); ``unpack``
    makes them ``Constants`` inside. ``hp.trust_ratio`` already filled in for LAMB and LARS.

    Kept by the exact bits of ``hp`` and the types of its fields (``_HYPER_BITS``: -0.0 is not
    0.0 there, as it is to ``==``, and an np.float32 not its double): the parameters of one step
    share them, and making them takes ~8 us, as much as the update of a small tensor (gradient
    release updates each parameter in a call of its own)."""
    try:
        key = rule, _HYPER_BITS.pack(*hp), tuple(map(type, hp))
    except struct.error:  # (a hyperparameter that is not a number: made every time)
        return _constants(rule, hp)
    made = _MADE.get(key)
    if made is None:
        if len(_MADE) >= 256:
            _MADE.clear()
        made = _MADE[key] = _constants(rule, hp)
    return made


def _constants(rule: str, hp: Hyper) -> tuple:
    spec = RULES[rule]
    return tuple(np.float32(x) for x in spec.scalars(hp)), tuple(int(x) for x in switches(spec, hp)), np.float32(hp.trust_ratio)


# Every field of a Hyper as bits, by its annotation: an int as an int64, a bool as a bool, a float as a double.
_HYPER_BITS = struct.Struct("".join({int: "q", bool: "?", float: "d"}[kind] for kind in typing.get_type_hints(Hyper).values()))
_MADE: dict[tuple, tuple] = {}


@njit(forceinline=True, **KERNEL)
def unpack(packed):
    """The ``Constants`` of the tuples of ``constants``."""
    scalars, flags, trust = packed
    return Constants(Scalars(*scalars), Switches(*flags), trust)


# ---- the math: one function per name of kernels.rules.MATHS, op for op as in reference.py ------


@njit(**KERNEL)
def adam(p, g, m, v, unused, k):
    """reference.adam."""
    c, sw = k.scalars, k.switches
    if sw.decay == Decay.L2:
        g = g + p * c.weight_decay
    m = m * c.beta1 + g * c.one_minus_beta1
    v = v * c.beta2 + (g * c.one_minus_beta2) * g
    if sw.decay == Decay.DECOUPLED:
        p = p * c.decay_factor
    denom = np.sqrt(v) / c.bias_correction2_sqrt + c.eps
    p = p - (m / denom) * c.step_size
    return p, m, v, unused


@njit(**KERNEL)
def ademamix(p, g, m1, m2, nu, k):
    """reference.ademamix."""
    c, sw = k.scalars, k.switches
    m1 = m1 * c.beta1 + g * c.one_minus_beta1
    m2 = m2 * c.beta3 + g * c.one_minus_beta3
    nu = nu * c.beta2 + (g * c.one_minus_beta2) * g
    if sw.decay == Decay.DECOUPLED:
        p = p * c.decay_factor
    denom = np.sqrt(nu) / c.bias_correction2_sqrt + c.eps
    p = p - ((m1 / c.bias_correction1 + m2 * c.alpha) / denom) * c.step_size
    return p, m1, m2, nu


@njit(**KERNEL)
def lion(p, g, m, unused1, unused2, k):
    """reference.lion: the sign comes from the old momentum. torch's sign is
    (0 < x) - (x < 0): +0 for -0 and for NaN."""
    c, sw = k.scalars, k.switches
    if sw.decay == Decay.DECOUPLED:
        p = p * c.decay_factor
    u = m * c.beta1 + g * c.one_minus_beta1
    sign = (ONE if ZERO < u else ZERO) - (ONE if u < ZERO else ZERO)
    p = p - sign * c.step_size
    m = m * c.beta2 + g * c.one_minus_beta2
    return p, m, unused1, unused2


@njit(**KERNEL)
def momentum(p, g, buf, unused1, unused2, k):
    """reference.momentum (SGD; LARS with its trust ratio). The reference scales by the ratio
    only where it is not 1; multiplying by 1 changes no bit, so LARS always does."""
    c, sw = k.scalars, k.switches
    if sw.decay == Decay.L2:
        g = g + p * c.weight_decay
    if sw.trust:
        g = g * k.trust
    if sw.first_step:
        buf = g
    else:
        buf = buf * c.beta1 + g * c.one_minus_dampening
    step = g + buf * c.beta1 if sw.nesterov else buf
    p = p - step * c.step_size
    return p, buf, unused1, unused2


@njit(**KERNEL)
def rmsprop(p, g, square_avg, unused1, unused2, k):
    """reference.rmsprop (its smoothing is ``beta1``)."""
    c, sw = k.scalars, k.switches
    if sw.decay == Decay.L2:
        g = g + p * c.weight_decay
    square_avg = square_avg * c.beta1 + (g * c.one_minus_beta1) * g
    p = p - (g / (np.sqrt(square_avg) + c.eps)) * c.step_size
    return p, square_avg, unused1, unused2


@njit(**KERNEL)
def adagrad(p, g, sum_sq, unused1, unused2, k):
    """reference.adagrad."""
    c, sw = k.scalars, k.switches
    if sw.decay == Decay.L2:
        g = g + p * c.weight_decay
    sum_sq = sum_sq + g * g
    p = p - (g / (np.sqrt(sum_sq) + c.eps)) * c.step_size
    return p, sum_sq, unused1, unused2


@njit(**KERNEL)
def lamb(p, g, m, v, unused, k):
    """reference.lamb; its step size is lr * trust ratio."""
    direction, m, v = lamb_direction(p, g, m, v, k)
    p = p - direction * k.scalars.step_size
    return p, m, v, unused


@njit(**KERNEL)
def lamb_direction(p, g, m, v, k):
    """reference.lamb_direction: the update direction and the new moments."""
    c, sw = k.scalars, k.switches
    if sw.decay == Decay.L2:
        g = g + p * c.weight_decay
    m = m * c.beta1 + g * c.one_minus_beta1
    v = v * c.beta2 + (g * c.one_minus_beta2) * g
    direction = (m / c.bias_correction1) / (np.sqrt(v / c.bias_correction2) + c.eps)
    if sw.decay == Decay.DECOUPLED:
        direction = direction + p * c.weight_decay
    return direction, m, v


# ---- markers --------------------------------------------------------------------------------


class AdamMath(NamedTuple):
    """Marker argument of a math's specialization (one NamedTuple class per math); ``states``
    is how many states the rules with this math keep."""

    states: int


class AdEMAMixMath(NamedTuple):
    states: int


class LionMath(NamedTuple):
    states: int


class MomentumMath(NamedTuple):
    states: int


class RMSpropMath(NamedTuple):
    states: int


class AdagradMath(NamedTuple):
    states: int


class LAMBMath(NamedTuple):
    states: int


# math name (kernels.rules.MATHS) -> (its marker class, its function)
_TABLE = {
    "adam": (AdamMath, adam),
    "ademamix": (AdEMAMixMath, ademamix),
    "lion": (LionMath, lion),
    "momentum": (MomentumMath, momentum),
    "rmsprop": (RMSpropMath, rmsprop),
    "adagrad": (AdagradMath, adagrad),
    "lamb": (LAMBMath, lamb),
}
assert set(_TABLE) == set(MATHS), "the CPU kernels must cover kernels.rules.MATHS exactly"
assert MAX_STATES <= KERNEL_STATES
_STATES = {spec.math: spec.states for spec in RULES.values()}
assert all(RULES[name].states == _STATES[spec.math] for name, spec in RULES.items()), "rules that share a math keep as many states"
# per kernel state slot: may the state be negative (kernels.rules.RuleSpec.signed); stand-ins past
# the rule's count are never written, and count as signed
_SIGNED = {spec.math: spec.signed + (True,) * (KERNEL_STATES - spec.states) for spec in RULES.values()}
assert all(spec.signed == _SIGNED[spec.math][: spec.states] for spec in RULES.values()), "rules that share a math share their maps"

MARKERS: dict[str, NamedTuple] = {name: marker(_STATES[name]) for name, (marker, _) in _TABLE.items()}
_FUNCTIONS = {marker: fn for marker, fn in _TABLE.values()}


def marker_of(rule: str) -> NamedTuple:
    """The marker the kernels take for ``rule`` (a name of kernels.rules.RULES)."""
    return MARKERS[RULES[rule].math]


def math(rule, p, g, s0, s1, s2, k):
    """The per-element function of ``rule`` (a marker), chosen at compile time."""


def state_count(rule):
    """How many states ``rule`` (a marker) keeps, as a compile-time constant."""


def signed_states(rule):
    """Per kernel state slot, whether ``rule``'s (a marker) state there may be negative
    (``kernels.rules.RuleSpec.signed``), as compile-time constants: a never-negative state
    never rounds a positive value to code 0 (``quant.blockwise.raise_positive_from_zero``)."""


def trust_term(rule, p, g, s0, s1, k):
    """The second trust term of an element (the first is the parameter): LAMB's direction,
    LARS's gradient (reference.TRUST_RATIOS)."""


@overload(state_count)
def _state_count_impl(rule):
    kind = getattr(rule, "instance_class", None)
    if kind not in _FUNCTIONS:
        return None
    count = _STATES[next(name for name, (marker, _) in _TABLE.items() if marker is kind)]
    return lambda rule: count


@overload(signed_states)
def _signed_states_impl(rule):
    kind = getattr(rule, "instance_class", None)
    if kind not in _FUNCTIONS:
        return None
    signed = _SIGNED[next(name for name, (marker, _) in _TABLE.items() if marker is kind)]
    return lambda rule: signed


@overload(math)
def _math_impl(rule, p, g, s0, s1, s2, k):
    fn = _FUNCTIONS.get(getattr(rule, "instance_class", None))
    if fn is None:
        return None
    return lambda rule, p, g, s0, s1, s2, k: fn(p, g, s0, s1, s2, k)


@overload(trust_term)
def _trust_term_impl(rule, p, g, s0, s1, k):
    kind = getattr(rule, "instance_class", None)
    if kind is LAMBMath:
        return lambda rule, p, g, s0, s1, k: lamb_direction(p, g, s0, s1, k)[0]
    if kind is MomentumMath:  # LARS
        return lambda rule, p, g, s0, s1, k: g
    return None
