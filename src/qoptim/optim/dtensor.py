"""Optimizer state for sharded parameters (FSDP2 / DTensor) and the FSDP1 state dict layout.

The kernels see flat contiguous local tensors; this module is the only place that knows about
``DTensor``. For a parameter that is a DTensor:

* the update runs on its local shard (``local(p)``, ``local(p.grad)``), in place;
* ``state1``/``state2`` are DTensors with the parameter's mesh and placements, holding codes
  (or float32 values) shaped like the local shard. Elementwise data, so DCP reshards it exactly;
* quantization blocks are laid out per local shard (a block never straddles a shard boundary:
  the kernel updates one rank's shard with no view of the neighbour's elements). ``absmax`` is a
  DTensor of global shape ``(size_d, k)``, sharded along its dim 0 exactly like the parameter
  along its sharded dim ``d``, with ``k = ceil(numel / size_d / 256)``. A shard with ``r`` rows of
  the parameter has at most ``r * k`` blocks; it keeps them in the first entries of its ``(r, k)``
  rows, the rest stays zero. That global shape does not depend on the world size, so DCP can load
  a checkpoint onto another world size without a size mismatch;
* ``state["shards"]`` records how many shards the blocks were laid out over. After loading
  (``load_state_dict``, which ``set_state_dict`` calls) a state saved with another layout (another
  world size, or the plain layout of an unsharded run) is dequantized with its own layout and
  requantized block-wise for the current shards. That is the one non-bit-exact path: values move
  by at most the 8-bit quantization error. Same layout: bit-exact.

Replicated placements (e.g. HSDP's replicate dim) keep the whole-tensor layout. Limits: one
sharded mesh dimension per parameter, and no features that need a norm over the whole
parameter (``percentile_clipping``, LAMB/LARS, ``block_wise=False``) on sharded parameters.

FSDP1 (``FullyShardedDataParallel``) gathers and reshards only the tensors it finds directly in a
parameter's state and compares everything else across ranks. Its flat-parameter shards also cut
8-bit blocks at arbitrary places. So when FSDP1 asks for the state dict (``fsdp1_caller()``) the
quantized states are exported dequantized, as float32 tensors shaped like the parameter (what
``torch.optim.AdamW`` would hold) plus ``"qoptim_dequantized": 1``; ``load_state_dict`` requantizes
them. See ``docs/distributed.md``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from ..kernels import BLOCK
from ..quant.blockwise import block_absmax, dequantize_flat, quantize_with_absmax

try:  # torch.distributed may be compiled out
    from torch.distributed.tensor import DTensor, Replicate, Shard
except Exception:  # pragma: no cover
    DTensor = None

DEQUANTIZED_KEY = "qoptim_dequantized"
SHARDS_KEY = "shards"


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> Any:
    """The local shard of a DTensor (aliasing its storage), anything else as is."""
    return t.to_local() if is_dtensor(t) else t


def _sharding(p: torch.Tensor) -> tuple[int, int] | None:
    """(mesh dim, tensor dim) of a DTensor parameter's one Shard placement, None if replicated."""
    found = None
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(f"qoptim: DTensor parameters with placement {placement} are not supported (Shard or Replicate)")
        if found is not None:
            raise NotImplementedError("qoptim: DTensor parameters sharded over more than one mesh dimension are not supported")
        found = (mesh_dim, placement.dim)
    return found


def shards(p: torch.Tensor) -> int:
    """Number of shards the 8-bit blocks of ``p``'s state are laid out over (1: the whole tensor)."""
    if not is_dtensor(p):
        return 1
    sharding = _sharding(p)
    return 1 if sharding is None else p.device_mesh.size(sharding[0])


