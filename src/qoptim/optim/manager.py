"""Per-parameter configuration overrides, bitsandbytes' ``GlobalOptimManager``.

Overrides are keyed by the parameter's ``id`` and, after ``register_parameters``, by its
position (group index, index in group), so that a config survives moving plain tensors
with ``t = t.to(device)``. Unlike bitsandbytes, every parameter gets its own copy of an
override dict: overriding one parameter later never changes another.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace
from typing import Any, Iterable

import torch

__all__ = ["ARGS_KEYS", "GlobalOptimManager", "settings_args"]

# settings every parameter takes from its optimizer's ``args`` (bitsandbytes' MockArgs), unless overridden
ARGS_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "max_unorm", "skip_zeros", "block_wise", "master_weight_bits",
             "weight_rounding", "state_rounding")  # fmt: skip


class GlobalOptimManager:
    _instance: GlobalOptimManager | None = None

    def __init__(self) -> None:
        raise RuntimeError("Call get_instance() instead")

    def initialize(self) -> None:
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple: list[tuple[torch.nn.Module, str, dict[str, Any]]] = []

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params: Iterable) -> None:
        """Record the position of every parameter that has an override."""
        groups = list(params)
        if not groups:
            return
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gindex, group in enumerate(groups):
            for pindex, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(gindex, pindex)] = self.pid2config[id(p)]

    def config_of(self, group: dict[str, Any], gindex: int, pindex: int, args: Any) -> dict[str, Any]:
        """Settings for parameter ``pindex`` of ``group`` (number ``gindex``): its group's, then
        ``args`` (its optimizer's), then overrides, which win (by position, then by tensor)."""
        config = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}
        config.update(group)
        del config["params"]
        config.update({key: getattr(args, key) for key in ARGS_KEYS})
        for overrides in (self.index2config.get((gindex, pindex)), self.pid2config.get(id(group["params"][pindex]))):
            if overrides:
                config.update(overrides)
        return config

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: dict[str, Any] | None = None,
    ) -> None:
        """Override optimizer settings (``optim_bits``, ``lr``, ...) for some parameters.

        Give either ``key`` and ``value`` or ``key_value_dict``.
        """
        self.uses_config_override = True
        if isinstance(parameters, (torch.nn.Parameter, torch.Tensor)):
            parameters = [parameters]
        if key is not None and value is not None:
            if key_value_dict is not None:
                raise ValueError("give either key and value or key_value_dict, not both")
            key_value_dict = {key: value}
        if not key_value_dict:
            raise ValueError("override_config needs key and value, or a non-empty key_value_dict")
        for p in parameters:
            if id(p) not in self.pid2config:
                # forget the entry with the tensor, so that a new tensor reusing its id is not hit
                weakref.finalize(p, self.pid2config.pop, id(p), None)
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict[str, Any]) -> None:
        """Override the config of ``module.<param_name>``, resolved at an optimizer's first step."""
        self.module_weight_config_triple.append((module, param_name, dict(config)))


def settings_args(args: Any, *, optim_bits: int, min_8bit_size: int, **settings: Any) -> Any:
    """An optimizer's ``args`` (bitsandbytes' object of its settings, ``ARGS_KEYS``): a new one from
    the constructor's arguments, or the one given with what it lacks taken from them."""
    if args is None:
        return SimpleNamespace(optim_bits=optim_bits, min_8bit_size=min_8bit_size, **settings)
    for key, value in settings.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args
