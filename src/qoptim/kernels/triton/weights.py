"""How the block kernel reads and writes a parameter in each weight format (``types.WeightFormat``):
``quant.master``'s decode, encode and stochastic rounding on tiles, bit for bit as its torch code.

The format is a compile-time switch of the kernel (``WEIGHTS``, made by ``launch.weight_switch``):
  * ``NEAREST_WEIGHTS``: fp32 values, rounded to nearest even on the store (fp32 parameters
    always: they are their own master and ignore a draw);
  * ``MASTER_24`` / ``MASTER_32``: a bf16 / fp16 weight and an int8 / int16 correction hold the
    fp32 master: read decoded, written encoded (weight and correction) in the same pass;
  * ``STOCHASTIC_WEIGHTS``: written rounded stochastically, element i of the parameter drawing
    ``random_bits(key, first_index + i)``.

Exactness: every step is an integer op on bit patterns, a conversion that is exact or correctly
rounded (fp32 <-> fp16, which the interpreter and the GPU round to nearest even as torch does),
or a float op by a power of two built from bits (never exp2); rounding half away from zero is
a floor and a compare (never ``floor(x + 0.5)``, which rounds the sum first). The random bits are
``draws``' (the hash's high half; the stochastically rounded block-wise states take its low half).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...quant import master
from .draws import random_bits

# The weight format, a compile-time switch (see the module docstring).
NEAREST_WEIGHTS, MASTER_24, MASTER_32, STOCHASTIC_WEIGHTS = (tl.constexpr(i) for i in range(4))

# quant.master.FP16_UNIT_SHIFT, as the kernel reads globals
FP16_SHIFT_24 = tl.constexpr(master.FP16_UNIT_SHIFT[24])
FP16_SHIFT_32 = tl.constexpr(master.FP16_UNIT_SHIFT[32])


@triton.jit
def round_to_bf16(x):
    """float32 -> bfloat16, round to nearest even, in integer ops: Triton's interpreter truncates
    instead (the GPU would round correctly; the result is the same). NaN becomes torch's 0x7FC0."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def widen(x):
    """float32 values of a tile of fp32, fp16 or bf16, exactly: bf16 by its bits (Triton's
    interpreter converts bf16 subnormals wrongly; on the GPU this is what the conversion does)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _is_finite(x):
    return tl.abs(x) < float("inf")  # false for NaN and +-Inf


@triton.jit
def _power_of_two(exponent):
    """fp32 2**exponent for int32 exponents in fp32's normal range, from bits (master._power_of_two)."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _spacing_exponent(h):
    """master.fp16_spacing_exponent of int32 fp16 magnitude patterns."""
    return tl.maximum(h >> 10, 1) - 25


@triton.jit
def _unit_exponent(weight, SHIFT: tl.constexpr):
    """master._unit_exponent: log2 of the correction's unit below fp16 ``weight``."""
    h = weight.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return _spacing_exponent(tl.maximum(h - 1, 0)) - SHIFT


@triton.jit
def _fp16(h):
    """fp16 values of int32 patterns (their low 16 bits)."""
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_toward_zero(x):
    """master._fp16_toward_zero: int32 pattern (sign-extended) of the fp16 value next to ``x``
    toward zero (``x`` itself if an fp16 value)."""
    nearest = x.to(tl.float16)  # round to nearest even, as torch's cast
    h = nearest.to(tl.int16, bitcast=True).to(tl.int32)
    return tl.where(tl.abs(nearest.to(tl.float32)) > tl.abs(x), h - 1, h)


@triton.jit
def _round_half_away(x):
    """master._round_half_away for |x| < 2**24 (a master scaled to its grid: below 2**(11 + shift)),
    ties away from zero, the sign of x kept (-0 too); other lanes (non-finite) come out as 0.
    The floor is a truncating conversion to int32 (exact here): Triton emits the GPU's floor
    with subnormals flushed (``cvt.rmi.ftz``), which the PTX test rules out altogether."""
    magnitude = tl.abs(x)
    magnitude = tl.where(magnitude < 16777216.0, magnitude, 0.0)  # (no inf or NaN converted to an integer)
    whole = magnitude.to(tl.int32).to(tl.float32)
    rounded = tl.where(magnitude - whole >= 0.5, whole + 1.0, whole)
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


# ---- master weights --------------------------------------------------------------------------


@triton.jit
def _decode_bf16(weight, c, BITS: tl.constexpr):
    """master._decode_bf16; ``c``: the correction as int32."""
    w = weight.to(tl.uint16, bitcast=True).to(tl.uint32)
    hi = (w - (c < 0).to(tl.uint32)) & 0xFFFF
    low_bits = (c & ((1 << (BITS - 16)) - 1)).to(tl.uint32)
    decoded = ((hi << 16) | (low_bits << (32 - BITS))).to(tl.float32, bitcast=True)
    return tl.where((w & 0x7FFF) > 0x7F80, (w << 16).to(tl.float32, bitcast=True), decoded)  # a NaN weight: itself


