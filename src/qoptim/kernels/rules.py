"""The update rules: one table that says what each rule is, read by every backend and by the optimizers.

A rule's per-element math is written once per backend (``reference.py`` in torch ops, the CPU
backend in Numba, the Triton backend in Triton), each in exactly the same order of float
operations. Everything else about a rule is a fact stated here, once:

- ``states``: how many state slots it keeps, and for each, whether its values are signed (a
  signed quantization map) or never negative (the unsigned map);
- ``decay``: which weight decay it applies (added to the gradient, applied to the parameter,
  or either, as the optimizer says);
- ``trust``: whether it scales its step by a layer-wise trust ratio (LAMB, LARS), which needs a
  pass over the whole tensor first;
- ``scalars``: the host-side constants its fused kernels take, as one named ``Scalars``, each
  computed in double precision exactly as ``reference.py`` writes it (a backend rounds each to
  float32, as torch rounds a Python scalar operand of a float32 tensor);
- ``math``: the name of the per-element function it runs (LARS runs momentum's).

A new rule is one ``RuleSpec`` line here and its scalars function, its math in each backend
(each backend checks at import that it covers ``RULES`` exactly), and a family in ``qoptim.optim``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .types import Hyper

__all__ = ["Decay", "DecayMode", "RULES", "RuleSpec", "Scalars", "Switches", "decay_of", "switches"]


class Decay(enum.IntEnum):
    """The weight decay of one step, as the kernels take it (a compile-time switch on Triton)."""

    NONE = 0
    L2 = 1  # weight_decay * p added to the gradient (Adam, SGD, ...)
    DECOUPLED = 2  # the parameter shrunk by (1 - lr * weight_decay), or decay added to the direction (LAMB)


class DecayMode(enum.Enum):
    """Which weight decay a rule applies when the step has one."""

    L2 = "l2"
    DECOUPLED = "decoupled"
    EITHER = "either"  # as the optimizer says (``Hyper.decoupled``): Adam vs AdamW, LAMB


class Scalars(NamedTuple):
    """The float constants of one step of a rule, named; a rule reads only its own, the rest keep
    these defaults. Computed in double, as the reference writes each."""

    beta1: float = 0.0  # the first running average's decay: a first moment's; RMSprop: its smoothing; SGD/LARS: the momentum
    one_minus_beta1: float = 0.0
    beta2: float = 0.0  # the second moment's decay; Lion: the momentum's own decay
    one_minus_beta2: float = 0.0
    beta3: float = 0.0  # AdEMAMix: the slow momentum's decay
    one_minus_beta3: float = 0.0
    alpha: float = 0.0  # AdEMAMix: the slow momentum's weight
    eps: float = 0.0
    weight_decay: float = 0.0
    decay_factor: float = 1.0  # 1 - lr * weight_decay (decoupled decay)
    step_size: float = 0.0  # the learning rate the update is multiplied by (Adam: bias-corrected)
    bias_correction1: float = 1.0  # AdEMAMix, LAMB
    bias_correction2: float = 1.0  # LAMB
    bias_correction2_sqrt: float = 1.0  # Adam, AdEMAMix
    one_minus_dampening: float = 1.0  # SGD, LARS
    gnorm_scale: float = 1.0  # percentile clipping's gradient multiplier (every rule)


class Switches(NamedTuple):
    """The integer choices of one step of a rule (compile-time switches on Triton)."""

    decay: Decay = Decay.NONE
    trust: bool = False  # scale by the layer-wise trust ratio (LAMB, LARS)
    nesterov: bool = False  # momentum rules only
    first_step: bool = False  # momentum rules only: the buffer starts as the gradient


@dataclass(frozen=True)
class RuleSpec:
    """What an update rule is, to every backend and to the optimizers."""

    signed: tuple[bool, ...]  # per state slot: signed map (True) or unsigned, for values >= 0 (False)
    decay: DecayMode
    scalars: Callable[[Hyper], Scalars]
    math: str  # the per-element function each backend runs (shared by rules that differ only around it)
    trust: bool = False  # a layer-wise trust ratio, from a pass over the whole tensor first

    @property
    def states(self) -> int:
        return len(self.signed)


# ---- each rule's scalars --------------------------------------------------------------------


def _moment_rates(hp: Hyper) -> dict[str, float]:
    """The two moments' decay rates and their complements, as the rules with two moments take them."""
    return dict(beta1=hp.beta1, one_minus_beta1=1.0 - hp.beta1, beta2=hp.beta2, one_minus_beta2=1.0 - hp.beta2)


