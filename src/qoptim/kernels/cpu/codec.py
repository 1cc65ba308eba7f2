"""Master weights decoded and encoded, and stochastic rounding, one element at a time inside the
kernels (``quant.master`` defines them; ``weights`` puts them behind a parameter's loads and stores).

Op for op as ``quant.master``'s torch code: integer operations on bit patterns (bf16, in 32-bit
LLVM IR), powers of two built from bits and rounding half away from zero by floor and compare
(fp16), no contraction and no fast-math (``jit.KERNEL``); branches are ternaries, which LLVM turns
into selects, so the block loops still vectorize.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...quant.master import FP16_UNIT_SHIFT
from .bits import INF_BITS, bits_of, f16_to_f32, f32_to_f16, float_of, magnitude
from .jit import KERNEL

__all__ = [
    "decode_bf16", "decode_f16", "encode_bf16", "encode_f16", "lowbias32_ir", "random_bits", "state_random_bits", "stochastic_bf16", "stochastic_f16",
]  # fmt: skip

# quant.master's shifts as the kernels' constants: the fp16 correction's unit is gap(w) / 2**shift
_SHIFT_24, _SHIFT_32 = FP16_UNIT_SHIFT[24], FP16_UNIT_SHIFT[32]
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_TWO_POW_16 = np.float32(65536.0)


# ---- fp16: the correction's unit, from its dtype (a constant once inlined) -----------------------


def unit_shift(c):
    """``quant.master.FP16_UNIT_SHIFT`` of a correction's width."""


@overload(unit_shift, jit_options=KERNEL)
def _unit_shift_impl(c):
    if c == types.int8:
        return lambda c: _SHIFT_24
    if c == types.int16:
        return lambda c: _SHIFT_32
    return None


# ---- bf16: the master's bit pattern, in 32-bit integer operations ------------------------------
# (Numba would do integer arithmetic in 64 bits, and the block loops would vectorize at half width.)

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_WIDTHS = {types.int8: 24, types.int16: 32}  # a correction's dtype -> the master's bits


def _i32(value: int) -> ir.Constant:
    return ir.Constant(_I32, value)


def _to_i32(builder, value, ty, signed: bool):
    if ty.bitwidth > 32:
        return builder.trunc(value, _I32)
    if ty.bitwidth < 32:
        return builder.sext(value, _I32) if signed else builder.zext(value, _I32)
    return value


@intrinsic
def decode_bf16(typingctx, w, c):
    """quant.master._decode_bf16 of one element: ``w`` the bf16 pattern (int16), ``c`` its
    correction (int8: 24 bits, int16: 32)."""
    if w != types.int16 or c not in _WIDTHS:
        return None
    bits = _WIDTHS[c]

    def codegen(context, builder, signature, args):
        wi = builder.zext(args[0], _I32)
        ci = builder.sext(args[1], _I32)
        hi = builder.and_(builder.sub(wi, builder.zext(builder.icmp_signed("<", ci, _i32(0)), _I32)), _i32(0xFFFF))
        low = builder.shl(builder.and_(ci, _i32((1 << (bits - 16)) - 1)), _i32(32 - bits))
        master = builder.bitcast(builder.or_(builder.shl(hi, _i32(16)), low), ir.FloatType())
        nan = builder.icmp_unsigned(">", builder.and_(wi, _i32(0x7FFF)), _i32(0x7F80))  # a NaN weight: itself
        return builder.select(nan, builder.bitcast(builder.shl(wi, _i32(16)), ir.FloatType()), master)

    return types.float32(w, c), codegen


