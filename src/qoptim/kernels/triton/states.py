"""How the block kernel reads and writes the states of its [ROWS, 256] tile in each layout, and
the quantizer they share, bit for bit as the reference's ``_load`` / ``_store``.

The layout is a compile-time switch of the kernel (``LAYOUT``, made by ``launch.layout_of``):
  * ``FP32_STATES``: float32 values;
  * ``BLOCKWISE_8BIT``: a byte per element (a code of a 256-entry map), a scale per 256-block;
  * ``WHOLE_TENSOR_8BIT``: a byte per element, one scale for the whole tensor;
  * ``BLOCKWISE_4BIT``: the 16-entry maps of ``quant.formats.FORMATS[4]``, a scale per 128-block,
    and a byte per element shared by the (at most two) states: state 0's code in bits 0-3, state
    1's in bits 4-7 (``StateSlot.shift``). A tile's bytes are read once and written once, both
    codes in each; a rule with one state keeps the high half of each byte as it was.

Requantizing a state (any layout): the new scale is the block's max |x| (NaN where a NaN is
among its values, as torch.amax), its inverse ``1 / scale`` in float32 (0 for a zero or NaN
scale), and an element's code is the count of the map's float32 midpoints strictly below
``u = x * inverse``, as ``torch.bucketize`` counts them (``round_to_code``: the one place that
rounds to nearest). A never-negative 8-bit state's positive value never takes code 0 (the 4-bit
unsigned map has no zero code). Blocks in ``bad`` (a NaN or Inf gradient) keep their bytes and
scales, except in the whole-tensor layout, where every element is recoded with the new global
scale (as the reference).

A block-wise state with a draw (``StateSlot.draw``: the optimizers' second moments), 4-bit or
8-bit, is rounded stochastically instead, as ``quant.blockwise.quantize_stochastic``
(``round_stochastically``): the same ``u``, the last code at or below it (the count of the codes
after the first at or below ``u``, NaN after them all), one up where the element's 16 random bits
(``draws.state_random_bits``) lie below ``(u - code[k]) * steps[k]``, the steps read from the table
the reference computes (``launch.steps_table``); a never-negative 8-bit state's positive value is
then raised from code 0 as when rounded to nearest. The states of a tile draw one hash per element
(the optimizers give a step's states one draw). Which states round stochastically is a
compile-time bitmask (``STOCHASTIC_STATES``): a state rounded to nearest runs the same code as
without it, and its table pointer is the midpoints, a stochastic one's the steps (the ``rounding``
table of each state). The whole-tensor layout never rounds stochastically (the reference refuses
a draw there, and so does ``launch.states_layout``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...quant import blockwise
from ...quant.formats import FORMATS
from .draws import state_random_bits

# State layouts, a compile-time switch (see the module docstring).
FP32_STATES, BLOCKWISE_8BIT, WHOLE_TENSOR_8BIT, BLOCKWISE_4BIT = (tl.constexpr(i) for i in range(4))

# quant.blockwise.SMALLEST_POSITIVE_CODE, as the kernel reads a global
SMALLEST_POSITIVE_CODE = tl.constexpr(blockwise.SMALLEST_POSITIVE_CODE)

# A 4-bit state's scale block: half a 256-block, so that a skipped 256-block is two whole ones.
HALF_BLOCK = tl.constexpr(FORMATS[4].blocksize)
assert 2 * FORMATS[4].blocksize == blockwise.BLOCK
NIBBLE = tl.constexpr(FORMATS[4].bits)


@triton.jit
def count_below(u, bounds_ptr, BITS: tl.constexpr, AT_OR_BELOW: tl.constexpr):
    """int32 count of the ``2**BITS - 1`` sorted floats at ``bounds_ptr`` that lie strictly below
    each u (``AT_OR_BELOW``: at or below), NaN counting them all.

    A branchless binary search of ``BITS`` loads. The test is ``not (bound >= u)`` (``not (bound >
    u)``) rather than ``bound < u`` (``bound <= u``) so that a NaN lands after every bound, where
    torch.bucketize puts it.
    """
    index = tl.zeros(u.shape, dtype=tl.int32)
    for k in tl.static_range(BITS):
        step = 2 ** (BITS - 1 - k)  # 2**(BITS - 1), ..., 1 (a constexpr)
        bound = tl.load(bounds_ptr + index + (step - 1))
        if AT_OR_BELOW:
            above = bound > u
        else:
            above = bound >= u
        index += tl.where(above, 0, step)
    return index


@triton.jit
def round_to_code(x, inv_scale, mids_ptr, BITS: tl.constexpr):
    """int32 index of the code nearest each x: the number of the ``2**BITS - 1`` midpoints
    strictly below u = x * inv_scale (``mids_ptr``: ``2**BITS`` floats, the last one an unread
    sentinel), NaN on the last code, as torch.bucketize."""
    return count_below(x * inv_scale, mids_ptr, BITS, False)


@triton.jit
def round_stochastically(u, code_ptr, steps_ptr, r, BITS: tl.constexpr):
    """int32 index of the code of each u rounded stochastically, as quant.blockwise.quantize_stochastic:
    k, the last of the ``2**BITS`` codes at or below u (the codes after the first at or below it;
    NaN: the last), then k + 1 where ``r`` (float32 of 16 random bits) < (u - code[k]) * steps[k].
    The difference is rounded to float32 before the product (two roundings, as torch's)."""
    k = count_below(u, code_ptr + 1, BITS, True)
    distance = u - tl.load(code_ptr + k)
    return k + (r < distance * tl.load(steps_ptr + k)).to(tl.int32)


@triton.jit
def _raise_positive_from_zero(codes, x):
    """quant.blockwise.raise_positive_from_zero: a positive value of a never-negative state
    never takes code 0, but at least the smallest positive code."""
    return tl.where((codes < SMALLEST_POSITIVE_CODE) & (x > 0), SMALLEST_POSITIVE_CODE, codes)


@triton.jit
def _inverse(scale):
    """1 / scale, or 0 for a zero (or NaN) scale: the reference's ``where(absmax > 0, 1 / absmax, 0)``."""
    positive = scale > 0
    safe = tl.where(positive, scale, 1.0)  # no division by zero, even in lanes thrown away
    return tl.where(positive, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)


@triton.jit
def nan_max(x, axis: tl.constexpr):
    """max along ``axis``, NaN where a NaN is among the values (as torch.amax; tl.max may drop NaNs)."""
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=axis))


