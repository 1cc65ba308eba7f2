"""Optimizer state for sharded parameters (FSDP2 / DTensor): the state buffers and local views.

The kernels see flat contiguous local tensors; this module (with ``reshard``, which moves a loaded
state between layouts) is the only place that knows about ``DTensor``. For a parameter that is a
DTensor:

* the update runs on its local shard (``local(p)``, ``local(p.grad)``), in place;
* ``state1``/``state2`` are DTensors with the parameter's mesh and placements, holding codes
  (or float32 values) shaped like the local shard (4-bit states: ``state1`` alone, each byte both
  moments' codes). Elementwise data, so DCP reshards it exactly;
* quantization blocks (of the state format's size, ``blocksize``: 256 for 8-bit states, 128 for
  4-bit ones) are laid out per local shard (a block never straddles a shard boundary: the kernel
  updates one rank's shard with no view of the neighbour's elements). ``absmax`` is a DTensor of
  global shape ``(size_d, k)``, sharded along its dim 0 exactly like the parameter along its
  sharded dim ``d``, with ``k = ceil(numel / size_d / blocksize)``. A shard with ``r`` rows of
  the parameter has at most ``r * k`` blocks; it keeps them in the first entries of its ``(r, k)``
  rows, the rest stays zero (the rows form of ``blocks``). That global shape does not depend on the
  world size, so DCP can load a checkpoint onto another world size, or from a plain run, without a
  size mismatch (``reshard`` moves the blocks then).

Replicated placements (e.g. HSDP's replicate dim) keep the whole-tensor layout. Limits: one
sharded mesh dimension per parameter, and no features that need a norm over the whole
parameter (``percentile_clipping``, LAMB/LARS, ``block_wise=False``) on sharded parameters.
See README's FSDP2 section.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .blocks import chunk_bounds, rows_shape

try:  # torch.distributed may be compiled out
    from torch.distributed.tensor import DTensor, Replicate, Shard
except Exception:  # pragma: no cover
    DTensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> Any:
    """The local shard of a DTensor (aliasing its storage), anything else as is."""
    return t.to_local() if is_dtensor(t) else t


def sharding(p: torch.Tensor) -> tuple[int, int] | None:
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
    """Number of shards the quantization blocks of ``p``'s state are laid out over (1: the whole tensor)."""
    if not is_dtensor(p):
        return 1
    found = sharding(p)
    return 1 if found is None else p.device_mesh.size(found[0])


def check_param(p: torch.Tensor, config: dict[str, Any], *, layer_wise: bool) -> None:
    """Reject what a sharded parameter can't do (the update only sees the local shard)."""
    if not is_dtensor(p):
        return
    if is_dtensor(p.grad) and tuple(p.grad.placements) != tuple(p.placements):
        raise ValueError(f"qoptim: the gradient's placements {p.grad.placements} differ from the parameter's {p.placements}")
    if not is_dtensor(p.grad):
        raise ValueError("qoptim: a DTensor parameter needs a DTensor gradient")
    if sharding(p) is None:
        return
    if config.get("percentile_clipping", 100) < 100 or layer_wise or not config.get("block_wise", True):
        raise NotImplementedError(
            "qoptim: percentile_clipping, LAMB/LARS (max_unorm) and block_wise=False need the whole parameter's norm; "
            "they are not supported on sharded (DTensor) parameters"
        )


def shift(placements, by: int) -> tuple:
    """``placements`` for a tensor with ``by`` more leading dims (a stacked state)."""
    return tuple(Shard(pl.dim + by) if isinstance(pl, Shard) else pl for pl in placements)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def replicated(p: torch.Tensor) -> tuple:
    """Placements that replicate over every dimension of ``p``'s mesh."""
    return tuple(Replicate() for _ in p.placements)


def wrap(local_t: torch.Tensor, p: torch.Tensor, placements, shape) -> torch.Tensor:
    """``local_t`` as this rank's part of a DTensor of global ``shape`` on ``p``'s mesh."""
    shape = torch.Size(shape)
    return DTensor.from_local(local_t, p.device_mesh, placements, run_check=False, shape=shape, stride=_contiguous_stride(shape))