@triton.jit
def _encode_bf16(m, BITS: tl.constexpr):
    """master._encode_bf16: (bf16 weight, int32 correction)."""
    low = (1 << (BITS - 16)) - 1  # the correction's bits, below the weight's 16
    original = m.to(tl.uint32, bitcast=True)
    u = original
    if BITS == 24:  # the master is fp32 rounded to 24 bits (ties away): its low byte dropped
        u = ((u + 0x80) >> 8) << 8
    rounded = (u + 0x8000) >> 16  # to nearest, ties away from zero (a sign-magnitude pattern)
    c = ((u >> (32 - BITS)) & low).to(tl.int32)
    c = tl.where(c > low >> 1, c - (low + 1), c)  # as a signed integer
    nan = m != m
    rounded = tl.where(nan, (original >> 16) | 0x0040, rounded)  # a NaN's own top half (rounding could carry out of it)
    c = tl.where(nan, 0, c)
    return (rounded & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True), c


@triton.jit
def _decode_f16(weight, c, SHIFT: tl.constexpr):
    """master._decode_f16; ``c``: the correction as int32."""
    w = weight.to(tl.float32)
    exact = w + c.to(tl.float32) * _power_of_two(_unit_exponent(weight, SHIFT))
    return tl.where(_is_finite(w) & (c != 0), exact, w)  # (c = 0: w itself, -0 too)


@triton.jit
def _encode_f16(m, SHIFT: tl.constexpr):
    """master._encode_f16: (fp16 weight, int32 correction)."""
    field = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    grid = tl.maximum(field, 127 - 14) - 127 - 10 - SHIFT
    on_grid = _round_half_away(m * _power_of_two(-grid)) * _power_of_two(grid)  # exact: powers of two
    m = tl.where(_is_finite(m), on_grid, m)
    toward_zero = _fp16_toward_zero(m)
    distance = tl.abs(m) - tl.abs(_fp16(toward_zero).to(tl.float32))
    half_spacing = _power_of_two(_spacing_exponent(toward_zero & 0x7FFF) - 1)
    weight = _fp16(tl.where(distance >= half_spacing, toward_zero + 1, toward_zero))  # ties away from zero
    weight = tl.where(m != m, m.to(tl.float16), weight)
    c = (m - weight.to(tl.float32)) * _power_of_two(-_unit_exponent(weight, SHIFT))  # an integer, exactly
    c = tl.where(_is_finite(weight.to(tl.float32)), c, 0.0)
    return weight, c.to(tl.int32)


@triton.jit
def load_weights(p_ptr, c_ptr, offs, mask, WEIGHTS: tl.constexpr, PARAM_BF16: tl.constexpr):
    """fp32 values of the parameter's tile: its master, decoded, where it has one."""
    w = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if WEIGHTS == MASTER_24 or WEIGHTS == MASTER_32:
        c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32)
        if PARAM_BF16:
            return _decode_bf16(w, c, 24 if WEIGHTS == MASTER_24 else 32)
        return _decode_f16(w, c, FP16_SHIFT_24 if WEIGHTS == MASTER_24 else FP16_SHIFT_32)
    return widen(w)


@triton.jit
def store_weights(p_ptr, c_ptr, p, offs, mask, draw_key, draw_first, WEIGHTS: tl.constexpr, PARAM_BF16: tl.constexpr):
    """Write the updated fp32 tile ``p`` into the parameter (and its correction) in its format.
    ``draw_key`` (uint32), ``draw_first`` (int64): stochastic rounding's key and first index."""
    if WEIGHTS == MASTER_24 or WEIGHTS == MASTER_32:
        if PARAM_BF16:
            weight, c = _encode_bf16(p, 24 if WEIGHTS == MASTER_24 else 32)
        else:
            weight, c = _encode_f16(p, FP16_SHIFT_24 if WEIGHTS == MASTER_24 else FP16_SHIFT_32)
        tl.store(p_ptr + offs, weight, mask=mask)
        tl.store(c_ptr + offs, c.to(c_ptr.dtype.element_ty), mask=mask)
    elif WEIGHTS == STOCHASTIC_WEIGHTS:
        r = random_bits(draw_key, draw_first + offs)
        if PARAM_BF16:
            weight = _stochastic_bf16(p, r)
        else:
            weight = _stochastic_f16(p, r)
        tl.store(p_ptr + offs, weight, mask=mask)
    elif PARAM_BF16:
        tl.store(p_ptr + offs, round_to_bf16(p), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)  # float16: round to nearest even


# ---- stochastic rounding ---------------------------------------------------------------------


@triton.jit
def _stochastic_bf16(x, r):
    """master.stochastic_round to bf16: away from zero when r < the 16 bits dropped."""
    u = x.to(tl.uint32, bitcast=True)
    t = (u >> 16) + (r < (u & 0xFFFF)).to(tl.uint32)
    rounded = (t & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(_is_finite(x), rounded, round_to_bf16(x))


@triton.jit
def _stochastic_f16(x, r):
    """master.stochastic_round to fp16: away from zero when r < the distance past the value
    toward zero in 2**-16ths of the spacing (a power of two: the product is exact)."""
    toward_zero = _fp16_toward_zero(x)
    scale = _power_of_two(16 - _spacing_exponent(toward_zero & 0x7FFF))  # 65536 / spacing
    distance = (tl.abs(x) - tl.abs(_fp16(toward_zero).to(tl.float32))) * scale
    rounded = _fp16(tl.where(r.to(tl.float32) < distance, toward_zero + 1, toward_zero))
    return tl.where(_is_finite(x), rounded, x.to(tl.float16))
