"""Saved state in another layout than the live one: what each kind of caller gets written.

* ``state["shards"]`` (``SHARDS_KEY``) records the layout of a parameter's quantization blocks in a
  saved state: the number of shards (along the sharded dim) they were laid out over, or
  ``ONE_SCALE`` (``blocks``' module doc). Loading a state saved in another layout is ``reshard``'s.
* DCP's ``get_state_dict`` gets the portable layout (``Export.PORTABLE``): block scales in the
  rows form for every quantized state, sharded or not (a plain one as one shard, a one-scale state
  as one shard of equal scales), with the layout recorded. The shapes then depend only on the
  parameter's shape (and the state's format: 256-blocks for 8-bit states, 128 for 4-bit ones), so
  DCP loads and reshards a checkpoint of one device into FSDP2 ranks and back, like any tensor,
  and full state dicts distribute the same way. A 4-bit state's ``state1`` (both moments' codes
  in each byte) is elementwise data like any other state.
* FSDP1 (``FullyShardedDataParallel``) gathers and reshards only the tensors it finds directly in a
  parameter's state and compares everything else across ranks. Its flat-parameter shards also cut
  blocks at arbitrary places. So when FSDP1 asks for the state dict (``requested_export``) the
  quantized states are exported dequantized, as float32 tensors shaped like the parameter (what
  ``torch.optim.AdamW`` would hold: for a 4-bit state ``state1`` and ``state2``, both moments)
  plus ``"qoptim_dequantized": 1`` (``DEQUANTIZED_KEY``); loading requantizes them into the
  format of the loading optimizer's ``optim_bits``. A bf16 / fp16 parameter's master correction
  goes the same way: its integers as float32 shaped like the parameter, with the master's width
  (``MASTER_BITS_KEY``). See README's "Distributed training" section.
"""

from __future__ import annotations

import enum
import math
import sys
from typing import Any

import torch

from ..quant.blockwise import dequantize_flat
from . import blocks, dtensor, weights
from .blocks import ONE_SCALE
from .dtensor import is_dtensor
from .state import CODE_SHIFTS, KEYS, MASTER_CORRECTION, StateKeys, format_of_state, shared_bytes

__all__ = [
    "DEQUANTIZED_KEY", "MASTER_BITS_KEY", "SHARDS_KEY", "Export", "codes_key", "dequantized_state", "exported_state", "portable_state",
    "record_shards", "requested_export",
]  # fmt: skip

DEQUANTIZED_KEY = "qoptim_dequantized"
MASTER_BITS_KEY = "qoptim_master_bits"  # FSDP1's export: the width of the master whose correction it holds as float32
SHARDS_KEY = "shards"


class Export(enum.Enum):
    """Which layout a state dict is written in."""

    BITSANDBYTES = "bitsandbytes"  # bitsandbytes' nested layout (with the shard count of a sharded layout)
    PORTABLE = "portable"  # DCP's get_state_dict: scales in the rows form whether sharded or not, layout recorded
    FSDP1 = "fsdp1"  # flat, quantized states dequantized to float32: what FSDP1 can gather and reshard


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


def codes_key(state: dict[str, Any], keys: StateKeys) -> tuple[str, int | None]:
    """Where the codes of the state under ``keys`` lie in a parameter's ``state``: (the key of their
    tensor, the bit their 4-bit codes start from in its bytes, or None for one code per byte)."""
    if shared_bytes(state):
        return KEYS[0].values, CODE_SHIFTS[KEYS.index(keys)]
    return keys.values, None


def _stacked(state: dict[str, Any], keys: StateKeys) -> int:
    """How many leading dims a state has over its parameter: 1 for a stacked ``state1`` (AdEMAMix's
    fast and slow momentum, ``state.py``), else 0."""
    if keys is not KEYS[0] or not isinstance(state.get(KEYS[1].values), torch.Tensor):
        return 0
    return max(state[keys.values].dim() - state[KEYS[1].values].dim(), 0)


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
    fmt = format_of_state(state)
    for keys in KEYS[:n_states]:
        values = state.get(codes_key(state, keys)[0])
        if fmt is None or not isinstance(values, torch.Tensor) or values.dtype != torch.uint8:
            continue
        nprefix = _stacked(state, keys)
        shape = values.shape[nprefix:]
        absmax = state.get(keys.absmax)
        if isinstance(absmax, torch.Tensor) and absmax.dim() == nprefix + 1:  # flat: blocks over the whole tensor
            rows = blocks.rows_of_flat(dtensor.local(absmax), shape, blocksize=fmt.blocksize)
            out[keys.absmax] = dtensor.like(absmax, rows, rows.shape) if is_dtensor(absmax) else rows
            out[SHARDS_KEY] = 1
        elif isinstance(state.get(keys.max), torch.Tensor):
            scale = state[keys.max].reshape(-1)[:1].to(torch.float32)
            flat = scale.expand(*values.shape[:nprefix], math.ceil(math.prod(shape) / fmt.blocksize))
            out[keys.absmax] = blocks.rows_of_flat(flat, shape, blocksize=fmt.blocksize)
            del out[keys.max]
            out.pop(keys.new_max, None)
            out[SHARDS_KEY] = ONE_SCALE
    return out


def dequantized_state(state: dict[str, Any], n_states: int) -> dict[str, Any]:
    """One parameter's state with its quantized states as float32 values shaped like the states
    (the layout FSDP1 can gather and reshard): a 4-bit state's two moments as ``state1`` and
    ``state2``. qmap and absmax go: loading requantizes in the loading optimizer's format."""
    out = dict(state)
    fmt = format_of_state(state)
    changed = False
    for keys in KEYS[:n_states]:
        key, shift = codes_key(state, keys)
        values = state.get(key)
        quantized = isinstance(values, torch.Tensor) and values.dtype == torch.uint8 and keys.absmax in state
        if fmt is None or not quantized or is_dtensor(values):
            continue
        absmax, qmap = state[keys.absmax], state[keys.qmap]
        codes = values if shift is None else blocks.nibble(values, shift)
        if codes.dim() > 1 and codes.shape[0] == absmax.shape[0] and absmax.dim() == 2:  # stacked (AdEMAMix)
            dense = torch.stack([dequantize_flat(codes[r].reshape(-1), absmax[r], qmap, fmt.blocksize) for r in range(codes.shape[0])])
        else:
            dense = dequantize_flat(codes.reshape(-1), absmax.reshape(-1), qmap, fmt.blocksize)
        out[keys.values] = dense.view(codes.shape)
        del out[keys.absmax], out[keys.qmap]
        changed = True
    if changed:
        out[DEQUANTIZED_KEY] = 1
    correction = state.get(MASTER_CORRECTION)
    if isinstance(correction, torch.Tensor) and not is_dtensor(correction):
        out[MASTER_CORRECTION] = weights.correction_values(correction)
        out[MASTER_BITS_KEY] = weights.correction_bits(correction)
    return out
