"""The task kernels of 4-bit states (``layout.Layout.FOUR_BIT``): a task's 256-blocks of a step,
and of the trust pass of LAMB and LARS.

Per 256-block, a task reads each byte once, decodes both states' codes (``nibbles``), then
per half-block of 128 (a scale each) dequantizes (``code[q] * scale``), applies the rule's
math in float32 exactly as the 8-bit tasks do (``tasks.update_elements``: the same per-element
math, peaks as integer maxima of the magnitudes' bit patterns, NaN sticking), takes each
state's new scale and encodes both codes into each byte in one store. A block whose gradient
holds a NaN or Inf (with skipping on) keeps its parameter, both 4-bit halves of each byte and
its scales, as in the reference. The rule's states past its count (stand-ins) are never
touched, and a rule of one state keeps the other 4 bits of each byte.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from ..types import BLOCK
from .bits import ZERO, prefetch, stack_array, unowned
from .jit import INLINE, KERNEL
from .nibbles import HALF_BLOCK, decode, encode, nibble_view
from .paths import PortablePath, is_path
from .quantize import reciprocal
from .rules import state_count, unpack
from .tasks import AHEAD, has_nonfinite, sum_squares, task_blocks, trust_terms_block, update_elements
from .weights import prefetch_weights, weight_count, window

__all__ = ["four_bit_task", "four_bit_trust_task"]

assert BLOCK == 2 * HALF_BLOCK, "a 256-block holds two 4-bit scales"
_SCRATCH = 3 * BLOCK  # a task's stack scratch: three block buffers (the states', or the trust terms and states)


@njit(inline="always", **KERNEL)
def _scratch(s0, s1, s2):
    """A task's scratch, in its own stack frame (inlined into it): three block buffers and a
    block of bytes; its states, the caller's arrays without owners, as ``Nibbles``."""
    buffers = stack_array(np.float32, _SCRATCH)
    q = stack_array(np.uint8, BLOCK)
    s0, s1, s2 = unowned((s0, s1, s2))
    states = (nibble_view(s0), nibble_view(s1), nibble_view(s2))
    return buffers[:BLOCK], buffers[BLOCK : 2 * BLOCK], buffers[2 * BLOCK :], q, states


def _prefetch_block(p, g, codes, lo, path):
    """Ask for the parameter, gradient and bytes of the block at ``lo`` (vector paths)."""


@overload(_prefetch_block, jit_options=dict(forceinline=True))
def _prefetch_block_impl(p, g, codes, lo, path):
    if is_path(path, PortablePath):
        return lambda p, g, codes, lo, path: None

    def ask(p, g, codes, lo, path):
        prefetch_weights(p, lo, lo + BLOCK)
        prefetch(g, lo, lo + BLOCK)
        prefetch(codes, lo, lo + BLOCK)

    return ask


@njit(**INLINE)
def _decode_block(states, ns, lo, hi, b0, b1, path):
    """b0, b1 = the codes (unscaled) of the rule's states in block [lo, hi)."""
    decode(states[0], lo, hi, b0, path)
    if ns > 1:
        decode(states[1], lo, hi, b1, path)


@njit(**KERNEL)
def four_bit_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, k, skip, path):
    """Blocks of task ``t`` with 4-bit states (all sharing state 0's bytes); returns how many
    were skipped."""
    ns = state_count(rule)
    k = unpack(k)
    p, g = unowned((p, g))
    b0, b1, b2, q, states = _scratch(s0, s1, s2)
    n = weight_count(p)
    first, last = task_blocks(t, ntasks, (n + BLOCK - 1) // BLOCK)
    count = 0
    for b in range(first, last):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        if b + AHEAD < last:
            _prefetch_block(p, g, states[0].codes, lo + AHEAD * BLOCK, path)
        if skip and has_nonfinite(g[lo:hi]):
            count += 1
            continue
        _decode_block(states, ns, lo, hi, b0[: hi - lo], b1[: hi - lo], path)
        for start in range(lo, hi, HALF_BLOCK):
            end = min(hi, start + HALF_BLOCK)
            s, j, size = start // HALF_BLOCK, start - lo, end - start
            x0, x1 = b0[j : j + size], b1[j : j + size]
            scale1 = states[1].scales[s] if ns > 1 else ZERO
            peak0, peak1, _ = update_elements(
                rule, window(p, start, end), g[start:end], gscale, k, True, states[0].scales[s], scale1, ZERO, x0, x1, b2[:size]
            )
            states[0].scales[s] = peak0
            inv1 = ZERO
            if ns > 1:
                states[1].scales[s] = peak1
                inv1 = reciprocal(peak1)
            encode(states, ns, start, end, x0, x1, reciprocal(peak0), inv1, q[:size], q[HALF_BLOCK : HALF_BLOCK + size], path)
    return count


@njit(**KERNEL)
def four_bit_trust_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, k, skip, path, sums):
    """Task ``t``'s blocks of the trust pass with 4-bit states (``tasks.trust_task``): sums[b] =
    the sums of squares of block b's two trust terms. Nothing else is written."""
    ns = state_count(rule)
    k = unpack(k)
    p, g = unowned((p, g))
    a, x0, x1, _, states = _scratch(s0, s1, s2)
    bterm = stack_array(np.float32, BLOCK)
    n = weight_count(p)
    first, last = task_blocks(t, ntasks, (n + BLOCK - 1) // BLOCK)
    for block in range(first, last):
        lo, hi = block * BLOCK, min(n, (block + 1) * BLOCK)
        size = hi - lo
        if ns > 1:  # LAMB: both moments (LARS needs no state)
            _decode_block(states, ns, lo, hi, x0[:size], x1[:size], path)
            for j in range(size):
                scale = (lo + j) // HALF_BLOCK
                x0[j] = x0[j] * states[0].scales[scale]
                x1[j] = x1[j] * states[1].scales[scale]
        keep = not (skip and has_nonfinite(g[lo:hi]))
        trust_terms_block(rule, window(p, lo, hi), g[lo:hi], gscale, x0[:size], x1[:size], k, keep, a[:size], bterm[:size])
        sums[block, 0] = sum_squares(a[:size])
        sums[block, 1] = sum_squares(bterm[:size])
    return 0