@triton.jit
def _row_absmax(x, mask):
    """max |x| of each row over its valid elements."""
    return nan_max(tl.where(mask, tl.abs(x), 0.0), 1)


@triton.jit
def tile_peak(x, mask):
    """max |x| of the whole tile over its valid elements."""
    return nan_max(_row_absmax(x, mask), 0)


@triton.jit
def _half_block_scales(absmax_ptr, rows, n):
    """The old scales of each row's two 128-blocks (0 past the tensor's end)."""
    first = rows * 2
    low = tl.load(absmax_ptr + first, mask=first * HALF_BLOCK < n, other=0.0)
    high = tl.load(absmax_ptr + first + 1, mask=(first + 1) * HALF_BLOCK < n, other=0.0)
    return low, high


@triton.jit
def _dequantize_nibbles(codes, code_ptr, absmax_ptr, rows, n, low_half):
    """fp32 values of one 4-bit state's int32 codes: code[q] times its 128-block's scale."""
    low, high = _half_block_scales(absmax_ptr, rows, n)
    return tl.load(code_ptr + codes) * tl.where(low_half, low[:, None], high[:, None])


@triton.jit
def _requantize_nibbles(x, code_ptr, rounding_ptr, absmax_ptr, mask, rows, n, bad, low_half, r, STOCHASTIC: tl.constexpr):
    """int32 4-bit codes of one state's updated tile; writes the new scale of each 128-block,
    but those of the blocks in ``bad``. Rounded to nearest (``rounding_ptr``: the midpoints), or
    ``STOCHASTIC``ally (``rounding_ptr``: the steps; ``r``: each element's random bits)."""
    magnitude = tl.where(mask, tl.abs(x), 0.0)
    low = nan_max(tl.where(low_half, magnitude, 0.0), 1)
    high = nan_max(tl.where(low_half, 0.0, magnitude), 1)
    first = rows * 2
    good = bad == 0
    tl.store(absmax_ptr + first, low, mask=good & (first * HALF_BLOCK < n))
    tl.store(absmax_ptr + first + 1, high, mask=good & ((first + 1) * HALF_BLOCK < n))
    inv_scale = tl.where(low_half, _inverse(low)[:, None], _inverse(high)[:, None])
    if STOCHASTIC:
        return round_stochastically(x * inv_scale, code_ptr, rounding_ptr, r, NIBBLE)
    return round_to_code(x, inv_scale, rounding_ptr, NIBBLE)


