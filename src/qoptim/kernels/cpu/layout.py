"""Which parameters and states the kernels take, and how they see their memory.

The kernels cover a rule's states all fp32, all 8-bit in 256-blocks, all 8-bit with one
scale per tensor (maps of 256 sorted float32 codes), or all 4-bit in 128-blocks sharing one
byte per element (maps of 16, ``nibbles``), of a flat contiguous CPU parameter (fp32, bf16 or
fp16); ``plan`` says which of these a parameter's states are, or None (then
the reference backend takes the step). States in blocks (8-bit in 256-blocks, 4-bit) may carry
a draw (rounded stochastically; an 8-bit map with floor tables: ``tables``); a draw on fp32
states or on one-scale 8-bit ones is the reference's to refuse (``reference.check_draws``), so
the kernels leave those to it. numpy has no bf16: the kernels see 16-bit parameters
as 16-bit integers, told apart by signedness (bf16 int16, fp16 uint16).

What ``plan`` and ``kernel_states`` make of a parameter's states is kept from one step to the
next (``_kept``): the optimizers hand the same state tensors every step, and remaking their
layout, numpy views and map tables costs ~20 us per parameter, as much as the update of a
small tensor (gradient release updates each parameter in a call of its own).
"""

from __future__ import annotations

import enum
import functools
import weakref
from typing import NamedTuple

import numpy as np
import torch

from ..rules import RULES
from ...quant.master import Draw
from ..types import BLOCK, WHOLE_TENSOR, StateSlot, WeightFormat
from . import paths
from .nibbles import HALF_BLOCK, NO_DRAW, nibble_tables_of
from .rules import KERNEL_STATES
from .tables import PLANES, QuantTables, stochastic_tables_of, tables_of

__all__ = ["Layout", "as_numpy", "draw_args", "flat_cpu", "kernel_kind", "kernel_stochastic", "kernel_state", "kernel_states", "kernel_tables", "kept_count", "padded", "plan", "weight_view", "weights_fit"]


class Layout(enum.IntEnum):
    """How a parameter's states are kept (the 8-bit kernels take it as an int: Numba types an
    IntEnum argument in Python, ~8 us per task call)."""

    FP32 = 0  # float32 values
    BLOCK = 1  # 8-bit codes, a scale per 256-block
    WHOLE = 2  # 8-bit codes, one scale per tensor
    FOUR_BIT = 3  # 4-bit codes, two states to a byte (shifts 0 and 4), a scale per 128 elements


def kernel_kind(layout: Layout, slots: list[StateSlot], *, reads_only: bool = False) -> str:
    """Which kind of kernel (``paths.KINDS``, each with its own measured path) steps states laid out
    as ``layout``: 4-bit, 8-bit with a draw (stochastic rounding), or else 8-bit. ``reads_only``: a
    pass that writes no codes (the trust pass), where a draw changes nothing: plain 8-bit."""
    if layout == Layout.FOUR_BIT:
        return paths.FOUR_BIT
    drawing = not reads_only and any(slot.draw is not None for slot in slots)
    return paths.EIGHT_BIT_DRAWN if drawing else paths.EIGHT_BIT


# How the kernels see a parameter's memory: bf16 and fp16 both as 16-bit integers, told apart by signedness.
_VIEWS = {torch.float32: (torch.float32, np.float32), torch.bfloat16: (torch.int16, np.int16), torch.float16: (torch.int16, np.uint16)}


