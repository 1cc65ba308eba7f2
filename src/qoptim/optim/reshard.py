"""Saved state in another layout than the live one: loading across shardings, and the FSDP1 export.

* ``state["shards"]`` (``SHARDS_KEY``) records how many shards a sharded parameter's 8-bit blocks
  were laid out over (``dtensor``'s module doc). After loading (``load_state_dict``, which DCP's
  ``set_state_dict`` calls) a state saved with another layout (another world size, or the plain
  layout of an unsharded run) is dequantized with its own layout and requantized block-wise for
  the current shards. That is the one non-bit-exact path: values move by at most the 8-bit
  quantization error. Same layout: bit-exact.
* FSDP1 (``FullyShardedDataParallel``) gathers and reshards only the tensors it finds directly in a
  parameter's state and compares everything else across ranks. Its flat-parameter shards also cut
  8-bit blocks at arbitrary places. So when FSDP1 asks for the state dict (``requested_export``)
  the quantized states are exported dequantized, as float32 tensors shaped like the parameter
  (what ``torch.optim.AdamW`` would hold) plus ``"qoptim_dequantized": 1`` (``DEQUANTIZED_KEY``);
  loading requantizes them. See ``docs/distributed.md``.
"""

from __future__ import annotations

import enum
import math
import sys
from typing import Any, Callable

import torch

from ..kernels import BLOCK
from ..quant.blockwise import block_absmax, dequantize_flat, quantize_with_absmax
from . import dtensor
from .dtensor import is_dtensor
from .state import KEYS

__all__ = [
    "DEQUANTIZED_KEY", "SHARDS_KEY", "Export", "dequantized_state", "record_shards", "requested_export", "to_current_layout",
]  # fmt: skip

DEQUANTIZED_KEY = "qoptim_dequantized"
SHARDS_KEY = "shards"


class Export(enum.Enum):
    """Which layout a state dict is written in."""

    BITSANDBYTES = "bitsandbytes"  # bitsandbytes' nested layout (with the shard count of a sharded layout)
    FSDP1 = "fsdp1"  # flat, 8-bit states dequantized to float32: what FSDP1 can gather and reshard