def adam_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        **_moment_rates(hp),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        decay_factor=1.0 - hp.lr * hp.weight_decay,
        step_size=hp.lr / (1.0 - hp.beta1**hp.step),
        bias_correction2_sqrt=math.sqrt(1.0 - hp.beta2**hp.step),
        gnorm_scale=hp.gnorm_scale,
    )


def ademamix_scalars(hp: Hyper) -> Scalars:
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
        gnorm_scale=hp.gnorm_scale,
    )


def lion_scalars(hp: Hyper) -> Scalars:
    return Scalars(**_moment_rates(hp), decay_factor=1.0 - hp.lr * hp.weight_decay, step_size=hp.lr, gnorm_scale=hp.gnorm_scale)


def momentum_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        beta1=hp.momentum,
        weight_decay=hp.weight_decay,
        one_minus_dampening=1.0 - hp.dampening,
        step_size=hp.lr,
        gnorm_scale=hp.gnorm_scale,
    )


def rmsprop_scalars(hp: Hyper) -> Scalars:
    return Scalars(
        beta1=hp.smoothing,
        one_minus_beta1=1.0 - hp.smoothing,
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        step_size=hp.lr,
        gnorm_scale=hp.gnorm_scale,
    )


def adagrad_scalars(hp: Hyper) -> Scalars:
    lr = hp.lr / (1.0 + (hp.step - 1) * hp.lr_decay)
    return Scalars(eps=hp.eps, weight_decay=hp.weight_decay, step_size=lr, gnorm_scale=hp.gnorm_scale)


def lamb_scalars(hp: Hyper) -> Scalars:
    """The step size is lr * trust ratio: where the trust pass ran on the host (``hp.trust_ratio``
    filled in), this is it; a backend that makes the ratio on the device multiplies there."""
    return Scalars(
        **_moment_rates(hp),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        step_size=hp.lr * hp.trust_ratio,
        bias_correction1=1.0 - hp.beta1**hp.step if hp.bias_correction else 1.0,
        bias_correction2=1.0 - hp.beta2**hp.step if hp.bias_correction else 1.0,
        gnorm_scale=hp.gnorm_scale,
    )


# ---- the table ------------------------------------------------------------------------------

SIGNED, UNSIGNED = True, False

RULES: dict[str, RuleSpec] = {
    "adam": RuleSpec((SIGNED, UNSIGNED), DecayMode.EITHER, adam_scalars, math="adam"),
    # slots: fast momentum, slow momentum, second moment
    "ademamix": RuleSpec((SIGNED, SIGNED, UNSIGNED), DecayMode.DECOUPLED, ademamix_scalars, math="ademamix"),
    "lion": RuleSpec((SIGNED,), DecayMode.DECOUPLED, lion_scalars, math="lion"),
    "momentum": RuleSpec((SIGNED,), DecayMode.L2, momentum_scalars, math="momentum"),
    "lars": RuleSpec((SIGNED,), DecayMode.L2, momentum_scalars, math="momentum", trust=True),
    "rmsprop": RuleSpec((UNSIGNED,), DecayMode.L2, rmsprop_scalars, math="rmsprop"),
    "adagrad": RuleSpec((UNSIGNED,), DecayMode.L2, adagrad_scalars, math="adagrad"),
    "lamb": RuleSpec((SIGNED, UNSIGNED), DecayMode.EITHER, lamb_scalars, math="lamb", trust=True),
}

# The per-element functions every backend writes (one per name; rules may share one).
MATHS: tuple[str, ...] = tuple(dict.fromkeys(spec.math for spec in RULES.values()))
MAX_STATES = max(spec.states for spec in RULES.values())


def decay_of(spec: RuleSpec, hp: Hyper) -> Decay:
    """The weight decay this step of ``spec`` applies."""
    if not hp.weight_decay:
        return Decay.NONE
    if spec.decay is DecayMode.DECOUPLED or (spec.decay is DecayMode.EITHER and hp.decoupled):
        return Decay.DECOUPLED
    return Decay.L2


def switches(spec: RuleSpec, hp: Hyper) -> Switches:
    """The step's integer choices. Nesterov and the first step matter to momentum only, and are
    left off for every other rule (so that no other rule compiles twice on Triton)."""
    momentum = spec.math == "momentum"
    return Switches(
        decay=decay_of(spec, hp),
        trust=spec.trust,
        nesterov=momentum and bool(hp.nesterov),
        first_step=momentum and hp.step == 1,
    )
