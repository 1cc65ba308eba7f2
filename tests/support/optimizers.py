"""The optimizer classes of ``qoptim.optim`` as test cases: each with the constructor
arguments it needs (a new class is covered without a line here). Imported as ``support.optimizers``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

import qoptim.optim

# Classes of qoptim.optim.__all__ that cannot step on their own, and why.
ABSTRACT = {"Optimizer8bit": "the step loop without an update rule (init_state and update_step are a subclass's)"}
# Constructor arguments a class needs besides the parameters: lr is required by the momentum
# families, which also refuse momentum=0 (bitsandbytes); PytorchLARS keeps a state with momentum
# only; the base classes take an update rule's name.
NEEDED: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 0.01, "momentum": 0.9}, "LARS": {"lr": 0.01, "momentum": 0.9}, "PytorchLARS": {"momentum": 0.9},
}  # fmt: skip
RULE_NAMES = {"Optimizer2State": "adam", "Optimizer1State": "momentum"}


@dataclass(frozen=True)
class Case:
    """One optimizer class and how to build it on given parameters."""

    name: str
    cls: type
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def accepts(self, argument: str) -> bool:
        return argument in inspect.signature(self.cls).parameters

    def make(self, params, **kwargs) -> torch.optim.Optimizer:
        if self.accepts("min_8bit_size"):  # 8-bit states on small tensors, where the class keeps them
            kwargs.setdefault("min_8bit_size", 0)
        return self.cls(*self.args, params, **{**self.kwargs, **kwargs})


def optimizer_cases() -> list[Case]:
    """Every class of ``qoptim.optim.__all__`` (bitsandbytes' names) and of qoptim's own
    (``QOPTIM_NAMES``: the 4-bit classes) that steps on its own, with what it needs to."""
    cases = []
    for name in [*qoptim.optim.__all__, *qoptim.optim.QOPTIM_NAMES]:
        cls = getattr(qoptim.optim, name)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or name in ABSTRACT:
            continue
        family = name.removeprefix("Paged").removesuffix("4bit").removesuffix("8bit").removesuffix("32bit")
        args = (RULE_NAMES[name],) if name in RULE_NAMES else ()
        kwargs = dict(NEEDED.get(family, {}))
        if name in RULE_NAMES and name == "Optimizer1State":
            kwargs["betas"] = (0.9, 0.0)
        cases.append(Case(name, cls, args, kwargs))
    return cases