def requested_export() -> Export:
    """FSDP1 when FSDP1's optimizer state dict code (``FSDP.optim_state_dict``,
    ``full_optim_state_dict``, or DCP's ``get_state_dict`` on an FSDP1 model) is asking for the
    optimizer's state dict (called from ``Optimizer8bit.state_dict``).

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
            return Export.FSDP1 if getattr(info, "fsdp_modules", None) else Export.BITSANDBYTES
        frame = frame.f_back
    return Export.BITSANDBYTES


# ---- saving ---------------------------------------------------------------------------------


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
    return out


# ---- loading: same layout, another layout (requantize), or dequantized (FSDP1) ------------------


MapFor = Callable[[str, torch.device], torch.Tensor]  # the optimizer's map of a name, on a device


def to_current_layout(p: torch.Tensor, state: dict[str, Any], layout, map_for: MapFor) -> dict[str, Any]:
    """A loaded parameter state in the layout ``p`` needs now (see the module doc); ``map_for``
    gives the optimizer's map of a name on a device (to requantize a dequantized state).
    Collective (``full_tensor``) for DTensor parameters whose layout changed: every rank loads together."""
    if not state:
        return state
    state = dict(state)
    dequantized = bool(state.pop(DEQUANTIZED_KEY, 0))
    saved_shards = state.pop(SHARDS_KEY, None)
    target = dtensor.shards(p)
    for kept in layout:
        keys = kept.keys
        values = state.get(keys.values)
        if not isinstance(values, torch.Tensor):
            continue
        prefix = tuple(values.shape[: values.dim() - p.dim()])
        whole_shape = (*prefix, *p.shape)
        if dequantized and values.dtype == torch.float32 and keys.qmap not in state:
            whole = dtensor.full(values)
            if whole.shape != whole_shape:
                continue  # let the checks report it
            qmap = map_for(kept.map_name, p.device)
            state[keys.values], state[keys.absmax] = _quantize(whole.float(), p, qmap, prefix)
            state[keys.qmap] = qmap
            continue
        if values.dtype != torch.uint8 or keys.absmax not in state:
            if is_dtensor(p) and not is_dtensor(values) and tuple(values.shape) == whole_shape:
                state[keys.values] = dtensor.distribute_like(values, p, len(prefix))
            continue
        absmax = state[keys.absmax]
        saved_rows = absmax.dim() == len(prefix) + 2
        if saved_rows:  # without a record, assume the layout of the current sharding
            saved_shards = target if saved_shards is None else int(saved_shards)
        now_rows = is_dtensor(p) and dtensor.sharding(p) is not None
        same = saved_rows == now_rows and (not now_rows or saved_shards == target)
        if same:
            if is_dtensor(p):  # a whole (plain) tensor for a DTensor parameter: distribute it the way we shard it
                if not is_dtensor(values) and tuple(values.shape) == whole_shape:
                    state[keys.values] = dtensor.distribute_like(values, p, len(prefix))
                if not is_dtensor(absmax) and tuple(absmax.shape) == (*prefix, *dtensor.absmax_shape(p)):
                    state[keys.absmax] = dtensor.distribute_absmax(absmax.to(p.device), p, prefix)
            continue
        whole_codes, whole_absmax = dtensor.full(values), dtensor.full(absmax)
        if whole_codes.shape != whole_shape:
            continue  # let the checks report it
        qmap = state[keys.qmap].to(whole_codes.device)
        d = dtensor.sharding(p)[1] if now_rows else 0
        dense = _dequantize(whole_codes, whole_absmax, qmap, prefix, saved_shards if saved_rows else 0, d, p.shape)
        state[keys.values], state[keys.absmax] = _quantize(dense, p, qmap, prefix)
    return state


def _dequantize(codes, absmax, qmap, prefix, saved_shards: int, d: int, shape) -> torch.Tensor:
    """float32 values of whole codes laid out in blocks over ``saved_shards`` shards along dim ``d``
    (0: blocks over the whole tensor)."""
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for idx in _prefix_indices(prefix):
        c, a, o = codes[idx], absmax[idx], out[idx]
        if saved_shards == 0:
            o.view(-1).copy_(dequantize_flat(c.reshape(-1), a.reshape(-1), qmap, BLOCK))
            continue
        for s in range(saved_shards):
            start, stop = dtensor.chunk_bounds(shape[d], saved_shards, s)
            if stop <= start:
                continue
            part = c.narrow(d, start, stop - start).contiguous().reshape(-1)
            blocks = a[start:stop].reshape(-1)[: math.ceil(part.numel() / BLOCK)]
            o.narrow(d, start, stop - start).copy_(dequantize_flat(part, blocks, qmap, BLOCK).view(c.narrow(d, start, stop - start).shape))
    return out


def _quantize(dense: torch.Tensor, p: torch.Tensor, qmap: torch.Tensor, prefix: tuple):
    """(codes, absmax) of whole float32 values, laid out for ``p`` as it is sharded now."""
    sharded = is_dtensor(p)
    part = dtensor.local_part(dense, p, len(prefix)) if sharded else dense
    if sharded and dtensor.sharding(p) is not None:
        absmax = dtensor.absmax_buffer(p, (*prefix, *dtensor.absmax_shape(p)))
        absmax_local = dtensor.local(absmax)
    else:
        absmax = absmax_local = torch.zeros((*prefix, math.ceil(p.numel() / BLOCK)), device=p.device)
    codes = torch.zeros(part.shape, dtype=torch.uint8, device=p.device)
    for idx in _prefix_indices(prefix):
        x = part[idx].reshape(-1).to(p.device)
        if not x.numel():
            continue
        blocks = absmax_local[idx].reshape(-1)[: math.ceil(x.numel() / BLOCK)]
        blocks.copy_(_block_scales(x, qmap.to(p.device)))
        codes[idx].view(-1).copy_(quantize_with_absmax(x, blocks, qmap.to(p.device), BLOCK))
    if sharded:
        codes = dtensor.wrap(codes, p, dtensor.shift(p.placements, len(prefix)), dense.shape)
        if dtensor.sharding(p) is None:
            absmax = dtensor.wrap(absmax, p, dtensor.replicated(p), absmax.shape)
    return codes, absmax


def _block_scales(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Each block's scale for values that came from dequantizing codes. The kernels set a block's
    scale to its largest magnitude, which gets an end code of the map (1.0, or the signed map's
    -0.99297 for a negative one); every other element's code is at most the end code of its sign.
    So the largest ``|x| / end(sign x)`` gives the original scale back (to an ulp)."""
    low, high = float(qmap.min()), float(qmap.max())
    end = torch.where(x < 0, torch.full_like(x, abs(low) if low < 0 else high), torch.full_like(x, high))
    return block_absmax(x.abs() / end, BLOCK)


def _prefix_indices(prefix: tuple):
    if not prefix:
        return [()]
    return [(i,) for i in range(prefix[0])]  # AdEMAMix's stacked state1: one leading dim
