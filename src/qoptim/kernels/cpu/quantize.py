"""Dequantizing and quantizing a block of an 8-bit state, on each of the three paths.

The quantizer is exact by construction (the index of the nearest code, as ``torch.bucketize``
on the midpoints gives it): a first guess from a table and fix-up comparisons (``tables``),
or on the AVX-512 path the register lookups of ``avx512``. A state with a draw (its key not
``NO_DRAW``) is rounded stochastically, as ``quant.blockwise.quantize_stochastic``: the same
quantizer on the map's floor tables gives each element's floor code k (``tables``), and
``round_up_by_draw`` takes the code above where the element's 16 random bits
(``codec.state_random_bits``) lie below ``(u - code[k]) * steps[k]``. The key is read at run
time, block by block, so a state rounded to nearest runs the quantizer it ran before. These
functions are inlined into the kernels: as calls, their argument copies and table spills cost
about as much as a block's work.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import overload

from ...quant.blockwise import SMALLEST_POSITIVE_CODE
from ..types import BLOCK
from . import avx512
from .bits import ONE, ZERO, bits_of, float_of, magnitude, stack_array
from .codec import state_random_bits
from .draws import DRAW_LANES, draw_lanes
from .gather import LANES, fixup_lanes, lookup_lanes, quantize_lanes, quantize_packed_lanes
from .jit import INLINE
from .nibbles import NO_DRAW
from .paths import PermutePath, VectorPath, is_path
from .tables import NAN_INDEX, QuantTables, StochasticTables

__all__ = [
    "Quantized", "block_peak", "dequantize", "lookup", "lookup_table", "quantize", "raise_positive_from_zero", "reciprocal", "requantize",
    "round_up_by_draw", "state_view",
]  # fmt: skip

# quant.blockwise.SMALLEST_POSITIVE_CODE as the codes' type
_SMALLEST_POSITIVE = np.uint8(SMALLEST_POSITIVE_CODE)
_ZERO_CODE = np.uint8(0)


class Quantized(NamedTuple):
    """An 8-bit state inside the kernels."""

    codes: np.ndarray  # uint8, one per element
    scales: np.ndarray  # float32, one per 256-block or one in all
    tables: QuantTables  # of its map
    stochastic: StochasticTables  # of its map (a stand-in where it has none: then it never has a draw)
    key: int  # its draws' key (``NO_DRAW``: rounded to nearest)
    first: int  # the index in the whole parameter of its first element (its draws')


def state_view(state):
    """A state as the kernels read it: an fp32 state (an array) as it is; an 8-bit one, given
    as the plain tuple (codes, scales, tables, (floor tables, steps, step planes), key, first)
    (``layout.kernel_state``; Numba types plain tuples in C, NamedTuples in Python: ~0.2 us a
    field more per task call), as a ``Quantized``."""


# inlined by LLVM (forceinline), not by Numba's IR inliner (inline="always"): with the latter,
# writes into a field of the NamedTuple made here are lost when they happen in a loop (Numba 0.68)
@overload(state_view, jit_options=INLINE)
def _state_view_impl(state):
    if isinstance(state, types.Array):
        return lambda state: state

    def quantized(state):
        codes, scales, tables, (floors, steps, step_planes), key, first = state
        return Quantized(codes, scales, QuantTables(*tables), StochasticTables(QuantTables(*floors), steps, step_planes), key, first)

    return quantized


@njit(**INLINE)
def lookup(q, t, out, path):
    """out[j] = code[q[j]], ``t`` a map's tables (their register tables start with the code's byte planes)."""
    lookup_table(q, t.code, t.registers, out, path)


@njit(**INLINE)
def lookup_table(q, table, planes, out, path):
    """out[j] = table[q[j]]: ``lookup`` of any table of 256 floats, ``planes`` its byte planes
    (``tables.byte_planes``: the AVX-512 path reads those)."""
    for j in range(_table_lanes_prefix(q, table, planes, out, path), q.size):
        out[j] = table[q[j]]


@njit(**INLINE)
def quantize(values, inv, finite, t, out, path):
    """out[j] = index of the code nearest to values[j] * inv (see ``tables``), ``t`` a map's
    tables; ``finite``: the caller knows every values[j] * inv is finite. The first fix-up is
    fused into the main loop (all the standard maps need just it); maps with more midpoints
    per table bucket (stochastic rounding's floor tables of the unsigned map, say) get the rest
    in more passes (gathers on the AVX2 path; the permute path is exact for any map)."""
    first, mids = t.first, t.mids
    done = _quantize_lanes_prefix(values, inv, finite, t, out, path)
    for j in range(done, values.size):
        u = values[j] * inv
        idx = np.int32(first[bits_of(u) >> 16])
        idx += np.int32(mids[idx] < u)
        out[j] = NAN_INDEX if u != u else idx
    start = _fixups_from(done, path)
    for _ in range(1, t.fixups):
        for j in range(_fixup_lanes_prefix(values, inv, mids, out, start, path), values.size):
            u = values[j] * inv
            idx = np.int32(out[j])
            out[j] = idx + np.int32(mids[idx] < u)


def _quantize_lanes_prefix(values, inv, finite, t, out, path):
    """Do ``quantize``'s main loop many lanes at a time on a vector path; return how many
    elements were done (none on the portable path)."""


def _table_lanes_prefix(q, table, planes, out, path):
    """Do ``lookup_table``'s (and so ``lookup``'s) work many lanes at a time on a vector path; return how many elements
    were done (none on the portable path)."""


def _draw_lanes_prefix(values, inv, low, step, key, first, codes, path):
    """Do ``round_up_by_draw``'s draw 16 lanes at a time on the permute path (``draws``); return
    how many elements were done (none on the others: LLVM vectorizes their loop)."""


def _fixup_lanes_prefix(values, inv, mids, out, start, path):
    """Do a fix-up pass of ``quantize`` many lanes at a time on the AVX2 path (from ``start``,
    0 there); return where its scalar loop goes on (``start`` on the other paths)."""


def _fixups_from(done, path):
    """Where the fix-up passes of ``quantize`` start: after the elements the permute path's
    exact search did, at 0 on the others."""


@overload(_quantize_lanes_prefix, jit_options=dict(forceinline=True))
def _quantize_lanes_prefix_impl(values, inv, finite, t, out, path):
    if is_path(path, PermutePath):

        def permute(values, inv, finite, t, out, path):
            if t.guessed:
                return avx512.quantize_guessed(values, inv, t.registers, finite, out)
            return avx512.quantize_search(values, inv, t.registers, finite, out)

        return permute
    if not is_path(path, VectorPath):
        return lambda values, inv, finite, t, out, path: 0

    def vector(values, inv, finite, t, out, path):
        first, mids, packed = t.first, t.mids, t.packed
        done = values.size // LANES * LANES
        if packed.size:
            for j in range(0, done, LANES):
                quantize_packed_lanes(values, j, inv, packed, out)
        else:
            for j in range(0, done, LANES):
                quantize_lanes(values, j, inv, first, mids, out)
        return done

    return vector


@overload(_table_lanes_prefix, jit_options=dict(forceinline=True))
def _table_lanes_prefix_impl(q, table, planes, out, path):
    if is_path(path, PermutePath):
        return lambda q, table, planes, out, path: avx512.lookup_planes(q, planes, out)
    if not is_path(path, VectorPath):
        return lambda q, table, planes, out, path: 0

    def vector(q, table, planes, out, path):
        done = q.size // LANES * LANES
        for j in range(0, done, LANES):
            lookup_lanes(q, j, table, out)
        return done

    return vector


@overload(_draw_lanes_prefix, jit_options=dict(forceinline=True))
def _draw_lanes_prefix_impl(values, inv, low, step, key, first, codes, path):
    if not is_path(path, PermutePath):
        return lambda values, inv, low, step, key, first, codes, path: 0

    def permute(values, inv, low, step, key, first, codes, path):
        done = values.size // DRAW_LANES * DRAW_LANES
        for j in range(0, done, DRAW_LANES):
            draw_lanes(values, j, inv, low, step, key, first, codes)
        return done

    return permute


@overload(_fixup_lanes_prefix, jit_options=dict(forceinline=True))
def _fixup_lanes_prefix_impl(values, inv, mids, out, start, path):
    if not is_path(path, VectorPath):
        return lambda values, inv, mids, out, start, path: start

    def vector(values, inv, mids, out, start, path):
        done = values.size // LANES * LANES
        for j in range(0, done, LANES):
            fixup_lanes(values, j, inv, mids, out)
        return done

    return vector


@overload(_fixups_from)
def _fixups_from_impl(done, path):
    if is_path(path, PermutePath):
        return lambda done, path: done
    return lambda done, path: 0


@njit(**INLINE)
def reciprocal(scale):
    return ONE / scale if scale > ZERO else ZERO


@njit(**INLINE)
def block_peak(values):
    """max |values[j]|, NaN above inf (as the bit patterns of the magnitudes order them)."""
    peak = np.uint32(0)
    for j in range(values.size):
        peak = max(peak, magnitude(values[j]))
    return float_of(peak)


@njit(**INLINE)
def dequantize(state, lo, hi, s, buf, path):
    """buf = the codes of elements [lo, hi) of a ``Quantized`` looked up in its map; returns their scale."""
    lookup(state.codes[lo:hi], state.tables, buf, path)
    return state.scales[s]


@njit(**INLINE)
def requantize(state, values, peak, inv, lo, hi, signed, path):
    """A block's new codes from its new values, their peak and the scale's reciprocal, to
    nearest or (a state with a draw) stochastically, element ``lo + j`` drawing its own bits;
    ``signed`` (a compile-time constant): whether the state may be negative, else a positive
    value never takes code 0 (``raise_positive_from_zero``), as in ``reference._store``."""
    codes = state.codes[lo:hi]
    drawing = state.key != NO_DRAW
    # one quantizer, its tables chosen at run time: the nearest code, or (the floor tables) the floor
    quantize(values, inv, peak * inv < np.inf, state.stochastic.floors if drawing else state.tables, codes, path)
    if drawing:
        round_up_by_draw(values, inv, state.stochastic, state.key, state.first + lo, codes, path)
    if not signed:
        raise_positive_from_zero(values, codes)


@njit(**INLINE)
def round_up_by_draw(values, inv, s, key, first, codes, path):
    """codes[j], the floor code k of u = values[j] * inv (``quantize`` on ``s.floors``; a block,
    at most ``BLOCK`` elements), becomes k + 1 where the 16 random bits of index ``first + j``
    lie below (u - code[k]) * steps[k] (``quant.blockwise.quantize_stochastic``; never past the
    last code: its step is 0). code[k] and steps[k] are looked up for the whole block as
    dequantizing looks codes up, so that the draw's loop reads tables from the stack only, and
    LLVM vectorizes it (the hash in 32-bit lanes; on the AVX-512 path, 16 lanes: ``draws``)."""
    size = values.size
    low, step = stack_array(np.float32, BLOCK)[:size], stack_array(np.float32, BLOCK)[:size]
    lookup(codes, s.floors, low, path)  # code[k]: the floor tables' map is the map
    lookup_table(codes, s.steps, s.step_planes, step, path)
    for j in range(_draw_lanes_prefix(values, inv, low, step, key, first, codes, path), size):
        r = np.float32(state_random_bits(key, first, j))
        codes[j] = codes[j] + np.uint8(r < (values[j] * inv - low[j]) * step[j])


@njit(**INLINE)
def raise_positive_from_zero(values, codes):
    """quant.blockwise.raise_positive_from_zero in place: a positive value's code 0 becomes
    the smallest positive code (one vectorized pass over the block, on every path)."""
    for j in range(values.size):
        codes[j] = max(codes[j], _SMALLEST_POSITIVE if values[j] > ZERO else _ZERO_CODE)
