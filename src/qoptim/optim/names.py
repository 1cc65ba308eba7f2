"""bitsandbytes' optimizer names: the ``optimizer_name`` string that ``Optimizer2State`` and
``Optimizer1State`` take. Each names an update rule of ``qoptim.kernels.rules`` (which says what
the rule is: its states and their maps, whether it is layer-wise) and how its weight decay applies."""

from __future__ import annotations

from typing import NamedTuple

from ..kernels.rules import RULES, RuleSpec

__all__ = ["OPTIMIZER_NAMES", "OptimizerName"]


class OptimizerName(NamedTuple):
    rule: str  # a key of kernels.rules.RULES
    decoupled: bool = False  # weight decay applied to the parameter (AdamW) rather than added to the gradient (Adam)
    four_bit: bool = False  # takes optim_bits=4 (quant.formats; its two states share a byte: optim.state)

    @property
    def spec(self) -> RuleSpec:
        return RULES[self.rule]


OPTIMIZER_NAMES: dict[str, OptimizerName] = {
    "adam": OptimizerName("adam", four_bit=True),
    "adamw": OptimizerName("adam", decoupled=True, four_bit=True),
    "ademamix": OptimizerName("ademamix", decoupled=True),
    "lamb": OptimizerName("lamb", decoupled=True),
    "lion": OptimizerName("lion", decoupled=True),
    "momentum": OptimizerName("momentum"),
    "lars": OptimizerName("lars"),
    "rmsprop": OptimizerName("rmsprop"),
    "adagrad": OptimizerName("adagrad"),
}