def plan(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> Layout | None:
    """The layout of ``rule``'s states on ``p`` where the kernels cover it, else None: a rule of
    kernels.rules.RULES with all its states fp32, all 8-bit in 256-blocks, all 8-bit with one
    scale, or all 4-bit in one shared byte array, on a flat contiguous non-empty CPU parameter."""
    spec = RULES.get(rule)
    if spec is None or len(slots) != spec.states or not p.is_cpu or p.dtype not in _VIEWS:
        return None
    if p.dim() != 1 or not p.is_contiguous() or p.numel() == 0:
        return None
    return _kept(p.numel(), slots).layout


class _Kept(NamedTuple):
    """What was made of one parameter's states, while they are what ``stamp`` says."""

    first: weakref.ref  # the first state's values tensor, whose id keys the entry (ids are reused once a tensor is gone)
    stamp: tuple  # ``_stamp`` of the states it was made of
    maps: tuple  # a weak reference to each state's map (the entry keeps tables made of them, not their memory)
    layout: Layout | None  # ``_layout``
    views: list  # each state as the kernels take it, its draw aside (``_state_view``): made on first need


# id(the first state's values) -> _Kept. An entry holds numpy views of the states' memory (which
# keep that memory), never the tensors of the slots: it goes when the first values tensor is freed.
_KEPT: dict[int, _Kept] = {}


def _kept(n: int, slots: list[StateSlot]) -> _Kept:
    """The kept entry of these states on a parameter of ``n`` elements, made anew where anything
    it was made of has changed: a state's tensors (by identity, address and size), a map's
    contents (its version), a block size, a shift, whether a state draws."""
    if not slots:
        return _Kept(None, (), (), _layout(n, slots), [])
    first, stamp = slots[0].values, _stamp(n, slots)
    kept = _KEPT.get(id(first))
    if kept is not None and kept.stamp == stamp and kept.first() is first and all(m() is s.code for m, s in zip(kept.maps, slots)):
        return kept
    maps = tuple(_NO_MAP if s.code is None else weakref.ref(s.code) for s in slots)
    kept = _Kept(weakref.ref(first, functools.partial(_forget, id(first))), stamp, maps, _layout(n, slots), [])
    _KEPT[id(first)] = kept
    return kept


def _NO_MAP() -> None:
    """A state without a map, as its weak reference would answer."""


def _stamp(n: int, slots: list[StateSlot]) -> tuple:
    return n, *[(id(s.values), s.values.data_ptr(), s.values.numel(), s.values.is_contiguous(), id(s.absmax),
                 None if s.absmax is None else (s.absmax.data_ptr(), s.absmax.numel()), id(s.code),
                 None if s.code is None else (s.code.data_ptr(), s.code._version), s.blocksize, s.shift, s.draw is None) for s in slots]  # fmt: skip


def kept_count() -> int:
    """How many parameters' states are kept (for tests: an entry goes with its states)."""
    return len(_KEPT)


def _forget(key: int, ref: weakref.ref) -> None:
    """A kept entry's first values tensor was freed: the entry goes (unless already replaced)."""
    kept = _KEPT.get(key)
    if kept is not None and kept.first is ref:
        del _KEPT[key]


def _layout(n: int, slots: list[StateSlot]) -> Layout | None:
    """The states' layout where they share one the kernels cover: flat contiguous CPU tensors;
    8-bit ones with the scales of their block size and a map of 256 float32 codes on the CPU
    that has tables (``tables_of``: a sorted one)."""
    if any(s.quantized and s.bits == 4 for s in slots):
        return Layout.FOUR_BIT if _four_bit(n, slots) else None
    layout = _eight_bit_or_fp32(n, slots)
    drawn = [s for s in slots if s.draw is not None]
    if drawn and (layout != Layout.BLOCK or any(stochastic_tables_of(s.code) is None for s in drawn)):
        return None  # (block-wise codes only, of a map with floor tables: the others are the reference's)
    return layout


def _eight_bit_or_fp32(n: int, slots: list[StateSlot]) -> Layout | None:
    """``_layout`` of states none of which is 4-bit, their draws aside."""
    if not any(s.quantized for s in slots):
        return Layout.FP32 if all(flat_cpu(s.values, torch.float32, n) for s in slots) else None
    blocksize = slots[0].blocksize
    if blocksize not in (BLOCK, WHOLE_TENSOR):
        return None
    scales = -(-n // BLOCK) if blocksize == BLOCK else 1
    for s in slots:
        if not (s.quantized and s.blocksize == blocksize and flat_cpu(s.values, torch.uint8, n) and flat_cpu(s.absmax, torch.float32, scales)):
            return None
        code = s.code
        if code is None or not (code.is_cpu and code.dtype == torch.float32 and code.dim() == 1 and code.numel() == 256):
            return None
        if tables_of(code) is None:  # (an unsorted map)
            return None
    return Layout.BLOCK if blocksize == BLOCK else Layout.WHOLE


def _four_bit(n: int, slots: list[StateSlot]) -> bool:
    """Whether the states are all 4-bit as the optimizers keep them (``optim.state``): one flat
    byte array shared by all, each state's 4 bits of its own (shift 0 or 4), a scale per 128
    elements, a sorted map of 16 float32 codes on the CPU."""
    shared = slots[0].values
    if len(slots) > 2 or len({s.shift for s in slots}) != len(slots) or not flat_cpu(shared, torch.uint8, n):
        return False
    for s in slots:
        if not (s.quantized and s.bits == 4 and s.blocksize == HALF_BLOCK and s.shift in (0, 4)):
            return False
        if s.values.data_ptr() != shared.data_ptr() or not flat_cpu(s.values, torch.uint8, n):
            return False
        if not flat_cpu(s.absmax, torch.float32, -(-n // HALF_BLOCK)):
            return False
        code = s.code
        if not (code.is_cpu and code.dtype == torch.float32 and code.dim() == 1) or nibble_tables_of(code) is None:
            return False
    return True


def flat_cpu(t: torch.Tensor | None, dtype: torch.dtype, n: int) -> bool:
    """Whether ``t`` is a contiguous CPU tensor of ``n`` elements of ``dtype``."""
    return t is not None and t.dtype == dtype and t.numel() == n and t.is_cpu and t.is_contiguous()


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A parameter-dtype tensor's memory as the kernels see it."""
    if t.dtype == torch.float32:
        return t.detach().numpy()
    view_dtype, np_dtype = _VIEWS[t.dtype]
    return t.detach().view(view_dtype).numpy().view(np_dtype)


def weights_fit(p: torch.Tensor, weights: WeightFormat) -> bool:
    """Whether the kernels take ``p``'s weight format (``reference.check_weights`` passed): a
    correction, where there is one, flat and contiguous on the CPU, as ``p`` is."""
    return weights.correction is None or p.dtype == torch.float32 or flat_cpu(weights.correction, weights.correction.dtype, p.numel())


def weight_view(p: torch.Tensor, weights: WeightFormat):
    """A parameter as the kernels take it (``weights``: the parameter views): (its memory,)
    (``as_numpy``); with a master, (its memory, the correction); rounded stochastically, (its
    memory, the draw's key, the index of its first element). An fp32 parameter is its own
    master, and rounds nothing: its draw is ignored."""
    memory = as_numpy(p)
    if p.dtype != torch.float32 and weights.correction is not None:
        return memory, weights.correction.detach().numpy()
    if p.dtype != torch.float32 and weights.draw is not None:
        return memory, *draw_args(weights.draw)
    return (memory,)


def kernel_states(n: int, slots: list[StateSlot], layout: Layout) -> tuple:
    """``kernel_state`` of each state on a parameter of ``n`` elements, ``padded``; all but the
    draws kept from the last step where the states are the same (``_kept``)."""
    kept = _kept(n, slots)
    if kept.layout != layout:  # (asked for another layout than plan's: nothing to keep)
        return padded(tuple(kernel_state(s, layout) for s in slots))
    if not kept.views:
        kept.views.extend(_state_view(s, layout) for s in slots)
    if layout == Layout.FP32:
        return padded(tuple(kept.views))
    return padded(tuple((*view, *draw_args(s.draw)) for view, s in zip(kept.views, slots)))


def kernel_state(slot: StateSlot, layout: Layout):
    """A state as the kernels take it: an fp32 state's values; an 8-bit state's codes, scales,
    its map's tables and its draw as plain tuples (``quantize.state_view``); a 4-bit state's
    bytes, scales, map tables, shift and draw (``nibbles.nibble_view``)."""
    view = _state_view(slot, layout)
    return view if layout == Layout.FP32 else (*view, *draw_args(slot.draw))


def _state_view(slot: StateSlot, layout: Layout):
    """``kernel_state`` but the draw."""
    if layout == Layout.FP32:
        return slot.values.detach().numpy()
    if layout == Layout.FOUR_BIT:
        tables = nibble_tables_of(slot.code)
        return slot.values.detach().numpy(), slot.absmax.detach().view(-1).numpy(), *tables, slot.shift
    tables = kernel_tables(tables_of(slot.code))
    return slot.values.detach().numpy(), slot.absmax.detach().view(-1).numpy(), tables, kernel_stochastic(slot.code, tables)


def draw_args(draw: Draw | None) -> tuple[np.int64, np.int64]:
    """A draw as the kernels take it: (its key, a uint32, the index of its first element); the
    key ``NO_DRAW`` where there is none (rounding to nearest)."""
    if draw is None:
        return NO_DRAW, np.int64(0)
    return np.int64(draw.key & 0xFFFFFFFF), np.int64(draw.first_index)


def kernel_tables(tables: QuantTables) -> tuple:
    """A map's tables as the kernels take them: a plain tuple (``quantize.state_view``)."""
    return tuple(tables)


def kernel_stochastic(code: torch.Tensor, tables: tuple) -> tuple:
    """A map's stochastic rounding tables as the kernels take them (plain tuples: ``quantize.state_view``).
    A map without them (``plan`` takes no draw on it) gets stand-ins of the same types, its
    nearest ``tables`` (``kernel_tables``) and zeros, which no step reads."""
    stochastic = stochastic_tables_of(code)
    if stochastic is None:
        return tables, _NO_STEPS, _NO_PLANES
    floors, steps, step_planes = stochastic
    return kernel_tables(floors), steps, step_planes


_NO_STEPS, _NO_PLANES = np.zeros(256, np.float32), np.zeros(PLANES, np.uint8)


def padded(states: tuple) -> tuple:
    """A rule's states, padded to ``KERNEL_STATES`` with stand-ins (the first state again)
    that the kernels never touch; the rule's marker tells how many are real."""
    return states + states[:1] * (KERNEL_STATES - len(states))
