"""4-bit states inside the kernels (``quant.formats.FORMATS[4]``): their maps' tables, and a block's
codes decoded from and encoded into the bytes that two states share.

A 4-bit state keeps the code of each element in 4 bits of a byte (from its ``shift`` up) that
holds the other state's code in the other 4 (``optim.state``), and one float32 scale per 128
elements. A task decodes a 256-block's bytes once for both states and encodes both codes into
each byte in one store; a rule with one state keeps the other 4 bits as they were.

Quantizing is the reference's (``reference._store``, ``torch.bucketize`` on the midpoints):
the code index of ``u = x * inv`` is the number of the map's 15 float32 midpoints strictly
below ``u``, NaN after them all (index 15): ``code_index``, the one definition of an element's
rounding. Its fifteen comparisons, added up without a branch, vectorize (the portable path); the
vector paths do the same count as a binary search of 4 register lookups (``nibble_lanes``, ~4x
fewer instructions), tested equal to it on every code. A state with a draw (its key >= 0)
rounds stochastically instead, as ``quant.blockwise.quantize_stochastic``: the code at or below
``u`` by the same branch-free count over the codes after the first (NaN after them all), then up
when the element's 16 random bits (``codec.state_random_bits``) lie below ``(u - code[k]) *
steps[k]``, both looked up in the tables the reference computed (``stochastic_steps``). Decoding looks
the 16 codes up in registers on the vector paths (``nibble_lanes``), elsewhere in a scalar loop.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numba import njit
from numba.extending import overload

from ...quant.blockwise import stochastic_steps
from ...quant.formats import FORMATS
from ...quant.maps import midpoints
from .bits import ONE, ZERO
from .codec import state_random_bits
from .jit import INLINE
from .nibble_lanes import DECODE, LINEAR_CODES, NAN_CODE, SEARCH, STOCHASTIC, STOCHASTIC_LINEAR
from .paths import HAS_AVX2, PermutePath, VectorPath, is_path
from .tables import cached_by_tensor

__all__ = [
    "CODES", "HALF_BLOCK", "NO_DRAW", "NibbleTables", "Nibbles", "code_index", "decode", "encode", "nibble_tables_of",
    "nibble_view", "quantize",
]  # fmt: skip

CODES = FORMATS[4].codes  # codes per map (16)
HALF_BLOCK = FORMATS[4].blocksize  # elements per scale (128): two to a 256-block
assert NAN_CODE == CODES - 1, "torch.bucketize's answer for NaN: after every midpoint"
_LOW, _HIGH = 0, 4  # a state's shift: its code in the low or the high 4 bits of each byte
NO_DRAW = np.int64(-1)  # a state's key when it rounds to nearest (a draw's key is a uint32)


class NibbleTables(NamedTuple):
    """A 16-code map as the kernels take it."""

    code: np.ndarray  # float32[16], the map (for decoding)
    mids: tuple  # its 15 float32 midpoints, as numpy float32 scalars: a tuple the kernels keep in registers
    table: np.ndarray  # float32[16], the midpoints then +inf: the vector paths' search (``nibble_lanes.SEARCH``)
    uppers: tuple  # the codes after the first, as numpy float32 scalars: stochastic rounding's count
    bounds: np.ndarray  # float32[16], the codes after the first then +inf: the vector paths' count (``nibble_lanes.STOCHASTIC``)
    steps: np.ndarray  # float32[16], ``blockwise.stochastic_steps``: stochastic rounding's scale per code
    linear: bool  # the map is ``nibble_lanes.LINEAR_CODES``: stochastic rounding counts without a search


def nibble_tables_for(code: torch.Tensor) -> NibbleTables | None:
    """The tables of a float32 map of 16 codes; None where its midpoints are not sorted or
    hold a NaN (then ``torch.bucketize`` has no defined answer to agree with)."""
    code = code.detach().to("cpu", torch.float32).contiguous()
    mids = midpoints(code).numpy()  # the very midpoints the reference compares with
    if code.numel() != CODES or np.isnan(mids).any() or (mids[1:] < mids[:-1]).any():
        return None
    table = np.append(mids, np.float32(np.inf)).astype(np.float32)
    uppers = code.numpy()[1:]
    bounds = np.append(uppers, np.float32(np.inf)).astype(np.float32)
    steps = stochastic_steps(code).numpy()
    linear = bool(np.array_equal(code.numpy(), LINEAR_CODES))
    return NibbleTables(code.numpy().copy(), tuple(np.float32(m) for m in mids), table, tuple(np.float32(c) for c in uppers), bounds, steps, linear)


def nibble_tables_of(code: torch.Tensor) -> NibbleTables | None:
    """``nibble_tables_for(code)``, cached by the map tensor (``tables.cached_by_tensor``)."""
    return cached_by_tensor(code, nibble_tables_for)


class Nibbles(NamedTuple):
    """A 4-bit state inside the kernels."""

    codes: np.ndarray  # uint8, one byte per element, shared with the other state
    scales: np.ndarray  # float32, one per 128 elements
    code: np.ndarray  # float32[16], its map
    mids: tuple  # the map's 15 midpoints
    table: np.ndarray  # the midpoints then +inf
    uppers: tuple  # the codes after the first
    bounds: np.ndarray  # the codes after the first then +inf
    steps: np.ndarray  # stochastic rounding's scale per code
    linear: bool  # the map is the linear one (``NibbleTables.linear``)
    shift: int  # 0 or 4: where its code sits in each byte
    key: int  # its draws' key (``NO_DRAW``: rounded to nearest)
    first: int  # the index in the whole parameter of its first element (its draws')


def nibble_view(state):
    """A 4-bit state, given as the plain tuple (codes, scales, *``NibbleTables``, shift, key,
    first) (Numba types plain tuples in C), as a ``Nibbles``."""


@overload(nibble_view, jit_options=INLINE)
def _nibble_view_impl(state):
    def view(state):
        codes, scales, code, mids, table, uppers, bounds, steps, linear, shift, key, first = state
        return Nibbles(codes, scales, code, mids, table, uppers, bounds, steps, linear, shift, key, first)

    return view


@njit(**INLINE)
def code_index(x, inv, mids):
    """The code of value ``x`` at a scale of reciprocal ``inv``: the number of midpoints strictly
    below ``u = x * inv`` (round to nearest, a tie to the lower code), NaN to the last code."""
    u = x * inv
    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14 = mids  # (spelled out: a loop here stays scalar)
    below = (_below(m0, u) + _below(m1, u) + _below(m2, u) + _below(m3, u) + _below(m4, u) + _below(m5, u) + _below(m6, u)
             + _below(m7, u) + _below(m8, u) + _below(m9, u) + _below(m10, u) + _below(m11, u) + _below(m12, u) + _below(m13, u)
             + _below(m14, u))  # fmt: skip
    return NAN_CODE if u != u else np.int32(below)


@njit(**INLINE)
def _below(m, u):
    """1.0 where midpoint ``m`` lies strictly below ``u``, else 0.0: counted in float32 (exact up
    to 15), which LLVM vectorizes ~3x better than a count of integers converted from booleans."""
    return ONE if m < u else ZERO


@njit(**INLINE)
def decode(state, lo, hi, out, path):
    """out = the map's codes of elements [lo, hi) of a ``Nibbles`` (unscaled)."""
    codes, code, shift = state.codes[lo:hi], state.code, state.shift
    for j in range(_decode_lanes_prefix(codes, shift, code, out, path), codes.size):
        out[j] = code[(codes[j] >> shift) & 0xF]


