"""The checkpoint layout: ``Optimizer8bit.state_dict`` / ``load_state_dict``.

torch's optimizer state dict, with each parameter's state tensors nested under
``"__bnb_optimizer_quant_state__"`` as bitsandbytes >= 0.49.2 writes them (``QUANT_STATE_KEY``);
bitsandbytes' older flat layout loads as well. A load is checked whole before anything is
assigned, and places each value as the live state keeps it. Layouts other than the live one
(another sharding, FSDP1's) are ``exports``' (saving) and ``reshard``'s (loading).
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any

import torch

from ..quant.formats import FORMATS, MAP_NAMES, StateFormat
from . import dtensor, exports, reshard, weights
from .exports import Export
from .state import BUFFER_KEYS, GNORM_VEC, KEYS, QMAP_KEYS, STEP, UNORM_VEC, shared_bytes

__all__ = ["QUANT_STATE_KEY", "check_loaded_state", "copied_state", "exported", "fill_defaults", "loaded", "packed",
           "repage", "unnest"]  # fmt: skip

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"


def unnest(state: dict[str, Any]) -> None:
    """Flatten a nested state put straight into ``opt.state`` (ZeroRedundancyOptimizer.load_state_dict)."""
    if QUANT_STATE_KEY in state:
        state.update(state.pop(QUANT_STATE_KEY))


# ---- saving ---------------------------------------------------------------------------------


def packed(opt) -> dict[str, Any]:
    """torch's ``Optimizer.state_dict`` of ``opt`` without its hooks (``Optimizer8bit.state_dict``
    runs them around the layout it writes): parameters as their index in the groups' order;
    entries of ``opt.state`` that are not parameters as they are, under their own key."""
    index: dict[int, int] = {}  # id(param) -> its first position in the groups, as torch numbers them
    groups, start = [], 0
    for group in opt.param_groups:
        index.update({id(p): i for i, p in enumerate(group["params"], start) if id(p) not in index})
        groups.append({**{key: value for key, value in group.items() if key != "params"},
                       "params": [index[id(p)] for p in group["params"]]})  # fmt: skip
        start += len(group["params"])
    state = {index[id(k)] if isinstance(k, torch.Tensor) else k: v for k, v in opt.state.items()}
    return {"state": state, "param_groups": groups}


def exported(torch_state_dict: dict[str, Any], tensor_keys, n_states: int, export: Export) -> dict[str, Any]:
    """torch's state dict of an optimizer as qoptim writes it: ``tensor_keys`` (the optimizer's
    ``non_castable_tensor_keys``) nested under ``QUANT_STATE_KEY``, or for FSDP1 (which gathers
    only top-level tensors) a flat layout with the 8-bit states as float32."""
    wrapped = {}
    for k, v in torch_state_dict["state"].items():
        if not isinstance(k, int) or not isinstance(v, dict):  # not a parameter's: the user's own entry, as torch keeps it
            wrapped[k] = v
            continue
        v = exports.exported_state(v, n_states, export)
        inner = {key: _unpaged(value) for key, value in v.items() if key in tensor_keys}
        outer = {key: value for key, value in v.items() if key not in tensor_keys}
        if inner and export is Export.FSDP1:
            outer.update(inner)
        elif inner:
            outer[QUANT_STATE_KEY] = inner
        wrapped[k] = outer
    return {**torch_state_dict, "state": wrapped}


def _unpaged(value: Any) -> Any:
    """A paged state buffer as a plain tensor over the same memory (no copy): without the
    ``is_paged`` tag, which torch.save would otherwise write into checkpoints."""
    return value.detach() if getattr(value, "is_paged", False) else value


def fill_defaults(groups, defaults: dict[str, Any]) -> None:
    """A loaded or unpickled group's missing settings from the optimizer's ``defaults``: a group
    saved before a setting existed, or by bitsandbytes (which lacks qoptim's own: ``nesterov``,
    ``lr_decay``, ...) takes its default, as torch's optimizers' ``__setstate__`` fill theirs."""
    for group in groups:
        for key, value in defaults.items():
            group.setdefault(key, value)


def copied_state(opt) -> dict[Any, Any]:
    """``opt.state`` for pickling or ``copy.deepcopy``: paged buffers as plain tensors over the
    same memory (a copy must not carry the tag onto memory no pager manages; ``repage`` pages
    the copy's anew)."""
    if not opt.is_paged:
        return opt.state
    copied = defaultdict(dict)
    copied.update({k: {key: _unpaged(v) for key, v in s.items()} if isinstance(s, dict) else s for k, s in opt.state.items()})
    return copied


def repage(opt) -> None:
    """An unpickled (or deep-copied) paged optimizer's state values in paged buffers of its own."""
    for p, state in opt.state.items():
        if opt.is_paged and isinstance(p, torch.Tensor) and isinstance(state, dict):
            for key in BUFFER_KEYS & state.keys():
                state[key] = opt.state_buffer(p, state[key].dtype, state[key].shape).copy_(state[key])


# ---- loading --------------------------------------------------------------------------------


def loaded(opt, state_dict: dict[str, Any], move_to_device: bool) -> dict[str, Any]:
    """The optimizer state (``{"state", "param_groups"}``, for ``opt.__setstate__``) that
    ``state_dict`` (written by qoptim or bitsandbytes, nested or flat) gives ``opt``, an
    ``Optimizer8bit``. Raises, changing nothing, when it does not fit ``opt``'s parameters."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("an optimizer state dict needs the keys 'state' and 'param_groups'")
    groups = opt.param_groups
    saved_groups = deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
    id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), chain.from_iterable(g["params"] for g in groups)))
    position: dict[int, tuple[int, int, dict[str, Any]]] = {}  # id(param) -> (gindex, pindex, group), for its settings
    for gindex, group in enumerate(groups):
        for pindex, p in enumerate(group["params"]):
            position.setdefault(id(p), (gindex, pindex, group))

    new_state: dict[Any, dict[str, Any]] = defaultdict(dict)  # as torch keeps it: params without state may step later
    for k, saved in state_dict["state"].items():
        if k not in id_map and not isinstance(k, int):  # not a parameter's: the user's own entry, kept as torch keeps it
            new_state[k] = saved
            continue
        if k not in id_map:
            raise ValueError(f"loaded state dict has state for parameter id {k!r}, which no param group lists")
        p = id_map[k]
        flat = dict(saved)
        flat.update(flat.pop(QUANT_STATE_KEY, {}))
        requantize_into = _export_format(opt, *position[id(p)])  # (resharded / dequantized layouts:)
        flat = reshard.to_current_layout(p, flat, opt.layout, opt.qmap_on, requantize_into=requantize_into)
        check_loaded_state(type(opt).__name__, k, p, flat, opt.layout, four_bit=opt.four_bit)
        new_state[p] = {key: _place(opt, p, key, value, move_to_device) for key, value in flat.items()}

    for group, saved in zip(groups, saved_groups):
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
    return {"state": new_state, "param_groups": saved_groups}


def _export_format(opt, gindex: int, pindex: int, group: dict[str, Any]) -> StateFormat:
    """The format a parameter's exported float32 states (FSDP1's, ``exports``) are requantized
    into: that of its ``optim_bits`` (``quant.formats``), 8-bit for 32-bit states (loaded states
    keep their form: these were quantized)."""
    bits = opt.get_config(gindex, pindex, group).get("optim_bits") if hasattr(opt, "args") else None
    return FORMATS[4] if bits == 4 and opt.four_bit else FORMATS[8]


def _place(opt, p: torch.Tensor, key: str, value: Any, move_to_device: bool) -> Any:
    """A loaded value as the live state keeps it: state tensors on the parameter's device
    (re-paged for paged optimizers), other float tensors cast to the parameter's dtype."""
    if key == STEP:
        return int(value.item() if isinstance(value, torch.Tensor) else value)
    if not isinstance(value, torch.Tensor):
        return value
    if key in BUFFER_KEYS and opt.is_paged and move_to_device:
        return opt.state_buffer(p, value.dtype, value.shape).copy_(value)
    # always a contiguous copy: the live state must not alias the caller's state dict, and
    # the kernels update flat views of it
    if key in opt.non_castable_tensor_keys:
        device = p.device if move_to_device else value.device
        if key in QMAP_KEYS:
            return _shared_map(opt, value.to(device))
        return value.to(device, memory_format=torch.contiguous_format, copy=True)
    if value.is_floating_point():
        return value.to(device=p.device, dtype=p.dtype, copy=True)
    return value.to(p.device, memory_format=torch.contiguous_format, copy=True)