@triton.jit
def load_states(s0_ptr, code0_ptr, absmax0_ptr, s1_ptr, code1_ptr, absmax1_ptr, s2_ptr, code2_ptr, absmax2_ptr, offs, mask,
                rows, row_mask, n, LAYOUT: tl.constexpr, N_STATES: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """The fp32 tiles of the states (dequantized with their old scales; those past ``N_STATES``:
    placeholders), and the 4-bit layout's bytes as int32 (others: a placeholder), which
    ``store_states`` writes back whole."""
    if LAYOUT == BLOCKWISE_4BIT:
        tl.static_assert(N_STATES <= 2)
        packed = tl.load(s0_ptr + offs, mask=mask, other=0).to(tl.int32)  # both states' codes: one read
        low_half = (tl.arange(0, BLOCK_SIZE) < HALF_BLOCK)[None, :]
        s0 = _dequantize_nibbles(packed & 0xF, code0_ptr, absmax0_ptr, rows, n, low_half)
        s1 = s0  # placeholders where the rule keeps fewer states
        s2 = s0
        if N_STATES > 1:
            s1 = _dequantize_nibbles(packed >> NIBBLE, code1_ptr, absmax1_ptr, rows, n, low_half)
    else:
        packed = offs  # an unread placeholder
        s0 = _load_state(s0_ptr, code0_ptr, absmax0_ptr, offs, mask, rows, row_mask, LAYOUT)
        s1 = s0
        s2 = s0
        if N_STATES > 1:
            s1 = _load_state(s1_ptr, code1_ptr, absmax1_ptr, offs, mask, rows, row_mask, LAYOUT)
        if N_STATES > 2:
            s2 = _load_state(s2_ptr, code2_ptr, absmax2_ptr, offs, mask, rows, row_mask, LAYOUT)
    return s0, s1, s2, packed


@triton.jit
def store_states(s0_ptr, code0_ptr, rounding0_ptr, absmax0_ptr, s1_ptr, code1_ptr, rounding1_ptr, absmax1_ptr, s2_ptr,
                 code2_ptr, rounding2_ptr, absmax2_ptr, new_scales_ptr, s0, s1, s2, packed, offs, mask, rows, row_mask, n, bad,
                 state_key, state_first, LAYOUT: tl.constexpr, N_STATES: tl.constexpr, NEVER_NEGATIVE: tl.constexpr,
                 STOCHASTIC_STATES: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """Write the states' updated tiles (see the module docstring); ``packed``: ``load_states``'
    bytes. ``NEVER_NEGATIVE``: bit i set where state i is never negative. ``STOCHASTIC_STATES``
    (block-wise layouts): bit i set where state i is rounded stochastically, each element drawing
    the bits of its index in the parameter (``state_first`` + its offset, int64) under uint32
    ``state_key``: one hash per element for all the states."""
    r = 0.0  # unread where no state is rounded stochastically
    if STOCHASTIC_STATES != 0:
        r = state_random_bits(state_key, state_first + offs).to(tl.float32)
    if LAYOUT == BLOCKWISE_4BIT:
        low_half = (tl.arange(0, BLOCK_SIZE) < HALF_BLOCK)[None, :]
        codes = _requantize_nibbles(s0, code0_ptr, rounding0_ptr, absmax0_ptr, mask, rows, n, bad, low_half, r,
                                    (STOCHASTIC_STATES & 1) != 0)  # fmt: skip
        if N_STATES > 1:
            codes |= _requantize_nibbles(s1, code1_ptr, rounding1_ptr, absmax1_ptr, mask, rows, n, bad, low_half, r,
                                         (STOCHASTIC_STATES & 2) != 0) << NIBBLE  # fmt: skip
        else:
            codes |= packed & 0xF0  # the other state's half of the byte, as it was
        tl.store(s0_ptr + offs, codes.to(tl.uint8), mask=mask & (bad[:, None] == 0))
    else:
        _store_state(s0_ptr, code0_ptr, rounding0_ptr, absmax0_ptr, new_scales_ptr, s0, offs, mask, rows, row_mask, bad, r,
                     LAYOUT, (NEVER_NEGATIVE & 1) == 0, (STOCHASTIC_STATES & 1) != 0)  # fmt: skip
        if N_STATES > 1:
            _store_state(s1_ptr, code1_ptr, rounding1_ptr, absmax1_ptr, new_scales_ptr + 1, s1, offs, mask, rows, row_mask,
                         bad, r, LAYOUT, (NEVER_NEGATIVE & 2) == 0, (STOCHASTIC_STATES & 2) != 0)  # fmt: skip
        if N_STATES > 2:
            _store_state(s2_ptr, code2_ptr, rounding2_ptr, absmax2_ptr, new_scales_ptr + 2, s2, offs, mask, rows, row_mask,
                         bad, r, LAYOUT, (NEVER_NEGATIVE & 4) == 0, (STOCHASTIC_STATES & 4) != 0)  # fmt: skip


@triton.jit
def _load_state(ptr, code_ptr, absmax_ptr, offs, mask, rows, row_mask, LAYOUT: tl.constexpr):
    """fp32 values of one state's tile (dequantized with the old scale for 8-bit layouts)."""
    if LAYOUT == FP32_STATES:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    codes = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
    if LAYOUT == BLOCKWISE_8BIT:
        scale = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)[:, None]
    else:
        scale = tl.load(absmax_ptr)
    return tl.load(code_ptr + codes) * scale


@triton.jit
def _store_state(ptr, code_ptr, rounding_ptr, absmax_ptr, new_scale_ptr, x, offs, mask, rows, row_mask, bad, r,
                 LAYOUT: tl.constexpr, SIGNED: tl.constexpr, STOCHASTIC: tl.constexpr):  # fmt: skip
    """Write one state's updated tile in a layout of a state per tensor (not 4-bit). Rounded to
    nearest (``rounding_ptr``: the midpoints), or ``STOCHASTIC``ally (block-wise only;
    ``rounding_ptr``: the steps; ``r``: each element's random bits)."""
    if LAYOUT == FP32_STATES:
        tl.static_assert(not STOCHASTIC)
        tl.store(ptr + offs, x, mask=mask & (bad[:, None] == 0))
    elif LAYOUT == BLOCKWISE_8BIT:
        scale = _row_absmax(x, mask)
        keep = row_mask & (bad == 0)
        tl.store(absmax_ptr + rows, scale, mask=keep)
        if STOCHASTIC:
            codes = round_stochastically(x * _inverse(scale)[:, None], code_ptr, rounding_ptr, r, 8)
        else:
            codes = round_to_code(x, _inverse(scale)[:, None], rounding_ptr, 8)
        if not SIGNED:
            codes = _raise_positive_from_zero(codes, x)
        tl.store(ptr + offs, codes.to(tl.uint8), mask=mask & keep[:, None])
    else:
        tl.static_assert(not STOCHASTIC)
        codes = round_to_code(x, _inverse(tl.load(new_scale_ptr)), rounding_ptr, 8)
        if not SIGNED:
            codes = _raise_positive_from_zero(codes, x)
        tl.store(ptr + offs, codes.to(tl.uint8), mask=mask)