@njit(**INLINE)
def encode(states, ns, lo, hi, x0, x1, inv0, inv1, q0, q1, path):
    """The bytes of elements [lo, hi): the codes of state 0's new values ``x0`` at the scale of
    reciprocal ``inv0`` in its 4 bits, and state 1's of ``x1`` in the others (``ns`` = 2), or
    the others as they were (``ns`` = 1, the rule's only state); ``q0``, ``q1``: scratch of as
    many bytes."""
    codes = states[0].codes[lo:hi]
    s0, s1 = states[0], states[1]
    quantize(x0, inv0, s0, lo, q0, path)
    if ns > 1:
        quantize(x1, inv1, s1, lo, q1, path)
        if s0.shift == _LOW:  # (the shifts as constants in each loop: a shift by 4 of every lane)
            _pack(codes, q0, q1)
        else:
            _pack(codes, q1, q0)
    elif s0.shift == _LOW:
        _merge(codes, q0, _LOW)
    else:
        _merge(codes, q0, _HIGH)


@njit(**INLINE)
def quantize(values, inv, state, lo, q, path):
    """q[j] = ``code_index(values[j], inv, state.mids)``, many lanes at a time on the vector paths;
    with a draw, the code of values[j] rounded stochastically (element ``lo + j``'s draw)."""
    if state.key != NO_DRAW:
        _quantize_stochastic(values, inv, state, lo, q, path)
        return
    mids = state.mids
    for j in range(_quantize_lanes_prefix(values, inv, state.table, q, path), values.size):
        q[j] = np.uint8(code_index(values[j], inv, mids))


