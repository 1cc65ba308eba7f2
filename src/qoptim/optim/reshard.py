"""Saved state in another layout than the live one: loading across shardings, and the exports.

* ``state["shards"]`` (``SHARDS_KEY``) records the layout of a parameter's 8-bit blocks in a saved
  state: the number of shards (along the sharded dim) they were laid out over, or ``ONE_SCALE``
  (``blocks``' module doc). After loading (``load_state_dict``, which DCP's ``set_state_dict``
  calls) a state saved with another layout (another world size, or a plain run's) is moved to the
  current one: codes move as they are, each block keeps its codes and scale where it lay within one
  saved block (bit-exact where the blocks are the same), and only blocks cut by a new shard
  boundary are requantized (values move by at most the 8-bit rounding). Same layout: bit-exact.
* DCP's ``get_state_dict`` gets the portable layout (``Export.PORTABLE``): block scales in the
  rows form for every 8-bit state, sharded or not (a plain one as one shard, a one-scale state as
  one shard of equal scales), with the layout recorded. The shapes then depend only on the
  parameter's shape, so DCP loads and reshards a checkpoint of one device into FSDP2 ranks and
  back, like any tensor, and full state dicts distribute the same way.
* FSDP1 (``FullyShardedDataParallel``) gathers and reshards only the tensors it finds directly in a
  parameter's state and compares everything else across ranks. Its flat-parameter shards also cut
  8-bit blocks at arbitrary places. So when FSDP1 asks for the state dict (``requested_export``)
  the quantized states are exported dequantized, as float32 tensors shaped like the parameter
  (what ``torch.optim.AdamW`` would hold) plus ``"qoptim_dequantized": 1`` (``DEQUANTIZED_KEY``);
  loading requantizes them. A bf16 / fp16 parameter's master correction goes the same way: its
  integers as float32 shaped like the parameter, with the master's width (``MASTER_BITS_KEY``).
  See README's "Distributed training" section.
"""

from __future__ import annotations

import enum
import math
import sys
from typing import Any, Callable

import torch

from ..kernels import BLOCK
from ..quant.blockwise import dequantize_flat
from . import blocks, dtensor, weights
from .blocks import ONE_SCALE
from .dtensor import is_dtensor
from .state import KEYS, MASTER_CORRECTION, StateKeys

__all__ = [
    "DEQUANTIZED_KEY", "MASTER_BITS_KEY", "ONE_SCALE", "SHARDS_KEY", "Export", "dequantized_state", "exported_state", "portable_state",
    "record_shards", "requested_export", "to_current_layout",
]  # fmt: skip

DEQUANTIZED_KEY = "qoptim_dequantized"
MASTER_BITS_KEY = "qoptim_master_bits"  # FSDP1's export: the width of the master whose correction it holds as float32
SHARDS_KEY = "shards"


class Export(enum.Enum):
    """Which layout a state dict is written in."""

    BITSANDBYTES = "bitsandbytes"  # bitsandbytes' nested layout (with the shard count of a sharded layout)
    PORTABLE = "portable"  # DCP's get_state_dict: scales in the rows form whether sharded or not, layout recorded
    FSDP1 = "fsdp1"  # flat, 8-bit states dequantized to float32: what FSDP1 can gather and reshard


def requested_export() -> Export:
    """FSDP1 when FSDP1's optimizer state dict code (``FSDP.optim_state_dict``,
    ``full_optim_state_dict``, or DCP's ``get_state_dict`` on an FSDP1 model) is asking for the
    optimizer's state dict (called from ``Optimizer8bit.state_dict``); PORTABLE when DCP's
    ``get_state_dict`` / ``set_state_dict`` asks on any other model; else BITSANDBYTES.

    Why the caller's frames: torch gives the optimizer no other signal. DCP's
    ``_get_optim_state_dict`` calls ``optim.state_dict()`` before it enters its FSDP context, and
    ``FSDP.optim_state_dict`` / ``full_optim_state_dict`` call it before anything else; no flag,
    hook or state dict type is set on the optimizer (or reachable from it) at that point, and
    FSDP1's parameters look the same when the state dict is saved per rank without FSDP1. So we
    look at who called us, up to a few frames up, and nowhere else."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return Export.BITSANDBYTES
        name = frame.f_globals.get("__name__", "")
        if name in ("torch.distributed.fsdp.fully_sharded_data_parallel", "torch.distributed.fsdp._optim_utils"):
            return Export.FSDP1
        if name == "torch.distributed.checkpoint.state_dict":
            info = frame.f_locals.get("info")
            return Export.FSDP1 if getattr(info, "fsdp_modules", None) else Export.PORTABLE
        frame = frame.f_back
    return Export.BITSANDBYTES


# ---- saving ---------------------------------------------------------------------------------


def exported_state(state: dict[str, Any], n_states: int, export: Export) -> dict[str, Any]:
    """One parameter's state (``n_states`` state keys) as ``export`` writes it (flat, not yet nested)."""
    if export is Export.FSDP1:
        return dequantized_state(state, n_states)
    if export is Export.PORTABLE:
        return portable_state(state, n_states)
    return record_shards(state)


