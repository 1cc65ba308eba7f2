"""Loading a saved state into the live layout, from another sharding or from an export
(``exports``: what each caller is written).

After loading (``load_state_dict``, which DCP's ``set_state_dict`` calls) a state saved with
another layout (another world size, or a plain run's: the ``shards`` record, ``exports``) is moved
to the current one: codes move as they are, each block keeps its codes and scale where it lay
within one saved block (bit-exact where the blocks are the same), and only blocks cut by a new
shard boundary are requantized (values move by at most the rounding of the state's format). Same
layout: bit-exact. A 4-bit state's two moments (the halves of ``state1``'s bytes) move one after
the other, each in its own 128-blocks with its own map, and are put back together.

FSDP1's export (float32 states, ``exports``) is requantized into the format the loading
optimizer's ``optim_bits`` gives the parameter (``quant.formats``; 8-bit for a 32-bit one, whose
loaded states keep their form), in the current layout.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..quant.formats import StateFormat
from . import blocks, dtensor, weights
from .blocks import ONE_SCALE
from .dtensor import is_dtensor
from .exports import DEQUANTIZED_KEY, MASTER_BITS_KEY, SHARDS_KEY, codes_key
from .state import CODE_SHIFTS, KEYS, MASTER_CORRECTION, StateKeys, format_of_state

__all__ = ["MapFor", "to_current_layout"]

MapFor = Callable[[str, torch.device], torch.Tensor]  # the optimizer's map of a name, on a device


def to_current_layout(p: torch.Tensor, state: dict[str, Any], layout, map_for: MapFor, *,
                      requantize_into: StateFormat) -> dict[str, Any]:  # fmt: skip
    """A loaded parameter state in the layout ``p`` needs now (see the module doc); ``map_for``
    gives the optimizer's map of a name on a device and ``requantize_into`` the format to put a
    dequantized state (FSDP1's export) in. Collective (``full_tensor``) for DTensor parameters
    whose layout changed: every rank loads together."""
    if not state:
        return state
    state = dict(state)
    dequantized = bool(state.pop(DEQUANTIZED_KEY, 0))
    record = state.pop(SHARDS_KEY, None)
    if record is not None and (isinstance(record, bool) or not isinstance(record, int) or record < 0):
        raise ValueError(f"the loaded '{SHARDS_KEY}' record is {record!r}; expected a shard count (an int >= 1) or 0 (one scale)")
    if dequantized:
        _requantize_export(p, state, layout, map_for, requantize_into)
    fmt = format_of_state(state)
    for kept in layout:
        keys = kept.keys
        key, shift = codes_key(state, keys)
        values = state.get(key)
        if not isinstance(values, torch.Tensor):
            continue
        prefix = tuple(values.shape[: max(values.dim() - p.dim(), 0)])
        if values.dtype != torch.uint8:
            if is_dtensor(p) and not is_dtensor(values) and tuple(values.shape) == (*prefix, *p.shape):
                state[key] = dtensor.distribute_like(values, p, len(prefix))
        elif fmt is not None:  # (codes without a map of a format: let the checks report it)
            _move_blocks(p, state, keys, record, prefix, fmt, shift)
    bits = state.pop(MASTER_BITS_KEY, None)
    correction = state.get(MASTER_CORRECTION)
    if isinstance(correction, torch.Tensor) and correction.is_floating_point():  # FSDP1's export
        state[MASTER_CORRECTION] = correction = weights.correction_from_values(correction, bits)
    if is_dtensor(p) and isinstance(correction, torch.Tensor) and not is_dtensor(correction) and correction.shape[: p.dim()] == p.shape:
        state[MASTER_CORRECTION] = dtensor.distribute_like(correction, p, 0)  # a whole one (a full state dict); trailing dims: see weights
    return state


def _requantize_export(p: torch.Tensor, state: dict[str, Any], layout, map_for: MapFor, fmt: StateFormat) -> None:
    """FSDP1's export (float32 states shaped like ``p``, no maps) requantized, in ``state``, into
    ``fmt`` in ``p``'s layout: a 4-bit one's moments into the halves of ``state1``'s bytes. A state
    that does not fit ``p`` is left to the checks (4-bit: both are, as they share one tensor)."""
    wholes = []
    for kept in layout:
        values = state.get(kept.keys.values)
        if not isinstance(values, torch.Tensor) or values.dtype != torch.float32 or kept.keys.qmap in state:
            wholes.append(None)
            continue
        whole = dtensor.full(values)
        prefix = tuple(whole.shape[: max(whole.dim() - p.dim(), 0)])
        wholes.append(whole if whole.shape == (*prefix, *p.shape) else None)
    four_bit = fmt.bits == 4
    if four_bit and any(whole is None or whole.dim() != p.dim() for whole in wholes):
        return
    shared = None  # 4-bit: the bytes of state1 so far
    for kept, whole, shift in zip(layout, wholes, CODE_SHIFTS):
        if whole is None:
            continue
        prefix = tuple(whole.shape[: whole.dim() - p.dim()])
        qmap = map_for(fmt.map_name(kept.signed), p.device)
        part = dtensor.local_part(whole.to(p.device), p, len(prefix)) if is_dtensor(p) else whole.to(p.device)
        codes = torch.zeros(part.shape, dtype=torch.uint8, device=p.device)
        scales = torch.zeros((*prefix, math.ceil(part[(0,) * len(prefix)].numel() / fmt.blocksize)), device=p.device)
        for idx in _prefix_indices(prefix):
            if part[idx].numel():
                new_codes, scales[idx] = blocks.requantized(part[idx].reshape(-1).float(), qmap, fmt)
                codes[idx].view(-1).copy_(new_codes)
        key = kept.keys.values
        if four_bit:
            shared = codes = blocks.with_nibble(torch.zeros_like(codes) if shared is None else shared, codes, shift)
            key = KEYS[0].values
            if kept.keys is not KEYS[0]:
                del state[kept.keys.values]
        state[key], state[kept.keys.absmax] = _placed(p, prefix, codes, scales, fmt)
        state[kept.keys.qmap] = qmap


def _move_blocks(p: torch.Tensor, state: dict[str, Any], keys: StateKeys, record: Any, prefix: tuple, fmt: StateFormat,
                 shift: int | None) -> None:  # fmt: skip
    """One loaded quantized state in ``fmt`` (codes and scales under ``keys``, saved in the layout
    ``record`` says, or bitsandbytes' flat or one-scale layout; 4-bit codes in ``state1``'s bytes
    from bit ``shift`` up) moved, in ``state``, to ``p``'s layout now."""
    key = keys.values if shift is None else KEYS[0].values
    values, nprefix = state[key], len(prefix)
    one_scale = isinstance(state.get(keys.max), torch.Tensor)
    if one_scale:  # (an absmax beside it is the destination's own, left by set_state_dict's merge of a full state dict)
        state.pop(keys.absmax, None)
    scales, qmap = state.get(keys.max if one_scale else keys.absmax), state.get(keys.qmap)
    if not isinstance(scales, torch.Tensor) or not isinstance(qmap, torch.Tensor) or tuple(values.shape) != (*prefix, *p.shape):
        return  # let the checks report it
    size = fmt.blocksize
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
            state[key] = dtensor.distribute_like(values, p, nprefix)
        if rows_form and saved == ONE_SCALE:  # the one scale, written as equal block scales
            scale = dtensor.full(scales).reshape(-1)[:1].to(p.device, torch.float32)
            state[keys.max], state[keys.new_max] = scale.clone(), scale.clone()
            del state[keys.absmax]
        elif rows_form:
            flat = blocks.flat_of_rows(dtensor.full(scales).to(p.device), p.shape, blocksize=size)
            state[keys.absmax] = dtensor.distribute_absmax(flat, p, prefix, blocksize=size) if is_dtensor(p) else flat
        elif is_dtensor(p) and not one_scale and not is_dtensor(scales):
            state[keys.absmax] = dtensor.distribute_absmax(scales.to(p.device), p, prefix, blocksize=size)
        return
    if sharded_now and rows_form and saved == target:  # the same blocks and form: distribute whole tensors
        if not is_dtensor(values):
            state[key] = dtensor.distribute_like(values, p, nprefix)
        if not is_dtensor(scales) and tuple(scales.shape) == (*prefix, *dtensor.absmax_shape(p, blocksize=size)):
            state[keys.absmax] = dtensor.distribute_absmax(scales.to(p.device), p, prefix, blocksize=size)
        return
    d = dtensor.sharding(p)[1] if sharded_now else 0
    if rows_form and tuple(scales.shape) != (*prefix, *blocks.rows_shape(p.shape, d, blocksize=size)):
        return  # let the checks report it
    # other blocks: each element keeps its code, each new block the scale of the saved block it lies in, if one
    table = dtensor.full(scales).to(p.device, torch.float32)
    table = table.reshape(-1)[:1] if one_scale else table.reshape(*prefix, -1)
    ids = blocks.block_ids(p.shape, d, saved, dtensor.local_rows(p), blocksize=size, device=p.device).reshape(-1)
    codes = _local_codes(values, p, nprefix)  # (4-bit: both moments' bytes)
    own = codes if shift is None else blocks.nibble(codes, shift)
    qmap = qmap.to(p.device)
    out_codes = torch.empty_like(own)
    out_scales = torch.zeros((*prefix, math.ceil(ids.numel() / size)), device=p.device)
    for idx in _prefix_indices(prefix):
        if ids.numel():
            new_codes, out_scales[idx] = blocks.moved(own[idx].reshape(-1), ids, table if one_scale else table[idx], qmap, fmt)
            out_codes[idx].view(-1).copy_(new_codes)
    if shift is not None:  # the other moment's codes stay in the other half of each byte
        out_codes = blocks.with_nibble(codes, out_codes, shift)
    state[key], state[keys.absmax] = _placed(p, prefix, out_codes, out_scales, fmt)
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


def _placed(p: torch.Tensor, prefix: tuple, codes: torch.Tensor, scales: torch.Tensor,
            fmt: StateFormat) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(codes, absmax) as ``p``'s state keeps them, from this rank's codes and flat block scales
    (``(*prefix, n_blocks)``) in ``fmt``'s blocks."""
    if not is_dtensor(p):
        return codes, scales
    whole = dtensor.wrap(codes, p, dtensor.shift(p.placements, len(prefix)), (*prefix, *p.shape))
    absmax = dtensor.absmax_buffer(p, (*prefix, *dtensor.absmax_shape(p, blocksize=fmt.blocksize)))
    dtensor.local(absmax).view(*prefix, -1)[..., : scales.shape[-1]].copy_(scales)
    return whole, absmax


def _prefix_indices(prefix: tuple):
    if not prefix:
        return [()]
    return [(i,) for i in range(prefix[0])]  # AdEMAMix's stacked state1: one leading dim
