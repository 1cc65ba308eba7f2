"""The task kernels: each runs a task's blocks (a contiguous run of 256-blocks) of one step.

Per block, a task dequantizes the states (``code[q] * absmax``), applies the rule's math in
float32 in exactly the reference's order of operations, writes the parameter back, takes the
block's new absmax and requantizes (``quantize``). The parameter comes as a view of its weight
format (``weights``): with a master, its fp32 master is what the rule reads and writes. The only temporaries are four 256-float
buffers on the task's stack, so a step reads and writes each byte of parameter, gradient and
state once. ``launch`` runs the tasks on the calling thread and worker threads (``batch``
runs them on many tensors in one call). The same tasks serve every rule: the rule and the
path are marker arguments, compiled in; the layout and pass are plain ints (``Layout``,
``Pass``), told apart at run time as one compiled kernel does both passes of a one-scale step.

Written for LLVM's vectorizer: loops index from 0 over views (indices provably non-negative),
branches that do not change within a block sit outside its loops, and peaks are integer maxima
of the magnitudes' bit patterns, which order non-negative floats exactly as their values and
put NaN above inf (so NaN sticks, as in torch.amax).
"""

from __future__ import annotations

import enum

import numpy as np
from numba import njit, types
from numba.extending import overload

from ..types import BLOCK
from .bits import INF_BITS, ZERO, float_of, load, magnitude, prefetch, stack_array, unowned
from .jit import INLINE, KERNEL
from .layout import Layout
from .paths import PortablePath, is_path
from .quantize import block_peak, dequantize, reciprocal, requantize, state_view
from .rules import math, signed_states, state_count, trust_term, unpack
from .weights import load_weight, prefetch_weights, store_weight, weight_count, window

__all__ = [
    "AHEAD", "Pass", "eight_bit_task", "fp32_task", "has_nonfinite", "sum_squares", "task_blocks", "trust_task", "trust_terms_block",
    "update_elements",
]  # fmt: skip


class Pass(enum.IntEnum):
    """Which pass of a step an 8-bit task does (given as an int: Numba types an IntEnum
    argument in Python, ~8 us per task call)."""

    STEP = 0  # the update, everything written
    PEAKS = 1  # the first pass of a one-scale (Layout.WHOLE) step: the new states' peaks only, into ``peaks[t]``


# Blocks ahead whose memory a task asks for while it works on one: the hardware prefetchers
# alone leave a step waiting on memory for ~10% of its time (16.7M elements, one thread).
AHEAD = 4
# a task's stack scratch: four block buffers (the states', or the trust pass's terms and states)
_SCRATCH = 4 * BLOCK


def _prefetch_block(rule, p, g, states, lo, path):
    """Ask for the parameter, gradient and 8-bit codes of the block at ``lo`` (vector paths)."""


@overload(_prefetch_block, jit_options=dict(forceinline=True))
def _prefetch_block_impl(rule, p, g, states, lo, path):
    if is_path(path, PortablePath):
        return lambda rule, p, g, states, lo, path: None

    def ask(rule, p, g, states, lo, path):
        ns = state_count(rule)
        prefetch_weights(p, lo, lo + BLOCK)
        prefetch(g, lo, lo + BLOCK)
        prefetch(states[0].codes, lo, lo + BLOCK)
        if ns > 1:
            prefetch(states[1].codes, lo, lo + BLOCK)
        if ns > 2:
            prefetch(states[2].codes, lo, lo + BLOCK)

    return ask


@njit(**KERNEL)
def _peak(acc, x):
    """max(acc, |x|), NaN sticking as in torch.amax."""
    a = abs(x)
    return a if (a > acc or a != a) else acc


@njit(**INLINE)
def has_nonfinite(g):
    peak = np.uint32(0)
    for j in range(g.size):
        peak = max(peak, magnitude(load(g, j)))
    return peak >= INF_BITS  # the largest magnitude is inf or NaN


@njit(**KERNEL)
def task_blocks(t, ntasks, nblocks):
    per = (nblocks + ntasks - 1) // ntasks
    return t * per, min(nblocks, (t + 1) * per)


@njit(inline="always", **KERNEL)
def _scratch(s0, s1, s2):
    """A task's scratch, in its own stack frame (inlined into it): four block buffers; and
    its states, the caller's arrays without their owners (``unowned``), 8-bit ones as
    ``Quantized`` (``state_view``)."""
    buffers = stack_array(np.float32, _SCRATCH)
    s0, s1, s2 = unowned((s0, s1, s2))
    states = (state_view(s0), state_view(s1), state_view(s2))
    return buffers[:BLOCK], buffers[BLOCK : 2 * BLOCK], buffers[2 * BLOCK : 3 * BLOCK], buffers[3 * BLOCK : 4 * BLOCK], states