def record_shards(state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's state with the shard count of a sharded block layout recorded (so that
    another world size can requantize); any other state as is."""
    absmax = state.get(KEYS[0].absmax)
    if is_dtensor(absmax) and absmax.dim() >= 2:
        shards = dtensor.mesh_shards(absmax)
        if shards is not None:
            state = dict(state)
            state[SHARDS_KEY] = shards
    return state


def portable_state(state: dict[str, Any], n_states: int) -> dict[str, Any]:
    """One parameter's state in the portable layout (see the module doc): a sharded state as it
    is, with its shard count; a plain one's block scales in the rows form of one shard; a
    one-scale state as one shard of equal scales (``ONE_SCALE`` recorded; its ``new_max``, the
    previous step's scale that the update does not read, is not written)."""
    out = dict(record_shards(state))  # (a copy: torch's state dict holds the live state's dicts)
    for keys in KEYS[:n_states]:
        values = state.get(keys.values)
        if not isinstance(values, torch.Tensor) or values.dtype != torch.uint8:
            continue
        nprefix = _stacked(state, keys)
        shape = values.shape[nprefix:]
        absmax = state.get(keys.absmax)
        if isinstance(absmax, torch.Tensor) and absmax.dim() == nprefix + 1:  # flat: blocks over the whole tensor
            rows = blocks.rows_of_flat(dtensor.local(absmax), shape)
            out[keys.absmax] = dtensor.like(absmax, rows, rows.shape) if is_dtensor(absmax) else rows
            out[SHARDS_KEY] = 1
        elif isinstance(state.get(keys.max), torch.Tensor):
            scale = state[keys.max].reshape(-1)[:1].to(torch.float32)
            flat = scale.expand(*values.shape[:nprefix], math.ceil(math.prod(shape) / BLOCK))
            out[keys.absmax] = blocks.rows_of_flat(flat, shape)
            del out[keys.max]
            out.pop(keys.new_max, None)
            out[SHARDS_KEY] = ONE_SCALE
    return out


def _stacked(state: dict[str, Any], keys: StateKeys) -> int:
    """How many leading dims a state has over its parameter: 1 for a stacked ``state1`` (AdEMAMix's
    fast and slow momentum, ``state.py``), else 0."""
    if keys is not KEYS[0] or not isinstance(state.get(KEYS[1].values), torch.Tensor):
        return 0
    return max(state[keys.values].dim() - state[KEYS[1].values].dim(), 0)


def dequantized_state(state: dict[str, Any], n_states: int) -> dict[str, Any]:
    """One parameter's state with its 8-bit states as float32 values shaped like the states (the
    layout FSDP1 can gather and reshard). qmap and absmax go: loading requantizes with the family's maps."""
    out = dict(state)
    changed = False
    for keys in KEYS[:n_states]:
        values = state.get(keys.values)
        if not isinstance(values, torch.Tensor) or values.dtype != torch.uint8 or keys.absmax not in state or is_dtensor(values):
            continue
        absmax, qmap = state[keys.absmax], state[keys.qmap]
        flat = values.reshape(-1)
        if values.dim() > 1 and values.shape[0] == absmax.shape[0] and absmax.dim() == 2:  # stacked (AdEMAMix)
            dense = torch.stack([dequantize_flat(values[r].reshape(-1), absmax[r], qmap, BLOCK) for r in range(values.shape[0])])
        else:
            dense = dequantize_flat(flat, absmax.reshape(-1), qmap, BLOCK)
        out[keys.values] = dense.view(values.shape)
        del out[keys.absmax], out[keys.qmap]
        changed = True
    if changed:
        out[DEQUANTIZED_KEY] = 1
    correction = state.get(MASTER_CORRECTION)
    if isinstance(correction, torch.Tensor) and not is_dtensor(correction):
        out[MASTER_CORRECTION] = weights.correction_values(correction)
        out[MASTER_BITS_KEY] = weights.correction_bits(correction)
    return out


# ---- loading: same layout, another layout, or dequantized (FSDP1) -----------------------------


MapFor = Callable[[str, torch.device], torch.Tensor]  # the optimizer's map of a name, on a device


def to_current_layout(p: torch.Tensor, state: dict[str, Any], layout, map_for: MapFor) -> dict[str, Any]:
    """A loaded parameter state in the layout ``p`` needs now (see the module doc); ``map_for``
    gives the optimizer's map of a name on a device (to requantize a dequantized state).
    Collective (``full_tensor``) for DTensor parameters whose layout changed: every rank loads together."""
    if not state:
        return state
    state = dict(state)
    dequantized = bool(state.pop(DEQUANTIZED_KEY, 0))
    record = state.pop(SHARDS_KEY, None)
    if record is not None and (isinstance(record, bool) or not isinstance(record, int) or record < 0):
        raise ValueError(f"the loaded '{SHARDS_KEY}' record is {record!r}; expected a shard count (an int >= 1) or 0 (one scale)")
    for kept in layout:
        keys = kept.keys
        values = state.get(keys.values)
        if not isinstance(values, torch.Tensor):
            continue
        prefix = tuple(values.shape[: max(values.dim() - p.dim(), 0)])
        whole_shape = (*prefix, *p.shape)
        if dequantized and values.dtype == torch.float32 and keys.qmap not in state:
            whole = dtensor.full(values)
            if whole.shape != whole_shape:
                continue  # let the checks report it
            qmap = map_for(kept.map_name, p.device)
            part = dtensor.local_part(whole.to(p.device), p, len(prefix)) if is_dtensor(p) else whole.to(p.device)
            codes = torch.zeros(part.shape, dtype=torch.uint8, device=p.device)
            scales = torch.zeros((*prefix, math.ceil(part[(0,) * len(prefix)].numel() / BLOCK)), device=p.device)
            for idx in _prefix_indices(prefix):
                if part[idx].numel():
                    new_codes, scales[idx] = blocks.requantized(part[idx].reshape(-1).float(), qmap)
                    codes[idx].view(-1).copy_(new_codes)
            state[keys.values], state[keys.absmax] = _placed(p, prefix, codes, scales)
            state[keys.qmap] = qmap
            continue
        if values.dtype != torch.uint8:
            if is_dtensor(p) and not is_dtensor(values) and tuple(values.shape) == whole_shape:
                state[keys.values] = dtensor.distribute_like(values, p, len(prefix))
            continue
        _move_blocks(p, state, keys, record, prefix)
    bits = state.pop(MASTER_BITS_KEY, None)
    correction = state.get(MASTER_CORRECTION)
    if isinstance(correction, torch.Tensor) and correction.is_floating_point():  # FSDP1's export
        state[MASTER_CORRECTION] = correction = weights.correction_from_values(correction, bits)
    if is_dtensor(p) and isinstance(correction, torch.Tensor) and not is_dtensor(correction) and correction.shape[: p.dim()] == p.shape:
        state[MASTER_CORRECTION] = dtensor.distribute_like(correction, p, 0)  # a whole one (a full state dict); trailing dims: see weights
    return state


def _move_blocks(p: torch.Tensor, state: dict[str, Any], keys: StateKeys, record: Any, prefix: tuple) -> None:
    """One loaded 8-bit state (codes and scales under ``keys``, saved in the layout ``record``
    says, or bitsandbytes' flat or one-scale layout) moved, in ``state``, to ``p``'s layout now."""
    values, nprefix = state[keys.values], len(prefix)
    one_scale = isinstance(state.get(keys.max), torch.Tensor)
    if one_scale:  # (an absmax beside it is the destination's own, left by set_state_dict's merge of a full state dict)
        state.pop(keys.absmax, None)
    scales = state.get(keys.max if one_scale else keys.absmax)
    if not isinstance(scales, torch.Tensor) or tuple(values.shape) != (*prefix, *p.shape):
        return  # let the checks report it
    sharded_now = is_dtensor(p) and dtensor.sharding(p) is not None
    target = dtensor.shards(p)
    rows_form = not one_scale and scales.dim() == nprefix + 2
    if one_scale:
        saved = ONE_SCALE
    elif not rows_form:
        saved = 1  # bitsandbytes' flat layout (a shard count beside it is the destination's own)
    else:  # without a record (not written by qoptim before the record), assume the layout of the current sharding
        saved = target if record is None else int(record)
    if not sharded_now and (saved == 1 or saved == ONE_SCALE):  # the same blocks: place the codes, reshape the scales
        if is_dtensor(p) and not is_dtensor(values):
            state[keys.values] = dtensor.distribute_like(values, p, nprefix)
        if rows_form and saved == ONE_SCALE:  # the one scale, written as equal block scales
            scale = dtensor.full(scales).reshape(-1)[:1].to(p.device, torch.float32)
            state[keys.max], state[keys.new_max] = scale.clone(), scale.clone()
            del state[keys.absmax]
        elif rows_form:
            flat = blocks.flat_of_rows(dtensor.full(scales).to(p.device), p.shape)
            state[keys.absmax] = dtensor.distribute_absmax(flat, p, prefix) if is_dtensor(p) else flat
        elif is_dtensor(p) and not one_scale and not is_dtensor(scales):
            state[keys.absmax] = dtensor.distribute_absmax(scales.to(p.device), p, prefix)
        return
    if sharded_now and rows_form and saved == target:  # the same blocks and form: distribute whole tensors
        if not is_dtensor(values):
            state[keys.values] = dtensor.distribute_like(values, p, nprefix)
        if not is_dtensor(scales) and tuple(scales.shape) == (*prefix, *dtensor.absmax_shape(p)):
            state[keys.absmax] = dtensor.distribute_absmax(scales.to(p.device), p, prefix)
        return
    d = dtensor.sharding(p)[1] if sharded_now else 0
    if rows_form and tuple(scales.shape) != (*prefix, *blocks.rows_shape(p.shape, d)):
        return  # let the checks report it
    # other blocks: each element keeps its code, each new block the scale of the saved block it lies in, if one
    table = dtensor.full(scales).to(p.device, torch.float32)
    table = table.reshape(-1)[:1] if one_scale else table.reshape(*prefix, -1)
    ids = blocks.block_ids(p.shape, d, saved, dtensor.local_rows(p), device=p.device).reshape(-1)
    codes = _local_codes(values, p, nprefix)
    qmap = state[keys.qmap].to(p.device)
    out_codes = torch.empty_like(codes)
    out_scales = torch.zeros((*prefix, math.ceil(ids.numel() / BLOCK)), device=p.device)
    for idx in _prefix_indices(prefix):
        if ids.numel():
            new_codes, out_scales[idx] = blocks.moved(codes[idx].reshape(-1), ids, table if one_scale else table[idx], qmap)
            out_codes[idx].view(-1).copy_(new_codes)
    state[keys.values], state[keys.absmax] = _placed(p, prefix, out_codes, out_scales)
    state.pop(keys.max, None)
    state.pop(keys.new_max, None)


def _local_codes(values: torch.Tensor, p: torch.Tensor, nprefix: int) -> torch.Tensor:
    """This rank's part of loaded codes shaped like ``p`` (whole for a plain ``p``), gathered only
    where they are not already distributed the way ``p`` is."""
    if is_dtensor(values):
        same_placements = is_dtensor(p) and tuple(values.placements) == dtensor.shift(p.placements, nprefix)
        if same_placements and values.device_mesh == p.device_mesh:
            return dtensor.local(values).to(p.device).contiguous()
        values = values.full_tensor()
    values = values.to(p.device)
    return dtensor.local_part(values, p, nprefix) if is_dtensor(p) else values.contiguous()


def _placed(p: torch.Tensor, prefix: tuple, codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) as ``p``'s state keeps them, from this rank's codes and flat block scales
    (``(*prefix, n_blocks)``)."""
    if not is_dtensor(p):
        return codes, scales
    whole = dtensor.wrap(codes, p, dtensor.shift(p.placements, len(prefix)), (*prefix, *p.shape))
    absmax = dtensor.absmax_buffer(p, (*prefix, *dtensor.absmax_shape(p)))
    dtensor.local(absmax).view(*prefix, -1)[..., : scales.shape[-1]].copy_(scales)
    return whole, absmax


def _prefix_indices(prefix: tuple):
    if not prefix:
        return [()]
    return [(i,) for i in range(prefix[0])]  # AdEMAMix's stacked state1: one leading dim
