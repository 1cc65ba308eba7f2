"""Base classes of the bitsandbytes-compatible optimizers.

``Optimizer8bit`` holds what every optimizer shares: the step loop, validation, per-parameter
config, state buffers and the bitsandbytes checkpoint layout. ``Optimizer2State`` and
``Optimizer1State`` say which states a family keeps. None of them computes an update: that is
``qoptim.kernels.update``, which picks the implementation for the parameter's device.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections import defaultdict
from copy import deepcopy
from dataclasses import dataclass
from itertools import chain
from types import SimpleNamespace
from typing import Any

import torch

from .. import kernels, paging
from ..kernels import BLOCK, WHOLE_TENSOR, Hyper, Job, StateSlot
from ..quant.maps import signed_map, unsigned_map
from . import dtensor as _dt
from .manager import GlobalOptimManager

__all__ = ["Optimizer8bit", "Optimizer2State", "Optimizer1State"]

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"

@dataclass(frozen=True)
class Family:
    """What an optimizer name means to the kernels."""

    rule: str  # the update rule in qoptim.kernels
    signed: tuple[bool, ...]  # per state key (state1, state2): signed map, or unsigned for values >= 0
    decoupled: bool = False  # weight decay applied to the parameter rather than added to the gradient
    layer_wise: bool = False  # uses max_unorm: LAMB's update cap, LARS's trust coefficient


FAMILIES: dict[str, Family] = {
    "adam": Family("adam", (True, False)),
    "adamw": Family("adam", (True, False), decoupled=True),
    "ademamix": Family("ademamix", (True, False), decoupled=True),
    "lamb": Family("lamb", (True, False), decoupled=True, layer_wise=True),
    "lion": Family("lion", (True,), decoupled=True),
    "momentum": Family("momentum", (True,)),
    "lars": Family("lars", (True,), layer_wise=True),
    "rmsprop": Family("rmsprop", (False,)),
    "adagrad": Family("adagrad", (False,)),
}

NONFINITE_MODES = ("skip", "raise", "propagate")
# settings every parameter takes from ``self.args`` (bitsandbytes' MockArgs), unless overridden
ARGS_KEYS = ("optim_bits", "min_8bit_size", "percentile_clipping", "max_unorm", "skip_zeros", "block_wise")
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The state entries a parameter's kernel slots are views of (``_slots_of``).
_SLOT_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


class _SlotCache(dict):
    """id(param) -> (stamp, weak param, slots, token): the slots ``_slots_of`` keeps (a dict
    subclass, so that finalizers can hold it weakly and keep neither it nor its slots alive)."""


def _drop_entry(cache_ref: weakref.ref, key: int, token: object) -> None:
    """A state tensor behind an entry was freed: forget the entry (unless already replaced)."""
    cache = cache_ref()
    if cache is not None and key in cache and cache[key][3] is token:
        del cache[key]


class Optimizer8bit(torch.optim.Optimizer):
    """The step loop and checkpoint layout shared by every qoptim optimizer."""

    nonfinite = "skip"  # what a NaN/Inf gradient does (NONFINITE_MODES); the state classes take it as an argument

    def __init__(self, params, defaults: dict[str, Any], optim_bits: int = 32, is_paged: bool = False):
        super().__init__(params, defaults)
        self.initialized = False
        self.name2qmap: dict[str, torch.Tensor] = {}
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = {
            "qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2",
            "gnorm_vec", "absmax1", "absmax2", "unorm_vec",
        }  # fmt: skip
        self.nonfinite_skipped_blocks = 0  # 256-blocks left untouched because of NaN/Inf gradients
        if optim_bits == 8:
            self.fill_qmap()

    def fill_qmap(self) -> None:
        self.name2qmap["dynamic"] = signed_map()
        self.name2qmap["udynamic"] = unsigned_map()

    def _qmap_on(self, name: str, device: torch.device) -> torch.Tensor:
        """Map ``name`` on ``device``: one copy per device, shared by every parameter there (so
        that backends batching parameters see one map, and its tables are built once)."""
        source = self.name2qmap[name]
        if source.device == device:
            return source
        copies = self.__dict__.setdefault("_qmap_copies", {})
        cached = copies.get((name, device))
        if cached is None or cached[0] is not source:  # first use, or name2qmap was replaced
            cached = copies[(name, device)] = (source, source.to(device))
        return cached[1]

    # ---- configuration -------------------------------------------------------------

    def check_overrides(self) -> None:
        """Resolve ``GlobalOptimManager.register_module_override`` entries against our params."""
        for module, attr, config in self.mng.module_weight_config_triple:
            target = getattr(module, attr)
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p is target:
                        self.mng.pid2config[id(p)] = dict(config)
                        self.mng.index2config[(gindex, pindex)] = self.mng.pid2config[id(p)]

    def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        """Settings for one parameter: its group, then ``args``, then overrides (which win)."""
        config = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}
        config.update(group)
        del config["params"]
        args = self.args
        for key in ARGS_KEYS:
            config[key] = getattr(args, key)
        overrides = self.mng.index2config.get((gindex, pindex))
        if overrides:
            config.update(overrides)
        overrides = self.mng.pid2config.get(id(group["params"][pindex]))
        if overrides:
            config.update(overrides)
        return config

    # ---- the step ------------------------------------------------------------------

    @torch.compiler.disable  # eager only: inside a compiled region the step is a clean graph break
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Every parameter and gradient is checked before anything changes, so a rejected step
        leaves parameters and states as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            (gindex, pindex, group, p)
            for gindex, group in enumerate(self.param_groups)
            for pindex, p in enumerate(group["params"])
            if p.grad is not None
        ]
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            self._check_group(gindex, group)
        for gindex, pindex, group, p in work:
            self._check_param(gindex, pindex, group, p)
        self._skipped_this_step: list[int | torch.Tensor] = []
        try:
            self._update_all(work)
            if self.is_paged:
                for device in {p.device for *_, p in work}:
                    paging.synchronize(device)
            skipped = _total(self._skipped_this_step)  # the step's one read of device counters
        finally:  # also after a failure deep in a backend: later direct update_step calls count themselves
            self._skipped_this_step = None
        if skipped:
            self._note_skipped(skipped)
        return loss

    def _update_all(self, work: list[tuple[int, int, dict[str, Any], torch.Tensor]]) -> None:
        """Update every (gindex, pindex, group, param) of a checked step, one parameter at a time."""
        for gindex, pindex, group, p in work:
            if not self.state[p]:
                self.init_state(group, p, gindex, pindex)
            self.prefetch_state(p)
            self.update_step(group, p, gindex, pindex)

    def _check_group(self, gindex: int, group: dict[str, Any]) -> None:
        """Hyperparameters can change between steps (schedulers, user code): check them each step."""
        if all(key in group for key in ("lr", "betas", "eps", "weight_decay")):
            try:
                _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            except ValueError as e:
                raise ValueError(f"param group {gindex}: {e}") from None

    def _check_param(self, gindex: int, pindex: int, group: dict[str, Any], p: torch.Tensor) -> None:
        name = f"parameter {pindex} of param group {gindex}"
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name})")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"{name} has dtype {p.dtype}; supported parameter dtypes are float32, float16 and bfloat16")
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise ValueError(
                f"the gradient of {name} must match it: parameter {p.dtype} {tuple(p.shape)} on {p.device}, "
                f"gradient {g.dtype} {tuple(g.shape)} on {g.device}"
            )
        if _dt.is_dtensor(p):
            _dt.check_param(p, self.get_config(gindex, pindex, group), getattr(getattr(self, "family", None), "layer_wise", False))
        state = self.state[p]
        if QUANT_STATE_KEY in state:  # nested state put straight into .state (ZeroRedundancyOptimizer.load_state_dict)
            state.update(state.pop(QUANT_STATE_KEY))
        if state:
            for key in ("state1", "state2"):
                if key in state and (state[key].shape != self._state_shape(p, key) or state[key].device != p.device):
                    raise ValueError(
                        f"{key} of {name} is {tuple(state[key].shape)} on {state[key].device}, "
                        f"but the parameter is {tuple(p.shape)} on {p.device}"
                    )
        else:
            bits = self.get_config(gindex, pindex, group)["optim_bits"]
            if bits not in (8, 32):
                raise NotImplementedError(f"Amount of optimizer bits not supported: {bits}")
        if self.nonfinite == "raise" and not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"the gradient of {name} holds NaN or Inf values; nothing was updated")

    def to_gpu(self) -> None:
        """Move existing state (e.g. loaded with ``move_to_device=False``) to its parameter's device."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.device != p.device:
                        state[key] = value.to(p.device)

    def get_state_buffer(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return paging.state_buffer(p, dtype, self.is_paged, owner=self)

    def _state_buffer(self, p: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
        if _dt.is_dtensor(p):  # sharded like p (FSDP2); never paged
            return _dt.state_buffer(p, dtype, shape)
        return paging.state_buffer(p, dtype, self.is_paged, owner=self, shape=shape)

    def _absmax_buffer(self, p: torch.Tensor, shape) -> torch.Tensor:
        if _dt.is_dtensor(p):
            return _dt.absmax_buffer(p, shape)
        return torch.zeros(shape, dtype=torch.float32, device=p.device)

    def prefetch_state(self, p: torch.Tensor) -> None:
        if self.is_paged:
            state = self.state[p]
            paging.prefetch([state[k] for k in ("state1", "state2") if k in state], p.device)

    def init_state(self, group, p, gindex, pindex):
        raise NotImplementedError("init_state method needs to be overridden")

    def update_step(self, group, p, gindex, pindex):
        raise NotImplementedError("The update_step method needs to be overridden")

    # ---- checkpoints ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict, with each parameter's state tensors nested under
        ``"__bnb_optimizer_quant_state__"`` as bitsandbytes >= 0.49.2 writes them."""
        state_dict = super().state_dict()
        wrapped = {}
        fsdp1 = _dt.fsdp1_caller()  # FSDP1 gathers only top-level tensors: flat layout, 8-bit states as float32
        for k, v in state_dict["state"].items():
            v = _dt.export_state(v, getattr(self, "n_states", 2), fsdp1)  # sharded (DTensor) layout record; FSDP1: float32
            inner = {key: _unpaged(value) for key, value in v.items() if key in self.non_castable_tensor_keys}
            outer = {key: value for key, value in v.items() if key not in self.non_castable_tensor_keys}
            if inner and fsdp1:
                outer.update(inner)
            elif inner:
                outer[QUANT_STATE_KEY] = inner
            wrapped[k] = outer
        return {"state": wrapped, "param_groups": state_dict["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """Load a state dict written by qoptim or bitsandbytes (nested or flat layout).

        Everything is checked before anything is assigned: a state dict that does not fit
        these parameters raises and leaves the optimizer as it was.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("an optimizer state dict needs the keys 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), chain.from_iterable(g["params"] for g in groups)))

        new_state: dict[Any, dict[str, Any]] = defaultdict(dict)  # as torch keeps it: params without state may step later
        for k, saved in state_dict["state"].items():
            if k not in id_map:
                raise ValueError(f"loaded state dict has state for parameter id {k!r}, which no param group lists")
            p = id_map[k]
            flat = dict(saved)
            flat.update(flat.pop(QUANT_STATE_KEY, {}))
            flat = _dt.adapt_loaded_state(self, p, flat, getattr(self, "n_states", 2))  # resharded / dequantized layouts
            self._check_loaded_state(k, p, flat)
            new_state[p] = {key: self._place(p, key, value, move_to_device) for key, value in flat.items()}

        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self.__setstate__({"state": new_state, "param_groups": saved_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _place(self, p: torch.Tensor, key: str, value: Any, move_to_device: bool) -> Any:
        """A loaded value as the live state keeps it: state tensors on the parameter's device
        (re-paged for paged optimizers), other float tensors cast to the parameter's dtype."""
        if key == "step":
            return int(value.item() if isinstance(value, torch.Tensor) else value)
        if not isinstance(value, torch.Tensor):
            return value
        if key in ("state1", "state2") and self.is_paged and move_to_device:
            return self._state_buffer(p, value.dtype, value.shape).copy_(value)
        # always a contiguous copy: the live state must not alias the caller's state dict, and
        # the kernels update flat views of it
        if key in self.non_castable_tensor_keys:
            device = p.device if move_to_device else value.device
            if key.startswith("qmap"):
                return self._shared_qmap(value.to(device))
            return value.to(device, memory_format=torch.contiguous_format, copy=True)
        if value.is_floating_point():
            return value.to(device=p.device, dtype=p.dtype, copy=True)
        return value.to(p.device, copy=True)

    def _shared_qmap(self, loaded: torch.Tensor) -> torch.Tensor:
        """A loaded map: the optimizer's own shared one where equal (a checkpoint holds a copy
        per parameter), else a copy of its own."""
        if not self.name2qmap:
            self.fill_qmap()
        for name in list(self.name2qmap):
            shared = self._qmap_on(name, loaded.device)
            if torch.equal(shared, loaded):
                return shared
        return loaded.clone(memory_format=torch.contiguous_format)

    def _check_loaded_state(self, k: Any, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Reject a parameter's loaded state that this optimizer could not continue from: another
        optimizer type's states, wrong shapes or dtypes, a tampered map or scale."""
        if not state:
            return
        name = f"the loaded state of parameter {k!r}"
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 0 or step != int(step):
            raise ValueError(f"{name} has step={state.get('step')!r}; expected a non-negative int")
        kept = [f"state{i}" for i in range(1, getattr(self, "n_states", 2) + 1)]
        present = [key for key in ("state1", "state2") if key in state]
        if present != kept:
            raise ValueError(
                f"{name} holds {present}, but {type(self).__name__} keeps {kept}: a state dict of another optimizer type?"
            )
        for key in kept:
            self._check_loaded_tensor(name, key, state[key], self._state_shape(p, key), (torch.uint8, torch.float32))
            if state[key].dtype != torch.uint8:
                continue
            i = key[-1]
            qmap = self._check_loaded_tensor(name, f"qmap{i}", state.get(f"qmap{i}"), (256,), (torch.float32,))
            if not bool(torch.isfinite(qmap).all() and (qmap[1:] > qmap[:-1]).all() and qmap.abs().max() <= 1):
                raise ValueError(f"{name}: qmap{i} must hold 256 finite codes in [-1, 1], sorted ascending")
            scales = [f"absmax{i}"] if f"absmax{i}" in state else [f"max{i}", f"new_max{i}"]
            for scale in scales:
                shape = self._absmax_shape(p, key) if scale.startswith("absmax") else (1,)
                values = _dt.local(self._check_loaded_tensor(name, scale, state.get(scale), shape, (torch.float32,)))
                if not bool((torch.isfinite(values) & (values >= 0)).all()):
                    raise ValueError(f"{name}: {scale} must hold finite non-negative scales")
        if "gnorm_vec" in state:
            self._check_loaded_tensor(name, "gnorm_vec", state["gnorm_vec"], (100,), (torch.float32,))
        if "unorm_vec" in state:
            self._check_loaded_tensor(name, "unorm_vec", state["unorm_vec"], (1,), (torch.float32,))

    @staticmethod
    def _check_loaded_tensor(name: str, key: str, t: Any, shape, dtypes) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name}: {key} must be a {wanted} tensor of shape {tuple(shape)}, got {got}")
        return t

    def _state_shape(self, p: torch.Tensor, key: str) -> torch.Size:
        return p.shape

    def _absmax_shape(self, p: torch.Tensor, key: str) -> torch.Size:
        if _dt.is_dtensor(p):
            return _dt.absmax_shape(p)
        return torch.Size([math.ceil(p.numel() / BLOCK)])


class _StateOptimizer(Optimizer8bit):
    """What Optimizer2State and Optimizer1State share: arguments, state layout and update."""

    n_states = 2

    def __init__(
        self,
        optimizer_name: str,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
        max_unorm=0.0,
        skip_zeros=False,
        is_paged=False,
        alpha=0.0,
        t_alpha=None,
        t_beta3=None,
        nonfinite="skip",
    ):
        family = FAMILIES.get(optimizer_name)
        if family is None or len(family.signed) != self.n_states:
            known = sorted(k for k, f in FAMILIES.items() if len(f.signed) == self.n_states)
            raise ValueError(f"Unsupported optimizer name: {optimizer_name!r}; {type(self).__name__} knows {known}")
        if isinstance(betas, str):
            betas = [float(b) for b in betas.strip("()[] ").split(",")]
        _check_hyper(lr, betas, eps, weight_decay)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        if isinstance(percentile_clipping, bool) or not isinstance(percentile_clipping, int) or not 1 <= percentile_clipping <= 100:
            raise ValueError(f"percentile_clipping must be an int in [1, 100] (100 disables it), got {percentile_clipping!r}")
        if not isinstance(max_unorm, numbers.Real) or max_unorm < 0 or (max_unorm and not family.layer_wise):
            raise ValueError(f"max_unorm must be 0, or >= 0 for LAMB and LARS (layer-wise), got max_unorm={max_unorm!r}")
        if skip_zeros:
            raise ValueError("skip_zeros=True is not supported: elements with zero gradient get the ordinary update")
        for flag, value in (("block_wise", block_wise), ("is_paged", is_paged)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if self.n_states == 2:  # bitsandbytes' two-state groups also carry AdEMAMix's settings
            defaults.update(alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3)
        super().__init__(params, defaults, optim_bits, is_paged)
        self.optimizer_name = optimizer_name
        self.family = family
        self.nonfinite = nonfinite
        if args is None:
            args = SimpleNamespace(
                optim_bits=optim_bits,
                min_8bit_size=min_8bit_size,
                percentile_clipping=percentile_clipping,
                block_wise=block_wise,
                max_unorm=max_unorm,
                skip_zeros=skip_zeros,
            )
        else:
            defaults_args = dict(percentile_clipping=percentile_clipping, block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros)
            for key, value in defaults_args.items():
                if not hasattr(args, key):
                    setattr(args, key, value)
        self.args = args

    def add_group_defaults(self, **defaults) -> None:
        """Settings of a family's own (nesterov, lr_decay, ...), kept in every param group."""
        self.defaults.update(defaults)
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def init_state(self, group, p, gindex, pindex):
        config = self.get_config(gindex, pindex, group)  # optim_bits was checked by _check_param
        quantized = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
        state: dict[str, Any] = {"step": 0}  # built apart, assigned whole: an allocation that fails leaves no half state
        for i in range(1, self.n_states + 1):
            shape = self._state_shape(p, f"state{i}")
            if not quantized:
                state[f"state{i}"] = self._state_buffer(p, torch.float32, shape)
                continue
            if not self.name2qmap:
                self.fill_qmap()
            state[f"state{i}"] = self._state_buffer(p, torch.uint8, shape)
            state[f"qmap{i}"] = self._qmap_on("dynamic" if self.family.signed[i - 1] else "udynamic", p.device)
        if quantized:
            for i in range(1, self.n_states + 1):
                if config["block_wise"]:
                    state[f"absmax{i}"] = self._absmax_buffer(p, self._absmax_shape(p, f"state{i}"))
                else:
                    for key in (f"max{i}", f"new_max{i}"):
                        state[key] = torch.zeros(1, dtype=torch.float32, device=p.device)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=p.device)
        if self.family.layer_wise and config["max_unorm"] > 0:
            # bitsandbytes keeps (and its step requires) this slot for the update norm; qoptim's
            # kernels do not report the norm, so it stays 0
            state["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=p.device)
        self.state[p].update(state)

    def _update_all(self, work) -> None:
        """All parameters' updates handed to the kernels together (``kernels.update_many``), so
        that a backend can batch small tensors into one launch. Paged optimizers (each state
        prefetched just before its own update) and subclasses with their own ``update_step``
        take the one-at-a-time path, as does a parameter listed twice (it must see two updates).

        Nothing is counted before the kernels ran: states are created first (for every
        parameter), jobs are built without changing anything, and each job's step count and
        clipping history are committed after the kernels, so a failure on the way (out of
        memory, a bad override) leaves no parameter counted but not updated."""
        patched = getattr(self.update_step, "__func__", None) is not _StateOptimizer.update_step
        if self.is_paged or patched or len({id(p) for *_, p in work}) != len(work):
            return super()._update_all(work)
        for gindex, pindex, group, p in work:
            if not self.state[p]:
                self.init_state(group, p, gindex, pindex)
        jobs = [self._job(group, p, gindex, pindex) for gindex, pindex, group, p in work]
        try:
            results = kernels.update_many([job.update for job in jobs])
        finally:  # a parameter updated as a contiguous copy gets it back, whatever happened
            for job in jobs:
                job.write_back()
        for job, result in zip(jobs, results):
            job.finish(self, result)

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        job = self._job(group, p, gindex, pindex)
        try:
            result = kernels.update(*job.update)
        finally:
            job.write_back()
        job.finish(self, result)

    def _job(self, group, p, gindex, pindex) -> _Job:
        """One parameter's update, ready for the kernels; changes nothing (``finish`` counts it)."""
        config = self.get_config(gindex, pindex, group)
        state = self.state[p]
        step = state["step"] + 1
        hp = self.hyper(config, step)
        params = _dt.local(p.detach())  # a DTensor's local shard (FSDP2), updated in place
        flat_p = params.view(-1) if params.is_contiguous() else params.contiguous().view(-1)
        flat_g = _dt.local(p.grad.detach()).contiguous().view(-1)
        commit: dict[str, Any] = {"step": step}
        if config["percentile_clipping"] < 100:
            # this step's history (a new tensor, committed by finish); created here if clipping
            # was switched on (an override) after the state was
            fresh = "gnorm_vec" not in state
            history = torch.zeros(100, device=flat_g.device) if fresh else state["gnorm_vec"].clone()
            scale = _percentile_clip(history, kernels.grad_norm_sq(flat_g), 1 if fresh else step, config["percentile_clipping"])
            hp = hp._replace(gnorm_scale=scale)
            commit["gnorm_vec"] = history
        return _Job(Job(self.family.rule, flat_p, flat_g, self._slots_of(p, state), hp, self.nonfinite == "skip"), params, state, commit)

    def hyper(self, config: dict[str, Any], step: int) -> Hyper:
        """A step's hyperparameters for the kernels; families with settings of their own extend it."""
        betas = config["betas"]
        return Hyper(
            lr=float(config["lr"]),
            beta1=float(betas[0]),
            beta2=float(betas[1]) if len(betas) > 1 else 0.0,
            eps=float(config["eps"]),
            weight_decay=float(config["weight_decay"]),
            step=step,
            decoupled=self.family.decoupled,
            beta3=float(betas[2]) if len(betas) > 2 else 0.0,
            alpha=float(config["alpha"]),
            max_unorm=float(config["max_unorm"]),
        )

    def _slots_of(self, p: torch.Tensor, state: dict[str, Any]) -> list[StateSlot]:
        """``self._slots(state)``, kept from the last step while the state holds the same
        tensors at the same addresses: building the flat views costs ~4 us per parameter and
        step, as much as the update of a small tensor. One-scale states are built anew (their
        slots copy the previous scale on each build).

        Kept slots must not keep a dropped state's memory: they view detached aliases
        (``_slot``), which hold the storage but not the state tensors, and an entry goes as
        soon as one of its state tensors is freed (``opt.state.clear()``, a load, a move)."""
        if "max1" in state:
            return self._slots(state)
        tensors = [state.get(key) for key in _SLOT_KEYS]
        stamp = tuple(None if t is None else (id(t), t.data_ptr()) for t in tensors)  # (a DTensor's address is 0: its id decides)
        cache = self.__dict__.get("_slot_cache")
        if cache is None:  # (made here: torch's __setstate__ does not run __init__)
            cache = self._slot_cache = _SlotCache()
        seen = cache.get(id(p))
        if seen is not None and seen[0] == stamp and seen[1]() is p:
            return seen[2]
        slots = self._slots(state)
        token = object()
        cache[id(p)] = (stamp, weakref.ref(p), slots, token)
        for key, t in zip(_SLOT_KEYS, tensors):
            if t is not None and not key.startswith("qmap"):  # (the maps are shared: they outlive states)
                weakref.finalize(t, _drop_entry, weakref.ref(cache), id(p), token).atexit = False
        return slots

    def _slots(self, state: dict[str, Any]) -> list[StateSlot]:
        """The kernels' view of a parameter's states, one slot per state key."""
        return [self._slot(state, i) for i in range(1, self.n_states + 1)]

    def _slot(self, state: dict[str, Any], i: int, row: int | None = None) -> StateSlot:
        """State ``i`` as a flat slot; ``row`` picks one row of a stacked state (AdEMAMix's state1).
        State tensors are contiguous (as created, and as loaded): the flat views alias them."""
        values = _dt.local(state[f"state{i}"]).detach()  # (an alias: see _slots_of)
        values = (values if row is None else values[row]).view(-1)
        if values.dtype != torch.uint8:
            return StateSlot(values)
        absmax = state.get(f"absmax{i}")
        if absmax is not None:
            absmax = absmax.detach() if row is None else absmax.detach()[row]
            if _dt.is_dtensor(absmax) or absmax.dim() != 1:  # a shard's blocks within the padded global layout
                absmax = _dt.blocks_of(absmax, values.numel())
            return StateSlot(values, state[f"qmap{i}"], absmax, BLOCK)
        state[f"new_max{i}"].copy_(state[f"max{i}"])  # the previous scale, as bitsandbytes keeps it
        return StateSlot(values, state[f"qmap{i}"], state[f"max{i}"], WHOLE_TENSOR)

    def _note_skipped(self, blocks: int) -> None:
        if not self.nonfinite_skipped_blocks:
            warnings.warn(
                f"{type(self).__name__}: {blocks} block(s) of 256 elements had NaN or Inf gradients and were left "
                "unchanged (parameters and state); see .nonfinite_skipped_blocks for the running count",
                RuntimeWarning,
                stacklevel=4,
            )
        self.nonfinite_skipped_blocks += blocks


@dataclass
class _Job:
    """A parameter's update for the kernels, and the parameter it writes back to."""

    update: Job
    params: torch.Tensor  # the parameter (or its local shard); update.p is a flat view, or a copy
    state: dict[str, Any]  # the parameter's optimizer state
    commit: dict[str, Any]  # what the state takes once the update ran: the step count, clipping history

    def write_back(self) -> None:
        """Copy the update into a parameter that was updated as a contiguous copy (harmless if
        the update did not run: the copy started equal to the parameter)."""
        if self.update.p.data_ptr() != self.params.data_ptr():
            self.params.copy_(self.update.p.view(self.params.shape))

    def finish(self, opt: _StateOptimizer, result) -> None:
        self.state.update(self.commit)
        if isinstance(result.skipped_blocks, torch.Tensor) or result.skipped_blocks:
            pending = getattr(opt, "_skipped_this_step", None)
            if pending is None:  # update_step called outside step()
                opt._note_skipped(_total([result.skipped_blocks]))
            else:
                pending.append(result.skipped_blocks)


class Optimizer2State(_StateOptimizer):
    """Optimizers with two states per parameter: a first moment (signed map) and a second
    moment (unsigned map)."""

    n_states = 2


class Optimizer1State(_StateOptimizer):
    """Optimizers with one state per parameter (momentum, or a sum of squares)."""

    n_states = 1

    def __init__(self, optimizer_name, params, lr=1e-3, betas=(0.9, 0.0), eps=1e-8, weight_decay=0.0, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, max_unorm=0.0, skip_zeros=False, is_paged=False,
                 nonfinite="skip"):  # fmt: skip
        super().__init__(optimizer_name, params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size, percentile_clipping,
                         block_wise, max_unorm, skip_zeros, is_paged, nonfinite=nonfinite)  # fmt: skip


def _total(counts: list[int | torch.Tensor]) -> int:
    """Sum of skipped-block counts, reading device tensors with one synchronization."""
    total = sum(c for c in counts if not isinstance(c, torch.Tensor))
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for c in counts:
        if isinstance(c, torch.Tensor):
            by_device[c.device].append(c.to(torch.int64))
    return total + sum(int(torch.stack(tensors).sum()) for tensors in by_device.values())


def _unpaged(value: Any) -> Any:
    """A paged state buffer as a plain tensor over the same memory (no copy): without the
    ``is_paged`` tag, which torch.save would otherwise write into checkpoints."""
    return value.detach() if getattr(value, "is_paged", False) else value


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    lr_value = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
    if not isinstance(lr_value, numbers.Real) or not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not isinstance(eps, numbers.Real) or not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(betas, (tuple, list)) or not 1 <= len(betas) <= 3:
        raise ValueError(f"Invalid betas: {betas!r}; expected a tuple of 2 (or 3) floats in [0, 1)")
    for i, beta in enumerate(betas):
        if not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not isinstance(weight_decay, numbers.Real) or not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _percentile_clip(gnorm_vec: torch.Tensor, norm_sq: float, step: int, percentile: int) -> float:
    """Record this step's squared gradient norm in the 100-step history and return the factor
    that scales the gradient down to the history's ``percentile``-th smallest norm.

    A NaN/Inf norm is not recorded (it would poison the history for 100 steps) and scales
    nothing: the kernels' non-finite handling decides what such a gradient does."""
    if not math.isfinite(norm_sq):
        return 1.0
    if step == 1:
        gnorm_vec.fill_(norm_sq)
    else:
        gnorm_vec[step % 100] = norm_sq
    current = math.sqrt(float(torch.tensor(norm_sq, dtype=torch.float32)))  # as stored, without reading it back
    clip = math.sqrt(float(torch.kthvalue(gnorm_vec, percentile + 1).values))  # sorted(gnorm_vec)[percentile]
    return clip / current if current > clip else 1.0