@njit(**INLINE)
def _quantize_stochastic(values, inv, state, lo, q, path):
    """q[j] = the code of ``values[j] * inv`` rounded stochastically (the module doc), element j
    drawing the bits of index ``state.first + lo + j``; many lanes at a time on the vector paths."""
    code, steps, uppers, key, first = state.code, state.steps, state.uppers, state.key, state.first + lo
    for j in range(_stochastic_lanes_prefix(values, inv, state, first, q, path), values.size):
        u = values[j] * inv
        k = floor_index(u, uppers)
        r = np.float32(state_random_bits(key, first, j))
        q[j] = np.uint8(k + 1) if r < (u - code[k]) * steps[k] else np.uint8(k)


@njit(**INLINE)
def floor_index(u, uppers):
    """The index of the last code at or below ``u`` (0 where ``u`` lies below every code after the
    first, the last for NaN): 15 less the codes after the first that lie above ``u``."""
    c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = uppers
    above = (_below(u, c1) + _below(u, c2) + _below(u, c3) + _below(u, c4) + _below(u, c5) + _below(u, c6) + _below(u, c7)
             + _below(u, c8) + _below(u, c9) + _below(u, c10) + _below(u, c11) + _below(u, c12) + _below(u, c13)
             + _below(u, c14) + _below(u, c15))  # fmt: skip
    return NAN_CODE - np.int32(above)


@njit(**INLINE)
def _pack(codes, low, high):
    for j in range(codes.size):
        codes[j] = low[j] | (high[j] << _HIGH)


@njit(**INLINE)
def _merge(codes, q, shift):
    """One state's codes into its 4 bits of ``codes``, the other 4 kept."""
    keep = np.uint8(0xF0 >> shift)
    for j in range(codes.size):
        codes[j] = (codes[j] & keep) | (q[j] << shift)


def _width(path) -> int:
    """Lanes per register lookup on ``path`` (``nibble_lanes``): 16 (AVX-512), 8 (AVX2), 0 (none:
    the scalar loops; also on the AVX2 path forced where the CPU lacks AVX2's ``vpermps``)."""
    return 16 if is_path(path, PermutePath) else 8 if is_path(path, VectorPath) and HAS_AVX2 else 0


def _quantize_lanes_prefix(values, inv, table, q, path):
    """Do ``quantize``'s work many lanes at a time on a vector path (``nibble_lanes.SEARCH``);
    return how many elements were done (none on the portable path)."""


@overload(_quantize_lanes_prefix, jit_options=dict(forceinline=True))
def _quantize_lanes_prefix_impl(values, inv, table, q, path):
    width = _width(path)
    if not width:
        return lambda values, inv, table, q, path: 0
    search = SEARCH[width]

    def lanes(values, inv, table, q, path):
        done = values.size // width * width
        for j in range(0, done, width):
            search(values, j, inv, table, q)
        return done

    return lanes


def _stochastic_lanes_prefix(values, inv, state, first, q, path):
    """Do ``_quantize_stochastic``'s work many lanes at a time on a vector path
    (``nibble_lanes.STOCHASTIC``); return how many elements were done (none on the portable path)."""


@overload(_stochastic_lanes_prefix, jit_options=dict(forceinline=True))
def _stochastic_lanes_prefix_impl(values, inv, state, first, q, path):
    width = _width(path)
    if not width:
        return lambda values, inv, state, first, q, path: 0
    stochastic, linear = STOCHASTIC[width], STOCHASTIC_LINEAR[width]

    def lanes(values, inv, state, first, q, path):
        done = values.size // width * width
        if state.linear:
            for j in range(0, done, width):
                linear(values, j, inv, state.bounds, state.code, state.steps, state.key, first, q)
        else:
            for j in range(0, done, width):
                stochastic(values, j, inv, state.bounds, state.code, state.steps, state.key, first, q)
        return done

    return lanes


def _decode_lanes_prefix(codes, shift, code, out, path):
    """Do ``decode``'s work many lanes at a time on a vector path (``nibble_lanes.DECODE``);
    return how many elements were done (none on the portable path)."""


@overload(_decode_lanes_prefix, jit_options=dict(forceinline=True))
def _decode_lanes_prefix_impl(codes, shift, code, out, path):
    width = _width(path)
    if not width:
        return lambda codes, shift, code, out, path: 0
    decode = DECODE[width]

    def lanes(codes, shift, code, out, path):
        done = codes.size // width * width
        for j in range(0, done, width):
            decode(codes, j, shift, code, out)
        return done

    return lanes
