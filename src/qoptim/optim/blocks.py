"""Where the blocks of a quantized state lie in each layout a checkpoint can hold, and how codes
move from one such layout to another. Plain tensors only: ``reshard`` places the results (DTensors).

A block has its state format's size (``quant.formats``: 256 elements for 8-bit states, 128 for
4-bit ones; ``blocksize`` below). A layout is a shard count ``S`` along one dim ``d`` of the
parameter (torch's chunk rule, as FSDP2 shards): each shard's elements, in their C order, form
blocks of their own. ``S = 1`` is bitsandbytes' layout (blocks over the whole flat tensor);
``ONE_SCALE`` is ``block_wise=False`` (one scale for the whole tensor).

The *rows* form of a layout's block scales has the global shape ``rows_shape(shape, d) =
(size_d, k)`` with ``k = ceil(numel / size_d / blocksize)``: a shard of ``r`` rows keeps its (at
most ``r * k``) blocks in the first entries of its ``r`` rows, so slot ``start * k + j`` holds its
block ``j``. The shape does not depend on ``S``, and every shard's scales live in its own rows, so
DCP reshards the array like any tensor. ``S = 1`` keeps its blocks in the first entries of the
array, in bitsandbytes' flat order (``rows_of_flat`` / ``flat_of_rows``); a one-scale state is
written as ``S = 1`` with every block's scale the one scale.

A 4-bit state's codes are 4 bits of the bytes both moments share (``state``'s module doc):
``nibble`` takes them out and ``with_nibble`` puts them back, so that they move as 8-bit codes do.
"""

from __future__ import annotations

import math

import torch

from ..quant.blockwise import block_absmax, quantize_with_absmax, raise_positive_from_zero
from ..quant.formats import StateFormat

__all__ = ["ONE_SCALE", "block_ids", "block_scales", "chunk_bounds", "flat_of_rows", "moved", "nibble", "requantized", "rows_of_flat",
           "rows_shape", "with_nibble"]  # fmt: skip

ONE_SCALE = 0  # the shard count recorded for a one-scale (block_wise=False) state


