"""A 16-bit weight and the fp32 master it stands for: the correction that holds the master's
lost low bits, and stochastic rounding. Plain torch ops; the fused kernels agree bit for bit.

**Master weights** (``master_weight_bits``). A bf16 or fp16 parameter keeps its weight ``w`` (what
the model computes with) and a correction ``c`` of its shape, int8 (24 bits in all) or int16 (32).
The pair is the master ``m``, the fp32 value the optimizer updates; after each update the new
master is encoded again into (w, c). Every step is therefore exactly a step on the master.

* bf16 is fp32's top 16 bits, so the master is a bit pattern and ``c`` its low bits:
  - 32 bits: ``c`` is the low 16 bits of the fp32 master, and the master **is** an fp32 value,
    bit for bit (TransformerEngine's remainders do the same).
  - 24 bits: the master is fp32 rounded to 24 bits (to nearest, ties away from zero: 15 explicit
    fraction bits, about 4.5 decimal digits more than bf16), ``c`` its low 8 bits.
  - ``w`` is the master rounded to nearest bf16, **ties away from zero**. (Not ties to even: then
    an even bf16 pattern would stand for 2**16 + 1 masters, one too many for 16 bits of ``c``.)
    In bits: ``w = (m + half) >> k`` on the master's pattern, ``c = m & low`` as a signed
    integer, and ``m = ((w - (c < 0)) << k) | (c & low)``: when the low half's top bit is set, w
    was rounded up, which ``c < 0`` says.
  - Zeros, subnormals and the sign come out right by themselves (bit patterns in sign and
    magnitude); a master past bf16's largest finite value makes ``w`` inf while the pair still
    holds the finite master. A NaN master gives a quiet NaN weight of its sign and ``c = 0``.
* fp16 is not a prefix of fp32, so ``c`` counts units below the weight: ``m = w + c * unit``,
  where ``unit`` is ``gap(w) / 2**13`` (32 bits) or ``gap(w) / 2**7`` (24 bits) and ``gap(w)``, a
  power of two, is the distance from ``|w|`` to the fp16 value next toward zero (2**-24 for zero).
  - Encoding rounds the master to its grid first: 2**13 (or 2**7) steps per fp16 spacing of its
    binade (to nearest, ties away from zero). At 32 bits that is fp32's own grid in fp16's normal
    range (|m| >= 2**-14), so there the master is an fp32 value kept bit for bit; below it, the
    master is kept to 2**-37 (2**-31 at 24 bits).
  - ``w`` is that master rounded to nearest fp16, ties away from zero, as for bf16; then
    ``c = (m - w) / unit`` is an integer in range (|c| <= 2**shift - 2), and decoding is exact.
  - A master that rounds past fp16's largest finite value gives ``w = inf`` and ``c = 0``: the
    master is then inf too, as the weight would be after a cast. NaN gives NaN and ``c = 0``.
* In both, decoding and encoding again gives back the same pair: a master left unchanged by a
  step keeps its weight and correction.

**Stochastic rounding** (``weight_rounding="stochastic"``, no master): the updated fp32 value
``x`` becomes the 16-bit neighbour toward zero, ``t``, or the one away from zero, ``t'``, with
P(t') = (|x| - |t|) / (|t'| - |t|), so the weight is right on average. The random 16 bits of an
element come from a counter-based hash (``random_bits``) of the element's index and a 32-bit key
of the step (``step_key(seed, step)``): the same in every backend, and a resumed run draws what an
uninterrupted one would. For bf16 ``t`` is ``x``'s top 16 bits and the draw ``r`` rounds away
when ``r < x & 0xFFFF`` (torchao's ``_fp32_to_bf16_sr``); for fp16 when ``r < (|x| - |t|) *
2**16 / (|t'| - |t|)`` (a power of two: the gap past the largest finite value is taken as 32). Inf and NaN stay as they are; a value past the largest finite weight can round to
inf, as nearest rounding would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "CORRECTION_DTYPES", "FP16_UNIT_SHIFT", "HALF_PRECISION", "MASTER_BITS", "Draw", "FormatError", "bits_of",
    "correction_dtype", "decode", "encode", "fp16_spacing_exponent", "lowbias32", "random_bits", "state_random_bits",
    "step_key", "stochastic_round",
]  # fmt: skip

MASTER_BITS = (24, 32)  # the master weight formats (``None``: the weight is its own master)
CORRECTION_DTYPES = {24: torch.int8, 32: torch.int16}  # bits of the master -> dtype of the correction
FP16_UNIT_SHIFT = {24: 7, 32: 13}  # fp16: the correction's unit is gap(w) / 2**shift (see the module doc)
HALF_PRECISION = (torch.bfloat16, torch.float16)

_U32 = 0xFFFFFFFF


class FormatError(ValueError):
    """A weight dtype or master width that has no encoding."""


def correction_dtype(bits: int) -> torch.dtype:
    if bits not in CORRECTION_DTYPES:
        raise FormatError(f"master_weight_bits must be None, 24 or 32, got {bits!r}")
    return CORRECTION_DTYPES[bits]


def bits_of(c_dtype: torch.dtype) -> int:
    """The master's width for a correction of ``c_dtype``."""
    for bits, dtype in CORRECTION_DTYPES.items():
        if dtype == c_dtype:
            return bits
    raise FormatError(f"a master correction is int8 or int16, not {c_dtype}")