@njit(**INLINE)
def update_elements(rule, pw, g, gscale, k, write_p, scale0, scale1, scale2, b0, b1, b2):
    """The rule on each element of a block (``_block_update``): the new states into the
    buffers, the new parameter into ``pw`` if ``write_p``; returns the states' new peaks."""
    ns = state_count(rule)
    peak0 = np.uint32(0)
    peak1 = np.uint32(0)
    peak2 = np.uint32(0)
    for j in range(b0.size):
        s1 = b1[j] * scale1 if ns > 1 else ZERO
        s2 = b2[j] * scale2 if ns > 2 else ZERO
        pf, x0, x1, x2 = math(rule, load_weight(pw, j), load(g, j) * gscale, b0[j] * scale0, s1, s2, k)
        if write_p:
            store_weight(pw, j, pf)
        b0[j] = x0
        peak0 = max(peak0, magnitude(x0))
        if ns > 1:
            b1[j] = x1
            peak1 = max(peak1, magnitude(x1))
        if ns > 2:
            b2[j] = x2
            peak2 = max(peak2, magnitude(x2))
    return float_of(peak0), float_of(peak1), float_of(peak2)


@njit(**INLINE)
def _block_update(rule, p, g, states, lo, hi, s, gscale, k, keep, write_p, path, b0, b1, b2):
    """New states of block [lo, hi) into the buffers (the old ones if ``keep``), the new
    parameter into ``p`` (unless ``keep``, or not ``write_p``); returns the new peaks of the
    (up to 3) states. States past the rule's count (stand-ins) are neither read nor written."""
    ns = state_count(rule)
    pw = window(p, lo, hi)
    g = g[lo:hi]
    scale0 = dequantize(states[0], lo, hi, s, b0, path)
    scale1 = dequantize(states[1], lo, hi, s, b1, path) if ns > 1 else ZERO
    scale2 = dequantize(states[2], lo, hi, s, b2, path) if ns > 2 else ZERO
    if keep:
        for j in range(hi - lo):
            b0[j] = b0[j] * scale0
            if ns > 1:
                b1[j] = b1[j] * scale1
            if ns > 2:
                b2[j] = b2[j] * scale2
        return block_peak(b0), block_peak(b1), block_peak(b2)
    # two copies of the loop, each with write_p a constant (inlined): a store under a flag that
    # LLVM does not hoist becomes a masked one, and a masked 8-byte store of int8 corrections
    # blocks the next iteration's load from forwarding (~1.6x the step of a 24-bit master)
    if write_p:
        return update_elements(rule, pw, g, gscale, k, True, scale0, scale1, scale2, b0, b1, b2)
    return update_elements(rule, pw, g, gscale, k, False, scale0, scale1, scale2, b0, b1, b2)


@njit(**INLINE)
def _fp32_block(rule, p, g, states, lo, hi, gscale, k):
    ns = state_count(rule)
    pw = window(p, lo, hi)
    g = g[lo:hi]
    a0 = states[0][lo:hi]
    a1 = states[1][lo:hi]
    a2 = states[2][lo:hi]
    for j in range(hi - lo):
        pf, x0, x1, x2 = math(rule, load_weight(pw, j), load(g, j) * gscale, a0[j], a1[j], a2[j], k)
        store_weight(pw, j, pf)
        a0[j] = x0
        if ns > 1:
            a1[j] = x1
        if ns > 2:
            a2[j] = x2


# ---- the trust pass (LAMB, LARS) ------------------------------------------------------------


def _state_values(state, lo, hi, block, buf, path):
    """buf = the fp32 values of a state's elements [lo, hi), of block ``block``."""


@overload(_state_values)
def _state_values_impl(state, lo, hi, block, buf, path):
    if isinstance(state, types.Array):

        def fp32(state, lo, hi, block, buf, path):
            for j in range(buf.size):
                buf[j] = state[lo + j]

        return fp32

    def eight_bit(state, lo, hi, block, buf, path):  # a Quantized: one scale per block, or one in all
        scale = dequantize(state, lo, hi, block if state.scales.size > 1 else 0, buf, path)
        for j in range(buf.size):
            buf[j] = buf[j] * scale

    return eight_bit


@njit(**KERNEL)
def trust_terms_block(rule, p, g, gscale, x0, x1, k, keep, a, b):
    """a, b = the rule's trust terms of a block (reference.TRUST_RATIOS): (param, direction)
    for LAMB, (param, gradient) for LARS; a skipped block (not ``keep``) counts as the
    reference counts it, param * 0 and 0."""
    for j in range(weight_count(p)):
        pj, gj = load_weight(p, j), load(g, j) * gscale
        a[j] = pj if keep else pj * ZERO
        b[j] = trust_term(rule, pj, gj, x0[j], x1[j], k) if keep else ZERO


@njit(fastmath={"reassoc"}, **KERNEL)
def sum_squares(x):
    """Σ x² in float64 (each square exact), summed in the order LLVM vectorizes to (reassoc):
    fixed by the code, not by the data or the thread count."""
    total = 0.0
    for j in range(x.size):
        v = np.float64(x[j])
        total += v * v
    return total