@intrinsic
def encode_bf16(typingctx, x, c_like):
    """quant.master._encode_bf16 of fp32 ``x``: (bf16 pattern as int16, correction of
    ``c_like``'s type, int8: 24 bits, int16: 32). A NaN's weight is its own top half, quieted."""
    if x != types.float32 or c_like not in _WIDTHS:
        return None
    bits = _WIDTHS[c_like]
    result = types.Tuple((types.int16, c_like))

    def codegen(context, builder, signature, args):
        u = original = builder.bitcast(args[0], _I32)
        if bits == 24:  # the master itself is fp32 rounded to 24 bits: its pattern's low byte dropped
            u = builder.and_(builder.add(u, _i32(0x80)), _i32(0xFFFFFF00))
        rounded = builder.lshr(builder.add(u, _i32(0x8000)), _i32(16))  # ties away from zero (see quant.master)
        c_type = _I8 if bits == 24 else _I16
        c = builder.trunc(builder.lshr(u, _i32(32 - bits)), c_type)  # the low bits, as a signed integer
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        rounded = builder.select(nan, builder.or_(builder.lshr(original, _i32(16)), _i32(0x0040)), rounded)
        c = builder.select(nan, ir.Constant(c_type, 0), c)
        return context.make_tuple(builder, result, [builder.trunc(rounded, _I16), c])

    return result(x, c_like), codegen


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


def lowbias32_ir(builder, v, const=None):
    """quant.master.lowbias32 of i32 ``v`` (or of each lane of a vector of i32, ``const`` making
    its constants: a value in every lane), in i32 operations."""
    const = const or _i32

    def mix(v, shift, factor):
        v = builder.xor(v, builder.lshr(v, const(shift)))
        return builder.mul(v, const(factor)) if factor else v

    return mix(mix(mix(v, 16, 0x7FEB352D), 15, 0x846CA68B), 16, 0)


def _hash_of_index(builder, signature, args):
    """lowbias32((first + offset) ^ key) of ``random_bits``' arguments, in i32 operations."""
    key_, first_, offset_ = (_to_i32(builder, v, t, t.signed) for v, t in zip(args, signature.args))
    index = builder.add(first_, offset_)  # (the low 32 bits of the sum are those of the low 32 bits' sum)
    return lowbias32_ir(builder, builder.xor(index, key_))


@intrinsic
def random_bits(typingctx, key, first, offset):
    """quant.master.random_bits(key, first + offset) (integers; uint32 wrap-around), as uint32,
    all in 32-bit operations, which vectorize at full width (int64 ones at half)."""
    if not all(isinstance(t, types.Integer) for t in (key, first, offset)):
        return None

    def codegen(context, builder, signature, args):
        return builder.lshr(_hash_of_index(builder, signature, args), _i32(16))

    return types.uint32(key, first, offset), codegen


@intrinsic
def state_random_bits(typingctx, key, first, offset):
    """quant.master.state_random_bits(key, first + offset): ``random_bits``' hash, its low 16 bits."""
    if not all(isinstance(t, types.Integer) for t in (key, first, offset)):
        return None

    def codegen(context, builder, signature, args):
        return builder.and_(_hash_of_index(builder, signature, args), _i32(0xFFFF))

    return types.uint32(key, first, offset), codegen


@intrinsic
def stochastic_bf16(typingctx, x, r):
    """quant.master.stochastic_round of fp32 ``x`` to a bf16 pattern (int16), ``r`` its random
    bits (``random_bits``); Inf and NaN as ``bits.f32_to_bf16`` rounds them (NaN: 0x7FC0)."""
    if x != types.float32 or not isinstance(r, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        u = builder.bitcast(args[0], _I32)
        up = builder.icmp_unsigned("<", _to_i32(builder, args[1], r, r.signed), builder.and_(u, _i32(0xFFFF)))
        top = builder.lshr(u, _i32(16))
        rounded = builder.add(top, builder.zext(up, _I32))
        finite = builder.icmp_unsigned("<", builder.and_(u, _i32(0x7FFFFFFF)), _i32(0x7F800000))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(finite, rounded, builder.select(nan, _i32(0x7FC0), top)), _I16)

    return types.int16(x, r), codegen


@njit(forceinline=True, **KERNEL)
def stochastic_f16(x, r):
    """quant.master.stochastic_round of fp32 ``x`` to an fp16 pattern, ``r`` its random bits."""
    toward_zero = _fp16_toward_zero(x)
    spacing = _power_of_two(_spacing_exponent(toward_zero & 0x7FFF))
    distance = (abs(x) - abs(f16_to_f32(toward_zero))) * (_TWO_POW_16 / spacing)  # exact: a power of two
    h = toward_zero + 1 if np.float32(r) < distance else toward_zero
    return h if _finite(x) else f32_to_f16(x)
