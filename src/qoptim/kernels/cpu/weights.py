"""A parameter's weight formats inside the kernels (``types.WeightFormat``, ``quant.master``): the
parameter views the tasks read and write through.

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

The master's encoding and stochastic rounding, one element at a time, are ``codec``'s.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .bits import load, prefetch, store
from .codec import decode_bf16, decode_f16, encode_bf16, encode_f16, random_bits, stochastic_bf16, stochastic_f16
from .jit import KERNEL

__all__ = ["load_weight", "prefetch_weights", "store_weight", "weight_count", "window"]


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
                p[0][j] = stochastic_bf16(x, random_bits(p[1], p[2], j))

            return stochastic_to_bf16

        def stochastic_to_f16(p, j, x):
            p[0][j] = np.uint16(stochastic_f16(x, random_bits(p[1], p[2], j)))

        return stochastic_to_f16
    if bf16:

        def master_bf16(p, j, x):
            w, c = encode_bf16(x, p[1][j])
            p[0][j] = w
            p[1][j] = c

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
