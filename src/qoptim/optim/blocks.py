"""Where the 8-bit blocks of a state lie in each layout a checkpoint can hold, and how codes move
from one such layout to another. Plain tensors only: ``reshard`` places the results (DTensors).

A layout is a shard count ``S`` along one dim ``d`` of the parameter (torch's chunk rule, as
FSDP2 shards): each shard's elements, in their C order, form 256-element blocks of their own.
``S = 1`` is bitsandbytes' layout (blocks over the whole flat tensor); ``ONE_SCALE`` is
``block_wise=False`` (one scale for the whole tensor).

The *rows* form of a layout's block scales has the global shape ``rows_shape(shape, d) =
(size_d, k)`` with ``k = ceil(numel / size_d / 256)``: a shard of ``r`` rows keeps its (at most
``r * k``) blocks in the first entries of its ``r`` rows, so slot ``start * k + j`` holds its block
``j``. The shape does not depend on ``S``, and every shard's scales live in its own rows, so DCP
reshards the array like any tensor. ``S = 1`` keeps its blocks in the first entries of the array,
in bitsandbytes' flat order (``rows_of_flat`` / ``flat_of_rows``); a one-scale state is written as
``S = 1`` with every block's scale the one scale.
"""

from __future__ import annotations

import math

import torch

from ..kernels import BLOCK
from ..quant.blockwise import block_absmax, quantize_with_absmax, raise_positive_from_zero

__all__ = ["ONE_SCALE", "block_ids", "chunk_bounds", "flat_of_rows", "moved", "requantized", "rows_of_flat", "rows_shape"]

ONE_SCALE = 0  # the shard count recorded for a one-scale (block_wise=False) state


def rows_shape(shape, d: int = 0) -> torch.Size:
    """Global shape ``(size_d, k)`` of the rows form of block scales for a tensor of ``shape``."""
    shape = tuple(shape) or (1,)
    numel = math.prod(shape)
    size_d = shape[d]
    return torch.Size([size_d, math.ceil(numel // max(size_d, 1) / BLOCK)])


def chunk_bounds(size: int, n: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk ``index`` of ``size`` rows in ``n`` shards (DTensor's chunk rule)."""
    c = math.ceil(size / n) if n else size
    start = min(index * c, size)
    return start, min(start + c, size)


def rows_of_flat(flat: torch.Tensor, shape) -> torch.Tensor:
    """Flat block scales ``(*prefix, n_blocks)`` (one shard) in the rows form ``(*prefix, size_0, k)``."""
    rows = rows_shape(shape)
    out = torch.zeros((*flat.shape[:-1], rows.numel()), dtype=flat.dtype, device=flat.device)
    out[..., : flat.shape[-1]] = flat
    return out.view(*flat.shape[:-1], *rows)


def flat_of_rows(rows: torch.Tensor, shape) -> torch.Tensor:
    """The flat block scales ``(*prefix, n_blocks)`` of one shard's rows form (a copy)."""
    n_blocks = math.ceil(math.prod(tuple(shape)) / BLOCK)
    return rows.reshape(*rows.shape[:-2], -1)[..., :n_blocks].clone()


def block_ids(shape, d: int, shards: int, rows: tuple[int, int], device=None) -> torch.Tensor:
    """For each element of rows ``[start, stop)`` along dim ``d`` of a tensor of ``shape`` (a
    tensor of that part's shape): the slot of its block's scale in the rows form of the layout
    with ``shards`` shards along ``d`` (``ONE_SCALE``: 0 everywhere)."""
    shape = tuple(shape) or (1,)
    start, stop = rows
    part = (*shape[:d], stop - start, *shape[d + 1 :])
    if shards == ONE_SCALE:
        return torch.zeros(part, dtype=torch.long, device=device)
    outer, inner, size = math.prod(shape[:d]), math.prod(shape[d + 1 :]), shape[d]
    k = rows_shape(shape, d)[1]
    pieces = []
    for s in range(shards):
        a, b = chunk_bounds(size, shards, s)
        lo, hi = max(a, start), min(b, stop)
        if hi <= lo:
            continue
        o = torch.arange(outer, device=device).view(-1, 1, 1)
        r = torch.arange(lo - a, hi - a, device=device).view(1, -1, 1)
        i = torch.arange(inner, device=device).view(1, 1, -1)
        pieces.append(((o * (b - a) + r) * inner + i) // BLOCK + a * k)  # the element's index in its shard, in blocks
    if not pieces:
        return torch.zeros(part, dtype=torch.long, device=device)
    return torch.cat(pieces, dim=1).view(part)


def block_scales(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Each block's scale for values that came from dequantizing codes. The kernels set a block's
    scale to its largest magnitude, which gets an end code of the map (1.0, or the signed map's
    -0.99297 for a negative one); every other element's code is at most the end code of its sign.
    So the largest ``|x| / end(sign x)`` gives the original scale back (to an ulp)."""
    low, high = float(qmap.min()), float(qmap.max())
    end = torch.where(x < 0, torch.full_like(x, abs(low) if low < 0 else high), torch.full_like(x, high))
    return block_absmax(x.abs() / end, BLOCK)


def requantized(dense: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, block scales) of flat float32 values, in 256-blocks. A never-negative state (its
    map has no negative code) keeps its positive values off code 0, as the optimizers' own
    requantizing does (quant.blockwise.raise_positive_from_zero)."""
    scales = block_scales(dense, qmap)
    codes = quantize_with_absmax(dense, scales, qmap, BLOCK)
    if bool(qmap.min() >= 0):
        codes = raise_positive_from_zero(codes, dense)
    return codes, scales


def moved(codes: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, block scales) in 256-blocks of flat ``codes`` that were quantized in other blocks:
    element ``e`` with the scale ``table[ids[e]]``.

    A new block whose elements all lay in one old block keeps their codes and takes that block's
    scale: its values stay exactly as they were (the same codes and scale where the blocks are the
    same). Any other block is requantized from the values, which moves each by at most the 8-bit
    rounding."""
    n = codes.numel()
    dense = qmap[codes.long()] * table[ids]
    first = ids[::BLOCK]
    strays = (ids != first.repeat_interleave(BLOCK)[:n]).to(torch.float32)
    within = block_absmax(strays, BLOCK) == 0
    new_codes, new_scales = requantized(dense, qmap)
    scales = torch.where(within, table[first], new_scales)
    return torch.where(within.repeat_interleave(BLOCK)[:n], codes, new_codes), scales
