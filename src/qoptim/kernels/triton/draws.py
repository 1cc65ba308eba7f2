"""The random bits of stochastic rounding on tiles, bit for bit as ``quant.master``'s: one hash of
an element's index per draw (``lowbias32((index mod 2**32) ^ key)``), whose high 16 bits round the
element's weight (``random_bits``: ``weights``) and whose low 16 bits round its stochastically
rounded block-wise states, 4-bit or 8-bit (``state_random_bits``: ``states``). One definition of
the hash serves both, so that a step's weight and states draw the two halves of one hash, as the
reference's do.

The hash is uint32 arithmetic (wrapping multiplies, logical shifts); an index is an int64 offset
into the parameter plus the draw's first index, of which only the low 32 bits count.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lowbias32(x):
    """master.lowbias32 on uint32 (multiplies wrap around)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _hash_of_index(key, index):
    """The draw's hash of int64 element ``index`` (its low 32 bits) under uint32 ``key``."""
    return lowbias32(index.to(tl.uint32) ^ key)


@triton.jit
def random_bits(key, index):
    """master.random_bits: 16 random bits (uint32), the high half of the index's hash."""
    return _hash_of_index(key, index) >> 16


@triton.jit
def state_random_bits(key, index):
    """master.state_random_bits: the other 16 bits (uint32) of the same hash, its low half."""
    return _hash_of_index(key, index) & 0xFFFF