@njit(**KERNEL)
def trust_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, k, skip, path, sums):
    """Task ``t``'s blocks of the trust pass: sums[b] = the sums of squares of block b's two
    trust terms. Nothing else is written."""
    ns = state_count(rule)
    k = unpack(k)
    p, g = unowned((p, g))
    a, b, x0, x1, states = _scratch(s0, s1, s2)
    first, last = task_blocks(t, ntasks, (weight_count(p) + BLOCK - 1) // BLOCK)
    for block in range(first, last):
        lo, hi = block * BLOCK, min(weight_count(p), (block + 1) * BLOCK)
        size = hi - lo
        if ns > 1:  # LAMB: both moments (LARS needs no state)
            _state_values(states[0], lo, hi, block, x0[:size], path)
            _state_values(states[1], lo, hi, block, x1[:size], path)
        keep = not (skip and has_nonfinite(g[lo:hi]))
        trust_terms_block(rule, window(p, lo, hi), g[lo:hi], gscale, x0[:size], x1[:size], k, keep, a[:size], b[:size])
        sums[block, 0] = sum_squares(a[:size])
        sums[block, 1] = sum_squares(b[:size])
    return 0


# ---- the step's tasks -------------------------------------------------------------------------


@njit(**KERNEL)
def fp32_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, k, skip):
    """Blocks of task ``t`` with fp32 states; returns how many were skipped."""
    k = unpack(k)
    p, g = unowned((p, g))
    states = unowned((s0, s1, s2))
    first, last = task_blocks(t, ntasks, (weight_count(p) + BLOCK - 1) // BLOCK)
    count = 0
    for b in range(first, last):
        lo, hi = b * BLOCK, min(weight_count(p), (b + 1) * BLOCK)
        if skip and has_nonfinite(g[lo:hi]):
            count += 1
            continue
        _fp32_block(rule, p, g, states, lo, hi, gscale, k)
    return count


@njit(**KERNEL)
def eight_bit_task(t, ntasks, rule, p, g, s0, s1, s2, gscale, k, skip, layout, pass_, inverse, path, peaks):
    """Blocks of task ``t`` with 8-bit states; returns how many were skipped. ``Layout.BLOCK``:
    each block takes its own new scale, and a skipped block keeps everything.
    ``Layout.WHOLE``: the new scales' reciprocals are given (``inverse``), and a skipped block
    keeps its parameter and old state values but is requantized with the new scale, as in the
    reference. ``Pass.PEAKS`` (first pass of a ``WHOLE`` step): only the peaks of the task's
    new states, into ``peaks[t]``; nothing else is written."""
    ns = state_count(rule)
    signed = signed_states(rule)
    k = unpack(k)
    whole = layout == Layout.WHOLE
    measure = pass_ == Pass.PEAKS
    p, g = unowned((p, g))
    b0, b1, b2, _, states = _scratch(s0, s1, s2)
    first, last = task_blocks(t, ntasks, (weight_count(p) + BLOCK - 1) // BLOCK)
    count = 0
    acc0 = ZERO
    acc1 = ZERO
    acc2 = ZERO
    for b in range(first, last):
        lo, hi = b * BLOCK, min(weight_count(p), (b + 1) * BLOCK)
        if b + AHEAD < last:
            _prefetch_block(rule, p, g, states, lo + AHEAD * BLOCK, path)
        bad = skip and has_nonfinite(g[lo:hi])
        count += bad
        if bad and not whole:
            continue
        s = 0 if whole else b
        size = hi - lo
        peak0, peak1, peak2 = _block_update(rule, p, g, states, lo, hi, s, gscale, k, bad, not measure, path, b0[:size], b1[:size], b2[:size])
        if measure:
            acc0 = _peak(acc0, peak0)
            acc1 = _peak(acc1, peak1)
            acc2 = _peak(acc2, peak2)
            continue
        if whole:
            inv0, inv1, inv2 = inverse
        else:
            states[0].scales[b] = peak0
            inv0 = reciprocal(peak0)
            inv1 = inv2 = ZERO
            if ns > 1:
                states[1].scales[b] = peak1
                inv1 = reciprocal(peak1)
            if ns > 2:
                states[2].scales[b] = peak2
                inv2 = reciprocal(peak2)
        requantize(states[0], b0[:size], peak0, inv0, lo, hi, signed[0], path)
        if ns > 1:
            requantize(states[1], b1[:size], peak1, inv1, lo, hi, signed[1], path)
        if ns > 2:
            requantize(states[2], b2[:size], peak2, inv2, lo, hi, signed[2], path)
    if measure:
        peaks[t, 0] = acc0
        peaks[t, 1] = acc1
        peaks[t, 2] = acc2
    return count
