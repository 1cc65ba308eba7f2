"""A parameter's weight formats inside the kernels (``types.WeightFormat``, ``quant.master``):
master weights decoded and encoded, stochastic rounding, and the parameter views the tasks read
and write through.

The tasks take a parameter as one value, its *view*, a tuple whose first item is its memory (fp32,
or 16-bit patterns as ``layout.as_numpy`` gives them), and touch it only through ``load_weight``,
``store_weight``, ``window``, ``weight_count`` and ``prefetch_weights``; each form of view is its
own compiled specialization:

- ``(weights,)``: rounded to nearest even (a tuple too, as a function of the kernels may return
  no array but its argument, and ``window``'s is a slice);
- ``(weights, correction)``, the correction int8 (24-bit master) or int16 (32-bit): the fp32
  master is decoded on load and the pair encoded on store;
- ``(weights, key, first)``: rounded stochastically on store, element ``j`` of the view drawing
  ``random_bits(key, first + j)`` (``window`` moves ``first`` along, so a task's slice draws the
  bits of its elements' indices in the whole parameter).

The codecs are ``quant.master``'s torch code op for op: integer operations on bit patterns (bf16),
powers of two built from bits and rounding half away from zero by floor and compare (fp16), no
contraction and no fast-math (``jit.KERNEL``); branches are ternaries, which LLVM turns into
selects, so the block loops still vectorize.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...quant.master import FP16_UNIT_SHIFT
from .bits import INF_BITS, bf16_to_f32, bits_of, f16_to_f32, f32_to_bf16, f32_to_f16, float_of, load, magnitude, prefetch, store
from .jit import KERNEL

__all__ = [
    "decode_bf16", "decode_f16", "encode_bf16", "encode_f16", "load_weight", "lowbias32", "prefetch_weights",
    "random_bits", "stochastic_bf16", "stochastic_f16", "store_weight", "weight_count", "window",
]  # fmt: skip

# quant.master's shifts as the kernels' constants: the fp16 correction's unit is gap(w) / 2**shift
_SHIFT_24, _SHIFT_32 = FP16_UNIT_SHIFT[24], FP16_UNIT_SHIFT[32]
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_TWO_POW_16 = np.float32(65536.0)


# ---- the correction's width, from its dtype (a constant once inlined) --------------------------


def master_bits(c):
    """24 for an int8 correction, 32 for an int16 one."""


@overload(master_bits, jit_options=KERNEL)
def _master_bits_impl(c):
    if c == types.int8:
        return lambda c: 24
    if c == types.int16:
        return lambda c: 32
    return None


def unit_shift(c):
    """``quant.master.FP16_UNIT_SHIFT`` of a correction's width."""


@overload(unit_shift, jit_options=KERNEL)
def _unit_shift_impl(c):
    if c == types.int8:
        return lambda c: _SHIFT_24
    if c == types.int16:
        return lambda c: _SHIFT_32
    return None


# ---- bf16: the master's bit pattern -------------------------------------------------------------


@njit(forceinline=True, **KERNEL)
def decode_bf16(w, c):
    """quant.master._decode_bf16 of one element: ``w`` the bf16 pattern (int16), ``c`` its correction."""
    bits = master_bits(c)
    wi = np.int64(w) & 0xFFFF
    ci = np.int64(c)
    hi = (wi - np.int64(ci < 0)) & 0xFFFF
    u = (hi << 16) | ((ci & ((1 << (bits - 16)) - 1)) << (32 - bits))
    return bf16_to_f32(w) if (wi & 0x7FFF) > 0x7F80 else float_of(u)  # a NaN weight: itself


@njit(forceinline=True, **KERNEL)
def encode_bf16(x, c_like):
    """quant.master._encode_bf16 of fp32 ``x``: (bf16 pattern, correction) as int64, the
    correction's width that of ``c_like``'s type."""
    bits = master_bits(c_like)
    u = np.int64(bits_of(x))
    if bits == 24:  # the master itself is fp32 rounded to 24 bits: its pattern's low byte dropped
        u = ((u + 0x80) >> 8) << 8
    low = (1 << (bits - 16)) - 1
    rounded = (u + 0x8000) >> 16  # ties away from zero (see quant.master)
    c = (u >> (32 - bits)) & low
    c = c - (low + 1) if c > (low >> 1) else c
    nan = x != x
    rounded = ((u >> 16) | 0x0040) if nan else rounded
    return rounded, (0 if nan else c)


