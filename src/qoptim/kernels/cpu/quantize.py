"""Dequantizing and quantizing a block of an 8-bit state, on each of the three paths.

The quantizer is exact by construction (the index of the nearest code, as ``torch.bucketize``
on the midpoints gives it): a first guess from a table and fix-up comparisons (``tables``),
or on the AVX-512 path the register lookups of ``avx512``. These functions are inlined into
the kernels: as calls, their argument copies and table spills cost about as much as a
block's work.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import overload

from ...quant.blockwise import SMALLEST_POSITIVE_CODE
from . import avx512
from .bits import ONE, ZERO, bits_of, float_of, magnitude
from .gather import LANES, lookup_lanes, quantize_lanes, quantize_packed_lanes
from .jit import INLINE
from .paths import PermutePath, VectorPath, is_path
from .tables import NAN_INDEX, QuantTables

__all__ = ["Quantized", "block_peak", "dequantize", "lookup", "quantize", "raise_positive_from_zero", "reciprocal", "requantize", "state_view"]

# quant.blockwise.SMALLEST_POSITIVE_CODE as the codes' type
_SMALLEST_POSITIVE = np.uint8(SMALLEST_POSITIVE_CODE)
_ZERO_CODE = np.uint8(0)


class Quantized(NamedTuple):
    """An 8-bit state inside the kernels."""

    codes: np.ndarray  # uint8, one per element
    scales: np.ndarray  # float32, one per 256-block or one in all
    tables: QuantTables  # of its map


def state_view(state):
    """A state as the kernels read it: an fp32 state (an array) as it is; an 8-bit one, given
    as the plain tuple (codes, scales, tables) (Numba types plain tuples in C, NamedTuples in
    Python: ~0.2 us a field more per task call), as a ``Quantized``."""


# inlined by LLVM (forceinline), not by Numba's IR inliner (inline="always"): with the latter,
# writes into a field of the NamedTuple made here are lost when they happen in a loop (Numba 0.68)
@overload(state_view, jit_options=INLINE)
def _state_view_impl(state):
    if isinstance(state, types.Array):
        return lambda state: state

    def quantized(state):
        codes, scales, tables = state
        return Quantized(codes, scales, QuantTables(*tables))

    return quantized


@njit(**INLINE)
def lookup(q, t, out, path):
    """out[j] = code[q[j]], ``t`` a map's tables."""
    code = t.code
    for j in range(_lookup_lanes_prefix(q, t, out, path), q.size):
        out[j] = code[q[j]]


@njit(**INLINE)
def quantize(values, inv, finite, t, out, path):
    """out[j] = index of the code nearest to values[j] * inv (see ``tables``), ``t`` a map's
    tables; ``finite``: the caller knows every values[j] * inv is finite. The first fix-up is
    fused into the main loop (all the standard maps need just it); maps with more midpoints
    per table bucket get the rest in a second pass (the permute path is exact for any map)."""
    first, mids = t.first, t.mids
    done = _quantize_lanes_prefix(values, inv, finite, t, out, path)
    for j in range(done, values.size):
        u = values[j] * inv
        idx = np.int32(first[bits_of(u) >> 16])
        idx += np.int32(mids[idx] < u)
        out[j] = NAN_INDEX if u != u else idx
    start = _fixups_from(done, path)
    for _ in range(1, t.fixups):
        for j in range(start, values.size):
            u = values[j] * inv
            idx = np.int32(out[j])
            out[j] = idx + np.int32(mids[idx] < u)


def _lookup_lanes_prefix(q, t, out, path):
    """Do ``lookup``'s work many lanes at a time on a vector path; return how many elements
    were done (none on the portable path)."""


def _quantize_lanes_prefix(values, inv, finite, t, out, path):
    """Do ``quantize``'s main loop many lanes at a time on a vector path; return how many
    elements were done (none on the portable path)."""


def _fixups_from(done, path):
    """Where the fix-up passes of ``quantize`` start: after the elements the permute path's
    exact search did, at 0 on the others."""


@overload(_lookup_lanes_prefix, jit_options=dict(forceinline=True))
def _lookup_lanes_prefix_impl(q, t, out, path):
    if is_path(path, PermutePath):
        return lambda q, t, out, path: avx512.lookup_planes(q, t.registers, out)
    if not is_path(path, VectorPath):
        return lambda q, t, out, path: 0

    def vector(q, t, out, path):
        done = q.size // LANES * LANES
        for j in range(0, done, LANES):
            lookup_lanes(q, j, t.code, out)
        return done

    return vector


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
    """A block's new codes from its new values, their peak and the scale's reciprocal;
    ``signed`` (a compile-time constant): whether the state may be negative, else a positive
    value never takes code 0 (``raise_positive_from_zero``)."""
    codes = state.codes[lo:hi]
    quantize(values, inv, peak * inv < np.inf, state.tables, codes, path)
    if not signed:
        raise_positive_from_zero(values, codes)


@njit(**INLINE)
def raise_positive_from_zero(values, codes):
    """quant.blockwise.raise_positive_from_zero in place: a positive value's code 0 becomes
    the smallest positive code (one vectorized pass over the block, on every path)."""
    for j in range(values.size):
        codes[j] = max(codes[j], _SMALLEST_POSITIVE if values[j] > ZERO else _ZERO_CODE)