def rows_shape(shape, d: int = 0, *, blocksize: int) -> torch.Size:
    """Global shape ``(size_d, k)`` of the rows form of block scales for a tensor of ``shape``."""
    shape = tuple(shape) or (1,)
    numel = math.prod(shape)
    size_d = shape[d]
    return torch.Size([size_d, math.ceil(numel // max(size_d, 1) / blocksize)])


def chunk_bounds(size: int, n: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk ``index`` of ``size`` rows in ``n`` shards (DTensor's chunk rule)."""
    c = math.ceil(size / n) if n else size
    start = min(index * c, size)
    return start, min(start + c, size)


def rows_of_flat(flat: torch.Tensor, shape, *, blocksize: int) -> torch.Tensor:
    """Flat block scales ``(*prefix, n_blocks)`` (one shard) in the rows form ``(*prefix, size_0, k)``."""
    rows = rows_shape(shape, blocksize=blocksize)
    out = torch.zeros((*flat.shape[:-1], rows.numel()), dtype=flat.dtype, device=flat.device)
    out[..., : flat.shape[-1]] = flat
    return out.view(*flat.shape[:-1], *rows)


def flat_of_rows(rows: torch.Tensor, shape, *, blocksize: int) -> torch.Tensor:
    """The flat block scales ``(*prefix, n_blocks)`` of one shard's rows form (a copy)."""
    n_blocks = math.ceil(math.prod(tuple(shape)) / blocksize)
    return rows.reshape(*rows.shape[:-2], -1)[..., :n_blocks].clone()


def block_ids(shape, d: int, shards: int, rows: tuple[int, int], *, blocksize: int, device=None) -> torch.Tensor:
    """For each element of rows ``[start, stop)`` along dim ``d`` of a tensor of ``shape`` (a
    tensor of that part's shape): the slot of its block's scale in the rows form of the layout
    with ``shards`` shards along ``d`` (``ONE_SCALE``: 0 everywhere)."""
    shape = tuple(shape) or (1,)
    start, stop = rows
    part = (*shape[:d], stop - start, *shape[d + 1 :])
    if shards == ONE_SCALE:
        return torch.zeros(part, dtype=torch.long, device=device)
    outer, inner, size = math.prod(shape[:d]), math.prod(shape[d + 1 :]), shape[d]
    k = rows_shape(shape, d, blocksize=blocksize)[1]
    pieces = []
    for s in range(shards):
        a, b = chunk_bounds(size, shards, s)
        lo, hi = max(a, start), min(b, stop)
        if hi <= lo:
            continue
        o = torch.arange(outer, device=device).view(-1, 1, 1)
        r = torch.arange(lo - a, hi - a, device=device).view(1, -1, 1)
        i = torch.arange(inner, device=device).view(1, 1, -1)
        pieces.append(((o * (b - a) + r) * inner + i) // blocksize + a * k)  # the element's index in its shard, in blocks
    if not pieces:
        return torch.zeros(part, dtype=torch.long, device=device)
    return torch.cat(pieces, dim=1).view(part)


def nibble(codes: torch.Tensor, shift: int) -> torch.Tensor:
    """The 4-bit codes that bytes ``codes`` hold from bit ``shift`` up (0: the low half, 4: the high)."""
    return (codes >> shift) & 0xF


def with_nibble(codes: torch.Tensor, nibbles: torch.Tensor, shift: int) -> torch.Tensor:
    """Bytes ``codes`` with the 4 bits from ``shift`` up replaced by ``nibbles``, the others as they were."""
    return (codes & (0xF0 >> shift)) | (nibbles << shift)


def block_scales(x: torch.Tensor, qmap: torch.Tensor, fmt: StateFormat) -> torch.Tensor:
    """Each block's scale for values that came from dequantizing codes. The kernels set a block's
    scale to its largest magnitude, which gets an end code of the map (1.0, or the signed map's
    most negative code, -0.99297 8-bit, -0.8875 4-bit, for a negative one); every other element's
    code is at most the end code of its sign. So the largest ``|x| / end(sign x)`` gives the
    original scale back (to an ulp)."""
    low, high = float(qmap.min()), float(qmap.max())
    end = torch.where(x < 0, torch.full_like(x, abs(low) if low < 0 else high), torch.full_like(x, high))
    return block_absmax(x.abs() / end, fmt.blocksize)


def requantized(dense: torch.Tensor, qmap: torch.Tensor, fmt: StateFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, block scales) of flat float32 values in ``fmt``'s blocks, rounded to the nearest
    code of ``qmap`` as the kernels round. A never-negative 8-bit state (its map has no negative
    code) keeps its positive values off code 0, as the optimizers' own requantizing does
    (quant.blockwise.raise_positive_from_zero); a 4-bit one's map has no zero code to avoid."""
    scales = block_scales(dense, qmap, fmt)
    codes = quantize_with_absmax(dense, scales, qmap, fmt.blocksize)
    if bool(qmap.min() >= 0) and not fmt.zero_free_unsigned:
        codes = raise_positive_from_zero(codes, dense)
    return codes, scales


def moved(codes: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, qmap: torch.Tensor,
          fmt: StateFormat) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(codes, block scales) in ``fmt``'s blocks of flat ``codes`` (one code per element, 4-bit
    ones out of their bytes) that were quantized in other blocks: element ``e`` with the scale
    ``table[ids[e]]``.

    A new block whose elements all lay in one old block keeps their codes and takes that block's
    scale: its values stay exactly as they were (the same codes and scale where the blocks are the
    same). Any other block is requantized from the values, which moves each by at most the
    rounding of its format."""
    n, size = codes.numel(), fmt.blocksize
    dense = qmap[codes.long()] * table[ids]
    first = ids[::size]
    strays = (ids != first.repeat_interleave(size)[:n]).to(torch.float32)
    within = block_absmax(strays, size) == 0
    new_codes, new_scales = requantized(dense, qmap, fmt)
    scales = torch.where(within, table[first], new_scales)
    return torch.where(within.repeat_interleave(size)[:n], codes, new_codes), scales