# ---- fp16: units of the gap below the weight ---------------------------------------------------


@njit(forceinline=True, **KERNEL)
def _power_of_two(exponent):
    """quant.master._power_of_two: fp32 2**exponent from bits (normal range)."""
    return float_of(np.uint32((exponent + 127) << 23))


@njit(forceinline=True, **KERNEL)
def _spacing_exponent(h):
    """quant.master.fp16_spacing_exponent of fp16 magnitude pattern ``h``."""
    return max(h >> 10, 1) - 25


@njit(forceinline=True, **KERNEL)
def _unit_exponent(w, shift):
    """quant.master._unit_exponent of fp16 pattern ``w``."""
    return _spacing_exponent(max((np.int64(w) & 0x7FFF) - 1, 0)) - shift


@njit(forceinline=True, **KERNEL)
def _finite(x):
    return magnitude(x) < INF_BITS


@njit(forceinline=True, **KERNEL)
def decode_f16(w, c):
    """quant.master._decode_f16 of one element: ``w`` the fp16 pattern (uint16), ``c`` its correction."""
    wf = f16_to_f32(w)
    exact = wf + np.float32(c) * _power_of_two(_unit_exponent(w, unit_shift(c)))
    return exact if (_finite(wf) and c != 0) else wf  # (c = 0: w itself, -0 too)


@njit(forceinline=True, **KERNEL)
def _round_half_away(y):
    """quant.master._round_half_away: floor and compare, then y's sign (by bits: the rounded
    magnitude is non-negative)."""
    magnitude_ = abs(y)
    whole = np.floor(magnitude_)
    r = whole + _ONE if magnitude_ - whole >= _HALF else whole
    return float_of(np.uint32(bits_of(r) | (bits_of(y) & np.uint32(0x80000000))))


@njit(forceinline=True, **KERNEL)
def _fp16_toward_zero(x):
    """quant.master._fp16_toward_zero: the pattern (0..0xFFFF) of the fp16 value next to ``x``
    toward zero. (The pattern minus one is a step toward zero for either sign; it never
    goes below a zero's pattern, as a zero is never above |x|.)"""
    nearest = f32_to_f16(x)
    return nearest - 1 if abs(f16_to_f32(nearest)) > abs(x) else nearest


@njit(forceinline=True, **KERNEL)
def encode_f16(x, c_like):
    """quant.master._encode_f16 of fp32 ``x``: (fp16 pattern, correction) as int64, the
    correction's width that of ``c_like``'s type."""
    shift = unit_shift(c_like)
    field = (np.int64(bits_of(x)) >> 23) & 0xFF
    grid = max(field, 127 - 14) - 127 - 10 - shift
    on_grid = _round_half_away(x * _power_of_two(-grid)) * _power_of_two(grid)  # exact: powers of two
    m = on_grid if _finite(x) else x
    toward_zero = _fp16_toward_zero(m)
    distance = abs(m) - abs(f16_to_f32(toward_zero))
    half_spacing = _power_of_two(_spacing_exponent(toward_zero & 0x7FFF) - 1)
    h = toward_zero + 1 if distance >= half_spacing else toward_zero  # ties away from zero
    w = f32_to_f16(m) if m != m else h & 0xFFFF
    wf = f16_to_f32(w)
    c = (m - wf) * _power_of_two(-_unit_exponent(w, shift))  # an integer, exactly
    return w, (np.int64(c) if _finite(wf) else np.int64(0))


# ---- stochastic rounding ------------------------------------------------------------------------