def state_buffer(p: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """A zero state buffer of global ``shape`` (``p.shape``, maybe with leading dims): a DTensor
    shaped like ``p``'s local shard, with ``p``'s mesh and placements."""
    shape = torch.Size(shape)
    prefix = shape[: len(shape) - p.dim()]
    local_t = torch.zeros((*prefix, *local(p).shape), dtype=dtype, device=p.device)
    return wrap(local_t, p, shift(p.placements, len(prefix)), shape)


def absmax_shape(p: torch.Tensor, *, blocksize: int) -> torch.Size:
    """Global shape of a DTensor parameter's absmax (without leading dims) in blocks of
    ``blocksize``, see the module doc."""
    found = sharding(p)
    if found is None:
        return torch.Size([math.ceil(p.numel() / blocksize)])
    return rows_shape(p.shape, found[1], blocksize=blocksize)


def absmax_buffer(p: torch.Tensor, shape) -> torch.Tensor:
    """A zero absmax DTensor of global ``shape`` (``absmax_shape(p)`` maybe with leading dims)."""
    shape = torch.Size(shape)
    found = sharding(p)
    if found is None:
        return wrap(torch.zeros(shape, device=p.device), p, replicated(p), shape)
    mesh_dim, d = found
    prefix = shape[:-2]
    n_rows = local(p).shape[d]
    placements = tuple(Shard(len(prefix)) if i == mesh_dim else Replicate() for i in range(p.device_mesh.ndim))
    return wrap(torch.zeros((*prefix, n_rows, shape[-1]), device=p.device), p, placements, shape)


def blocks_of(absmax: torch.Tensor, n: int, *, blocksize: int) -> torch.Tensor:
    """The flat absmax of one state's ``n`` local values: a contiguous view of the local blocks."""
    return local(absmax).reshape(-1)[: math.ceil(n / blocksize)]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), anything else as is."""
    return t.full_tensor() if is_dtensor(t) else t


def local_rows(p: torch.Tensor) -> tuple[int, int]:
    """Rows [start, stop) along its sharded dim that this rank holds of ``p`` (all of dim 0 when not sharded)."""
    found = sharding(p) if is_dtensor(p) else None
    if found is None:
        return 0, (p.shape[0] if p.dim() else 1)
    mesh_dim, d = found
    return chunk_bounds(p.shape[d], p.device_mesh.size(mesh_dim), p.device_mesh.get_local_rank(mesh_dim))


def local_part(whole: torch.Tensor, p: torch.Tensor, nprefix: int) -> torch.Tensor:
    """This rank's part of a whole tensor shaped like ``p`` (with ``nprefix`` leading dims)."""
    found = sharding(p)
    if found is None:
        return whole.clone()
    start, stop = local_rows(p)
    return whole.narrow(nprefix + found[1], start, stop - start).contiguous()


def distribute_like(whole: torch.Tensor, p: torch.Tensor, nprefix: int) -> torch.Tensor:
    """A whole state tensor shaped like ``p`` (with ``nprefix`` leading dims), distributed the way ``p`` is."""
    return wrap(local_part(whole.to(p.device), p, nprefix), p, shift(p.placements, nprefix), whole.shape)


def distribute_absmax(whole: torch.Tensor, p: torch.Tensor, prefix: tuple, *, blocksize: int) -> torch.Tensor:
    """A whole absmax of ``p``'s sharded block layout, distributed like ``absmax_buffer`` makes it."""
    out = absmax_buffer(p, (*prefix, *absmax_shape(p, blocksize=blocksize)))
    local(out).copy_(whole if sharding(p) is None else local_part(whole, p, len(prefix)))
    return out


def like(t: torch.Tensor, local_t: torch.Tensor, shape) -> torch.Tensor:
    """``local_t`` as this rank's part of a DTensor of global ``shape`` with ``t``'s mesh and placements."""
    shape = torch.Size(shape)
    stride = _contiguous_stride(shape)
    return DTensor.from_local(local_t, t.device_mesh, t.placements, run_check=False, shape=shape, stride=stride)


def mesh_shards(t: torch.Tensor) -> int | None:
    """The number of shards of a DTensor sharded over a mesh dimension (None: not sharded)."""
    if not is_dtensor(t):
        return None
    sharded = [i for i, pl in enumerate(t.placements) if isinstance(pl, Shard)]
    return t.device_mesh.size(sharded[0]) if sharded else None