def _check(dtype: torch.dtype) -> None:
    if dtype not in HALF_PRECISION:
        raise FormatError(f"a master correction belongs to a bfloat16 or float16 weight, not {dtype}")


def encode(master: torch.Tensor, dtype: torch.dtype, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight of ``dtype``, correction) of fp32 ``master`` in the ``bits``-bit format."""
    _check(dtype)
    c_dtype = correction_dtype(bits)
    master = master.float()
    if dtype == torch.bfloat16:
        return _encode_bf16(master, bits, c_dtype)
    return _encode_f16(master, bits, c_dtype)


def decode(weight: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """The fp32 master held by ``weight`` and its ``correction`` (int8: 24 bits, int16: 32)."""
    _check(weight.dtype)
    bits = bits_of(correction.dtype)
    if weight.dtype == torch.bfloat16:
        return _decode_bf16(weight, correction, bits)
    return _decode_f16(weight, correction, bits)


# ---- bf16: the master's bit pattern ---------------------------------------------------------


def _pattern(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns as non-negative int64."""
    return x.view(torch.int32).to(torch.int64) & _U32


def _to_int32(u: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of int64 ``u`` as int32 (two's complement)."""
    u = u & _U32
    return torch.where(u >= 1 << 31, u - (1 << 32), u).to(torch.int32)


def _encode_bf16(master: torch.Tensor, bits: int, c_dtype: torch.dtype):
    original = u = _pattern(master)
    if bits == 24:  # the master itself is fp32 rounded to 24 bits: its pattern's low byte dropped
        u = ((u + 0x80) >> 8) << 8
    low = (1 << (bits - 16)) - 1  # the correction's bits, below the weight's 16
    shift = 32 - 16  # the weight is the pattern's top half
    rounded = (u + (1 << (shift - 1))) >> shift
    c = (u >> (32 - bits)) & low
    c = torch.where(c > low >> 1, c - (low + 1), c)  # as a signed integer
    nan = torch.isnan(master)
    rounded = torch.where(nan, (original >> shift) | 0x0040, rounded)  # (the NaN's own top half: rounding could carry out of it)
    c = torch.where(nan, 0, c)
    weight = torch.where(rounded >= 1 << 15, rounded - (1 << 16), rounded).to(torch.int16).view(torch.bfloat16)
    return weight, c.to(c_dtype)


def _decode_bf16(weight: torch.Tensor, correction: torch.Tensor, bits: int) -> torch.Tensor:
    w = weight.view(torch.int16).to(torch.int64) & 0xFFFF
    c = correction.to(torch.int64)
    hi = (w - (c < 0).to(torch.int64)) & 0xFFFF
    u = (hi << 16) | ((c & ((1 << (bits - 16)) - 1)) << (32 - bits))
    master = _to_int32(u).view(torch.float32)
    return torch.where(torch.isnan(weight), weight.float(), master)


# ---- fp16: units of the gap below the weight ------------------------------------------------


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """fp32 2**exponent for integer exponents in fp32's normal range, built from bits (exact in
    every backend, where an exp2 might not be)."""
    return ((exponent + 127) << 23).to(torch.int32).view(torch.float32)


def fp16_spacing_exponent(h: torch.Tensor) -> torch.Tensor:
    """log2 of the distance from fp16 magnitude pattern ``h`` (finite) to the next one away from
    zero: 2**(e - 25) for exponent field e >= 1, 2**-24 for zero and subnormals."""
    return torch.clamp(h >> 10, min=1) - 25


def _unit_exponent(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """log2 of the correction's unit: the gap from |w| to the fp16 value next toward zero (that
    of zero: 2**-24), over 2**FP16_UNIT_SHIFT[bits]."""
    h = weight.view(torch.int16).to(torch.int32) & 0x7FFF
    return fp16_spacing_exponent(torch.clamp(h - 1, min=0)) - FP16_UNIT_SHIFT[bits]


def _encode_f16(master: torch.Tensor, bits: int, c_dtype: torch.dtype):
    shift = FP16_UNIT_SHIFT[bits]
    # the master on its grid: 2**shift steps per fp16 spacing of its binade (fp16's subnormal
    # range: of the smallest normal binade); at 32 bits that is fp32's own grid, so m stays m
    field = (master.view(torch.int32) >> 23) & 0xFF
    grid = torch.clamp(field, min=127 - 14) - 127 - 10 - shift
    on_grid = _round_half_away(master * _power_of_two(-grid)) * _power_of_two(grid)  # (exact: powers of two)
    master = torch.where(torch.isfinite(master), on_grid, master)
    toward_zero = _fp16_toward_zero(master)
    distance = master.abs() - _fp16(toward_zero).float().abs()
    half_spacing = _power_of_two(fp16_spacing_exponent(toward_zero & 0x7FFF) - 1)
    h = torch.where(distance >= half_spacing, toward_zero + 1, toward_zero)  # ties away from zero
    weight = torch.where(torch.isnan(master), master.to(torch.float16), _fp16(h))
    c = (master - weight.float()) * _power_of_two(-_unit_exponent(weight, bits))  # an integer, exactly
    c = torch.where(torch.isfinite(weight), c, 0.0)
    return weight, c.to(c_dtype)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """x rounded to an integer, ties away from zero. (``floor(|x| + 0.5)`` would round that sum in
    fp32 first: 0.49999997 + 0.5 is 1.)"""
    magnitude = x.abs()
    whole = magnitude.floor()
    return torch.where(magnitude - whole >= 0.5, whole + 1, whole).copysign(x)


def _fp16_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """int32 pattern of the fp16 value next to finite fp32 ``x`` toward zero (``x`` itself if an
    fp16 value)."""
    nearest = x.to(torch.float16)
    h = nearest.view(torch.int16).to(torch.int32)
    return torch.where(nearest.float().abs() > x.abs(), h - 1, h)  # (pattern - 1: one step toward zero)


def _decode_f16(weight: torch.Tensor, correction: torch.Tensor, bits: int) -> torch.Tensor:
    w = weight.float()
    exact = w + correction.float() * _power_of_two(_unit_exponent(weight, bits))
    return torch.where(torch.isfinite(w) & (correction != 0), exact, w)  # (c = 0: w itself, -0 too)


# ---- stochastic rounding --------------------------------------------------------------------


class Draw(NamedTuple):
    key: int  # the step's 32-bit key (``step_key``)
    first_index: int = 0  # the index of the tensor's first element (a shard's offset in its parameter)


def lowbias32(x: torch.Tensor | int) -> torch.Tensor | int:
    """Chris Wellons' lowbias32 integer hash (a bijection of 32-bit integers) on int64 holding
    uint32 values (tensors) or on a Python int."""
    x = x & _U32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def step_key(seed: int, step: int) -> int:
    """The 32-bit key of one parameter's draws at ``step`` (its ``seed`` is drawn once)."""
    return lowbias32(lowbias32(seed & _U32) ^ (step & _U32))


def random_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """16 uniform random bits (int64 in [0, 65536)) per element index (uint32 wrap-around): the
    high half of the element's hash, which rounds its weight."""
    return lowbias32((index & _U32) ^ key) >> 16


def state_random_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """The other 16 bits of the same hash (its low half), which round the element's stochastically
    rounded optimizer state (``quant.blockwise.quantize_stochastic``): one hash an element serves
    both draws, and neither depends on the other."""
    return lowbias32((index & _U32) ^ key) & 0xFFFF


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, draw: Draw) -> torch.Tensor:
    """fp32 ``x`` (flat) rounded stochastically to ``dtype`` (bf16 or fp16), element i drawing
    ``random_bits(draw.key, draw.first_index + i)``."""
    _check(dtype)
    x = x.float()
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + draw.first_index
    r = random_bits(draw.key, index).view(x.shape)
    if dtype == torch.bfloat16:
        u = _pattern(x)
        up = r < (u & 0xFFFF)
        t = (u >> 16) + up.to(torch.int64)
        rounded = torch.where(t >= 1 << 15, t - (1 << 16), t).to(torch.int16).view(torch.bfloat16)
    else:
        toward_zero = _fp16_toward_zero(x)
        spacing = _power_of_two(fp16_spacing_exponent(toward_zero & 0x7FFF))
        distance = (x.abs() - _fp16(toward_zero).float().abs()) * (65536.0 / spacing)  # exact: a power of two
        up = r.float() < distance
        rounded = _fp16(torch.where(up, toward_zero + 1, toward_zero))  # (pattern + 1: one step away)
    return torch.where(torch.isfinite(x), rounded, x.to(dtype))


def _fp16(h: torch.Tensor) -> torch.Tensor:
    """fp16 values of int32 patterns (their low 16 bits)."""
    return h.to(torch.int16).view(torch.float16)