@intrinsic
def lowbias32(typingctx, x):
    """quant.master.lowbias32 of the low 32 bits of integer ``x``, as uint32 (in 32-bit
    operations, which vectorize at full width)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v = args[0]
        v = builder.trunc(v, i32) if x.bitwidth > 32 else builder.zext(v, i32) if x.bitwidth < 32 else v

        def mix(v, shift, factor):
            v = builder.xor(v, builder.lshr(v, ir.Constant(i32, shift)))
            return builder.mul(v, ir.Constant(i32, factor)) if factor else v

        v = mix(v, 16, 0x7FEB352D)
        v = mix(v, 15, 0x846CA68B)
        return mix(v, 16, 0)

    return types.uint32(x), codegen


@njit(forceinline=True, **KERNEL)
def random_bits(key, index):
    """quant.master.random_bits: 16 random bits of element ``index`` (uint32 wrap-around)."""
    return np.int64(lowbias32(index ^ key) >> np.uint32(16))


@njit(forceinline=True, **KERNEL)
def stochastic_bf16(x, r):
    """quant.master.stochastic_round of fp32 ``x`` to a bf16 pattern, ``r`` its random bits."""
    u = np.int64(bits_of(x))
    t = (u >> 16) + np.int64(r < (u & 0xFFFF))
    return t if _finite(x) else f32_to_bf16(x)


@njit(forceinline=True, **KERNEL)
def stochastic_f16(x, r):
    """quant.master.stochastic_round of fp32 ``x`` to an fp16 pattern, ``r`` its random bits."""
    toward_zero = _fp16_toward_zero(x)
    spacing = _power_of_two(_spacing_exponent(toward_zero & 0x7FFF))
    distance = (abs(x) - abs(f16_to_f32(toward_zero))) * (_TWO_POW_16 / spacing)  # exact: a power of two
    h = toward_zero + 1 if np.float32(r) < distance else toward_zero
    return h if _finite(x) else f32_to_f16(x)


# ---- the parameter views ------------------------------------------------------------------------


def _is_nearest(p):
    return isinstance(p, types.BaseTuple) and len(p) == 1


def _is_master(p):
    return isinstance(p, types.BaseTuple) and len(p) == 2


def _is_stochastic(p):
    return isinstance(p, types.BaseTuple) and len(p) == 3


def load_weight(p, j):
    """Element ``j`` of parameter view ``p`` as fp32: its master where it has one."""


@overload(load_weight, jit_options=KERNEL)
def _load_weight_impl(p, j):
    if _is_nearest(p) or _is_stochastic(p):
        return lambda p, j: load(p[0], j)
    if _is_master(p) and p[0].dtype == types.int16:
        return lambda p, j: decode_bf16(p[0][j], p[1][j])
    if _is_master(p) and p[0].dtype == types.uint16:
        return lambda p, j: decode_f16(p[0][j], p[1][j])
    return None


def store_weight(p, j, x):
    """Write fp32 ``x`` into element ``j`` of parameter view ``p`` (its weight and correction)."""


@overload(store_weight, jit_options=KERNEL)
def _store_weight_impl(p, j, x):
    if _is_nearest(p):

        def nearest(p, j, x):
            store(p[0], j, x)

        return nearest
    if not (_is_master(p) or _is_stochastic(p)) or p[0].dtype not in (types.int16, types.uint16):
        return None
    bf16 = p[0].dtype == types.int16
    if _is_stochastic(p):
        if bf16:

            def stochastic_to_bf16(p, j, x):
                p[0][j] = np.int16(stochastic_bf16(x, random_bits(p[1], p[2] + j)))

            return stochastic_to_bf16

        def stochastic_to_f16(p, j, x):
            p[0][j] = np.uint16(stochastic_f16(x, random_bits(p[1], p[2] + j)))

        return stochastic_to_f16
    if bf16:

        def master_bf16(p, j, x):
            w, c = encode_bf16(x, p[1][j])
            p[0][j] = np.int16(w)
            p[1][j] = c  # (in range of the correction's dtype)

        return master_bf16

    def master_f16(p, j, x):
        w, c = encode_f16(x, p[1][j])
        p[0][j] = np.uint16(w)
        p[1][j] = c  # (in range of the correction's dtype)

    return master_f16


def window(p, lo, hi):
    """Elements [lo, hi) of parameter view ``p``, as a view of the same form."""


@overload(window, jit_options=KERNEL)
def _window_impl(p, lo, hi):
    if _is_nearest(p):
        return lambda p, lo, hi: (p[0][lo:hi],)
    if _is_stochastic(p):
        return lambda p, lo, hi: (p[0][lo:hi], p[1], p[2] + lo)
    if _is_master(p):
        return lambda p, lo, hi: (p[0][lo:hi], p[1][lo:hi])
    return None


def weight_count(p):
    """The number of elements of parameter view ``p``."""


@overload(weight_count, jit_options=KERNEL)
def _weight_count_impl(p):
    return lambda p: p[0].size


def prefetch_weights(p, lo, hi):
    """``bits.prefetch`` of elements [lo, hi) of parameter view ``p`` (its correction too)."""


@overload(prefetch_weights, jit_options=KERNEL)
def _prefetch_weights_impl(p, lo, hi):
    if _is_master(p):

        def both(p, lo, hi):
            prefetch(p[0], lo, hi)
            prefetch(p[1], lo, hi)

        return both
    return lambda p, lo, hi: prefetch(p[0], lo, hi)