def _shared_map(opt, loaded_map: torch.Tensor) -> torch.Tensor:
    """A loaded map: the optimizer's own shared one where equal (a checkpoint holds a copy per
    parameter), else a copy of its own."""
    for name in [*opt.name2qmap, *(n for n in MAP_NAMES if n not in opt.name2qmap)]:
        shared = opt.qmap_on(name, loaded_map.device)
        if shared.shape == loaded_map.shape and torch.equal(shared, loaded_map):
            return shared
    return loaded_map.clone(memory_format=torch.contiguous_format)


def check_loaded_state(owner: str, k: Any, p: torch.Tensor, state: dict[str, Any], layout, four_bit: bool = False) -> None:
    """Reject a parameter's loaded state that an optimizer (class ``owner``, keeping ``layout``;
    ``four_bit``: its rule takes 4-bit states) could not continue from: another optimizer type's
    states, wrong shapes or dtypes, a tampered map or scale."""
    if not state:
        return
    name = f"the loaded state of parameter {k!r}"
    step = state.get(STEP)
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step < 0 or step != int(step):
        raise ValueError(f"{name} has step={state.get(STEP)!r}; expected a non-negative int")
    kept_keys = [kept.keys.values for kept in layout]
    present = [keys.values for keys in KEYS if keys.values in state]
    fmt = FORMATS[4] if four_bit and shared_bytes(state) else FORMATS[8]  # (4-bit: both states' codes in state1)
    if present != kept_keys[: 1 if fmt.bits == 4 else None]:
        raise ValueError(f"{name} holds {present}, but {owner} keeps {kept_keys}: a state dict of another optimizer type?")
    for kept in layout:
        keys = kept.keys
        values = state[KEYS[0].values if fmt.bits == 4 else keys.values]
        _check_tensor(name, keys.values, values, kept.shape(p), (torch.uint8, torch.float32))
        if values.dtype != torch.uint8:
            continue
        qmap = _check_tensor(name, keys.qmap, state.get(keys.qmap), (fmt.codes,), (torch.float32,))
        if not bool(torch.isfinite(qmap).all() and (qmap[1:] > qmap[:-1]).all() and qmap.abs().max() <= 1):
            raise ValueError(f"{name}: {keys.qmap} must hold {fmt.codes} finite codes in [-1, 1], sorted ascending")
        if keys.absmax not in state and (keys.max not in state or fmt.bits == 4):
            raise ValueError(f"{name}: {keys.values} holds {fmt.bits}-bit codes without their scales: expected {keys.absmax} "
                             + ("(4-bit states are block-wise)" if fmt.bits == 4 else
                                f"(block-wise) or {keys.max} and {keys.new_max} (one scale per tensor)"))  # fmt: skip
        scales = [keys.absmax] if keys.absmax in state else [keys.max, keys.new_max]
        for scale in scales:
            shape = kept.absmax_shape(p, fmt.blocksize) if scale == keys.absmax else (1,)
            values = dtensor.local(_check_tensor(name, scale, state.get(scale), shape, (torch.float32,)))
            if not bool((torch.isfinite(values) & (values >= 0)).all()):
                raise ValueError(f"{name}: {scale} must hold finite non-negative scales")
    if GNORM_VEC in state:
        _check_tensor(name, GNORM_VEC, state[GNORM_VEC], (100,), (torch.float32,))
    if UNORM_VEC in state:
        _check_tensor(name, UNORM_VEC, state[UNORM_VEC], (1,), (torch.float32,))
    weights.check_loaded(name, p, state)


def _check_tensor(name: str, key: str, t: Any, shape, dtypes) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: {key} must be a {wanted} tensor of shape {tuple(shape)}, got {got}")
    return t