def check_param(p: torch.Tensor, config: dict[str, Any], layer_wise: bool) -> None:
    """Reject what a sharded parameter can't do (the update only sees the local shard)."""
    if not is_dtensor(p):
        return
    if is_dtensor(p.grad) and tuple(p.grad.placements) != tuple(p.placements):
        raise ValueError(f"qoptim: the gradient's placements {p.grad.placements} differ from the parameter's {p.placements}")
    if not is_dtensor(p.grad):
        raise ValueError("qoptim: a DTensor parameter needs a DTensor gradient")
    if _sharding(p) is None:
        return
    if config.get("percentile_clipping", 100) < 100 or layer_wise or not config.get("block_wise", True):
        raise NotImplementedError(
            "qoptim: percentile_clipping, LAMB/LARS (max_unorm) and block_wise=False need the whole parameter's norm; "
            "they are not supported on sharded (DTensor) parameters"
        )


def _shift(placements, by: int) -> tuple:
    return tuple(Shard(pl.dim + by) if isinstance(pl, Shard) else pl for pl in placements)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _wrap(local_t: torch.Tensor, p: torch.Tensor, placements, shape) -> torch.Tensor:
    shape = torch.Size(shape)
    return DTensor.from_local(local_t, p.device_mesh, placements, run_check=False, shape=shape, stride=_contiguous_stride(shape))


def state_buffer(p: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """A zero state buffer of global ``shape`` (``p.shape``, maybe with leading dims): a DTensor
    shaped like ``p``'s local shard, with ``p``'s mesh and placements."""
    shape = torch.Size(shape)
    prefix = shape[: len(shape) - p.dim()]
    local_t = torch.zeros((*prefix, *local(p).shape), dtype=dtype, device=p.device)
    return _wrap(local_t, p, _shift(p.placements, len(prefix)), shape)


def absmax_shape(p: torch.Tensor) -> torch.Size:
    """Global shape of a sharded parameter's absmax (without leading dims), see the module doc."""
    sharding = _sharding(p)
    if sharding is None:
        return torch.Size([math.ceil(p.numel() / BLOCK)])
    size_d = p.shape[sharding[1]]
    return torch.Size([size_d, math.ceil(p.numel() // max(size_d, 1) / BLOCK)])


def absmax_buffer(p: torch.Tensor, shape) -> torch.Tensor:
    """A zero absmax DTensor of global ``shape`` (``absmax_shape(p)`` maybe with leading dims)."""
    shape = torch.Size(shape)
    sharding = _sharding(p)
    if sharding is None:
        return _wrap(torch.zeros(shape, device=p.device), p, tuple(Replicate() for _ in p.placements), shape)
    mesh_dim, d = sharding
    prefix = shape[:-2]
    local_rows = local(p).shape[d]
    placements = tuple(Shard(len(prefix)) if i == mesh_dim else Replicate() for i in range(p.device_mesh.ndim))
    return _wrap(torch.zeros((*prefix, local_rows, shape[-1]), device=p.device), p, placements, shape)


def blocks_of(absmax: torch.Tensor, n: int) -> torch.Tensor:
    """The flat absmax of one state's ``n`` local values: a contiguous view of the local blocks."""
    return local(absmax).reshape(-1)[: math.ceil(n / BLOCK)]


# ---- loading: same layout, another layout (requantize), or dequantized (FSDP1) ------------------


def adapt_loaded_state(opt, p: torch.Tensor, state: dict[str, Any], n_states: int) -> dict[str, Any]:
    """A loaded parameter state in the layout ``p`` needs now (see the module doc). Collective
    (``full_tensor``) for DTensor parameters whose layout changed: every rank loads together."""
    if not state:
        return state
    state = dict(state)
    dequantized = bool(state.pop(DEQUANTIZED_KEY, 0))
    saved_shards = state.pop(SHARDS_KEY, None)
    target = shards(p)
    for i in range(1, n_states + 1):
        key, amkey = f"state{i}", f"absmax{i}"
        values = state.get(key)
        if not isinstance(values, torch.Tensor):
            continue
        prefix = tuple(values.shape[: values.dim() - p.dim()])
        if dequantized and values.dtype == torch.float32 and f"qmap{i}" not in state:
            full = _full(values)
            if full.shape != (*prefix, *p.shape):
                continue  # let the checks report it
            if not opt.name2qmap:
                opt.fill_qmap()
            qmap = opt.name2qmap["dynamic" if opt.family.signed[i - 1] else "udynamic"].to(p.device)
            state[key], state[amkey] = _quantize(full.float(), p, qmap, prefix)
            state[f"qmap{i}"] = qmap
            continue
        if values.dtype != torch.uint8 or amkey not in state:
            if is_dtensor(p) and not is_dtensor(values) and tuple(values.shape) == (*prefix, *p.shape):
                state[key] = _wrap(_local_part(values.to(p.device), p, len(prefix)), p, _shift(p.placements, len(prefix)), values.shape)
            continue
        absmax = state[amkey]
        saved_rows = absmax.dim() == len(prefix) + 2
        if saved_rows:  # without a record, assume the layout of the current sharding
            saved_shards = target if saved_shards is None else int(saved_shards)
        now_rows = is_dtensor(p) and _sharding(p) is not None
        same = saved_rows == now_rows and (not now_rows or saved_shards == target)
        if same:
            if is_dtensor(p):  # a full (plain) tensor for a DTensor parameter: distribute it the way we shard it
                if not is_dtensor(values) and tuple(values.shape) == (*prefix, *p.shape):
                    state[key] = _wrap(_local_part(values.to(p.device), p, len(prefix)), p, _shift(p.placements, len(prefix)), values.shape)
                if not is_dtensor(absmax) and tuple(absmax.shape) == (*prefix, *absmax_shape(p)):
                    state[amkey] = _absmax_local_dtensor(absmax.to(p.device), p, prefix)
            continue
        full_codes, full_absmax = _full(values), _full(absmax)
        if full_codes.shape != (*prefix, *p.shape):
            continue  # let the checks report it
        qmap = state[f"qmap{i}"].to(full_codes.device)
        d = _sharding(p)[1] if now_rows else 0
        dense = _dequantize(full_codes, full_absmax, qmap, prefix, saved_shards if saved_rows else 0, d, p.shape)
        state[key], state[amkey] = _quantize(dense, p, qmap, prefix)
    return state


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def _chunk_bounds(size: int, n: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk ``index`` of ``size`` rows in ``n`` shards (DTensor's chunk rule)."""
    c = math.ceil(size / n) if n else size
    start = min(index * c, size)
    return start, min(start + c, size)


def _local_part(full: torch.Tensor, p: torch.Tensor, nprefix: int) -> torch.Tensor:
    """This rank's part of a full tensor shaped like ``p`` (with ``nprefix`` leading dims)."""
    sharding = _sharding(p)
    if sharding is None:
        return full.clone()
    mesh_dim, d = sharding
    start, stop = _chunk_bounds(p.shape[d], p.device_mesh.size(mesh_dim), p.device_mesh.get_local_rank(mesh_dim))
    return full.narrow(nprefix + d, start, stop - start).contiguous()


def _absmax_local_dtensor(full: torch.Tensor, p: torch.Tensor, prefix: tuple) -> torch.Tensor:
    out = absmax_buffer(p, (*prefix, *absmax_shape(p)))
    if _sharding(p) is None:
        local(out).copy_(full)
    else:
        local(out).copy_(_local_part(full, p, len(prefix)))
    return out


def _dequantize(codes, absmax, qmap, prefix, saved_shards: int, d: int, shape) -> torch.Tensor:
    """float32 values of full codes laid out in blocks over ``saved_shards`` shards along dim ``d``
    (0: blocks over the whole tensor)."""
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for idx in _prefix_indices(prefix):
        c, a, o = codes[idx], absmax[idx], out[idx]
        if saved_shards == 0:
            o.view(-1).copy_(dequantize_flat(c.reshape(-1), a.reshape(-1), qmap, BLOCK))
            continue
        for s in range(saved_shards):
            start, stop = _chunk_bounds(shape[d], saved_shards, s)
            if stop <= start:
                continue
            part = c.narrow(d, start, stop - start).contiguous().reshape(-1)
            blocks = a[start:stop].reshape(-1)[: math.ceil(part.numel() / BLOCK)]
            o.narrow(d, start, stop - start).copy_(dequantize_flat(part, blocks, qmap, BLOCK).view(c.narrow(d, start, stop - start).shape))
    return out


def _quantize(dense: torch.Tensor, p: torch.Tensor, qmap: torch.Tensor, prefix: tuple):
    """(codes, absmax) of full float32 values, laid out for ``p`` as it is sharded now."""
    sharded = is_dtensor(p)
    part = _local_part(dense, p, len(prefix)) if sharded else dense
    if sharded and _sharding(p) is not None:
        absmax = absmax_buffer(p, (*prefix, *absmax_shape(p)))
        absmax_local = local(absmax)
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
        codes = _wrap(codes, p, _shift(p.placements, len(prefix)), dense.shape)
        if _sharding(p) is None:
            absmax = _wrap(absmax, p, tuple(Replicate() for _ in p.placements), absmax.shape)
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


# ---- FSDP1 ----------------------------------------------------------------------------------


def fsdp1_caller() -> bool:
    """True when FSDP1's optimizer state dict code (``FSDP.optim_state_dict``, ``full_optim_state_dict``,
    or DCP's ``get_state_dict`` on an FSDP1 model) is asking for the optimizer's state dict."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        name = frame.f_globals.get("__name__", "")
        if name in ("torch.distributed.fsdp.fully_sharded_data_parallel", "torch.distributed.fsdp._optim_utils"):
            return True
        if name == "torch.distributed.checkpoint.state_dict":
            info = frame.f_locals.get("info")
            return bool(getattr(info, "fsdp_modules", None))
        frame = frame.f_back
    return False


def export_state(state: dict[str, Any], n_states: int, fsdp1: bool) -> dict[str, Any]:
    """One parameter's state as the state dict holds it: with the shard count of a sharded block
    layout recorded (so that another world size can requantize), or dequantized for FSDP1."""
    if fsdp1:
        return dequantized_state(state, n_states)
    absmax = state.get("absmax1")
    if is_dtensor(absmax) and absmax.dim() >= 2:
        sharded = [i for i, pl in enumerate(absmax.placements) if isinstance(pl, Shard)]
        if sharded:
            state = dict(state)
            state[SHARDS_KEY] = absmax.device_mesh.size(sharded[0])
    return state


def dequantized_state(state: dict[str, Any], n_states: int) -> dict[str, Any]:
    """One parameter's state with its 8-bit states as float32 values shaped like the states (the
    layout FSDP1 can gather and reshard). qmap and absmax go: loading requantizes with the family's maps."""
    out = dict(state)
    changed = False
    for i in range(1, n_states + 1):
        values = state.get(f"state{i}")
        if not isinstance(values, torch.Tensor) or values.dtype != torch.uint8 or f"absmax{i}" not in state or is_dtensor(values):
            continue
        absmax, qmap = state[f"absmax{i}"], state[f"qmap{i}"]
        flat = values.reshape(-1)
        if values.dim() > 1 and values.shape[0] == absmax.shape[0] and absmax.dim() == 2:  # stacked (AdEMAMix)
            dense = torch.stack([dequantize_flat(values[r].reshape(-1), absmax[r], qmap, BLOCK) for r in range(values.shape[0])])
        else:
            dense = dequantize_flat(flat, absmax.reshape(-1), qmap, BLOCK)
        out[f"state{i}"] = dense.view(values.shape)
        del out[f"absmax{i}"], out[f"qmap{i}"]
        changed = True
    if changed:
        out[DEQUANTIZED_KEY] = 1
    return out
