"""The live per-parameter state: bitsandbytes' key names, the shapes of the state tensors, their
allocation, and the kernels' views of them (``StateSlot``), kept from step to step.

A parameter's state is a dict, as bitsandbytes keeps it (and as its checkpoints hold it):

* ``step``: the number of updates so far;
* per state ``i`` (1 or 2): ``state{i}``, float32 values or uint8 codes; for codes ``qmap{i}`` (the
  256 code values) and their scale: ``absmax{i}`` (one float32 per 256-block), or ``max{i}`` and
  ``new_max{i}`` (one per tensor, ``block_wise=False``);
* 4-bit states (``optim_bits=4``, ``quant.formats``; Adam and AdamW): ``state1`` is a uint8 tensor
  of the parameter's shape that holds both moments, the first's code in the low 4 bits of each
  byte and the second's in the high 4 (so that the codes shard, gather and reshard element by
  element, like the parameter); ``qmap1`` and ``qmap2`` are their 16-code maps, ``absmax1`` and
  ``absmax2`` one float32 scale per 128 elements; there is no ``state2``;
* ``gnorm_vec``: the last 100 squared gradient norms (percentile clipping);
* ``unorm_vec``: the update norm of the layer-wise rules (LAMB, LARS), kept because bitsandbytes'
  step needs it; qoptim's kernels do not report it, so it stays 0;
* qoptim's own, for bf16 / fp16 parameters (``weights``): ``master_correction``, int8 or int16 of
  the parameter's shape, which with the weight holds its fp32 master (``master_weight_bits``), and
  ``rounding_seed``, the int that keys its stochastic rounding (``weight_rounding``); the seed also
  keys the stochastic rounding of never-negative states (``state_rounding``: the 4-bit format's
  own, an 8-bit option), of any parameter.

An update rule (``qoptim.kernels.rules``) keeps one slot per running average. bitsandbytes has two
state keys: a rule with more slots stacks its first ones as rows of ``state1`` (AdEMAMix: the fast
and the slow momentum in ``state1``, shape ``(2, *p.shape)``; the second moment in ``state2``).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, NamedTuple, Protocol

import torch

from ..kernels import BLOCK, WHOLE_TENSOR, StateSlot
from ..kernels.rules import RuleSpec
from ..quant.formats import FORMATS, STOCHASTIC_ROUNDING, StateFormat, format_of
from . import dtensor

__all__ = [
    "BUFFER_KEYS", "CODE_SHIFTS", "GNORM_VEC", "KEYS", "MASTER_CORRECTION", "QMAP_KEYS", "ROUNDING_SEED", "SIGNED_MAP", "STEP", "TENSOR_KEYS",
    "UNORM_VEC", "UNSIGNED_MAP", "VALUE_KEYS",
    "Buffers", "KeptState", "MapCopies", "SlotCache", "StateKeys", "format_of_state", "layout_of", "new_state",
    "rounds_stochastically", "shared_bytes", "slot", "slots", "with_draw",
]  # fmt: skip


class StateKeys(NamedTuple):
    """The key names of one state (``state1`` or ``state2``) and of its map and scales."""

    values: str  # float32 values, or uint8 codes
    qmap: str  # the 256 code values (codes only)
    absmax: str  # one scale per 256-block (block-wise codes)
    max: str  # one scale per tensor (block_wise=False): the one in use
    new_max: str  # ... and the previous one, as bitsandbytes keeps it


def _keys(i: int) -> StateKeys:
    return StateKeys(f"state{i}", f"qmap{i}", f"absmax{i}", f"max{i}", f"new_max{i}")


KEYS = (_keys(1), _keys(2))  # bitsandbytes keeps at most two states per parameter
STEP = "step"
GNORM_VEC = "gnorm_vec"  # the percentile clipping history, 100 squared gradient norms
UNORM_VEC = "unorm_vec"  # LAMB/LARS: the update norm bitsandbytes' step keeps
# the tensors that are neither cast to the parameter's dtype on loading (bitsandbytes'
# ``non_castable_tensor_keys``) nor gathered by FSDP1 as parameter-shaped
TENSOR_KEYS = frozenset({key for keys in KEYS for key in keys} | {GNORM_VEC, UNORM_VEC})
VALUE_KEYS = frozenset(keys.values for keys in KEYS)
MASTER_CORRECTION = "master_correction"  # a 16-bit parameter's master correction (``weights``)
ROUNDING_SEED = "rounding_seed"  # the seed of a parameter's stochastic rounding (``weights``)
# the state tensors shaped like their parameter that live in the optimizer's buffers (paged when it is)
BUFFER_KEYS = VALUE_KEYS | {MASTER_CORRECTION}
QMAP_KEYS = frozenset(keys.qmap for keys in KEYS)
CODE_SHIFTS = (0, 4)  # 4-bit states: the bit of state1's bytes where each state's code starts (the module doc)

# names of the optimizer's 8-bit maps (``name2qmap``, as bitsandbytes calls them; ``quant.formats``)
SIGNED_MAP, UNSIGNED_MAP = FORMATS[8].signed_map, FORMATS[8].unsigned_map


class KeptState(NamedTuple):
    """One state key of a parameter, as an optimizer keeps it."""

    keys: StateKeys
    rows: int  # 1, or the number of a rule's slots stacked in it (AdEMAMix's state1: 2)
    signed: bool  # its map: signed, or unsigned for values that are never negative

    @property
    def map_name(self) -> str:
        return SIGNED_MAP if self.signed else UNSIGNED_MAP

    def shape(self, p: torch.Tensor) -> torch.Size:
        return p.shape if self.rows == 1 else torch.Size([self.rows, *p.shape])

    def absmax_shape(self, p: torch.Tensor, blocksize: int = BLOCK) -> torch.Size:
        """The shape of its block scales (a sharded parameter's: see ``dtensor``)."""
        if dtensor.is_dtensor(p):
            blocks = dtensor.absmax_shape(p, blocksize=blocksize)
        else:
            blocks = torch.Size([math.ceil(p.numel() / blocksize)])
        return blocks if self.rows == 1 else torch.Size([self.rows, *blocks])


def format_of_state(state: dict[str, Any]) -> StateFormat | None:
    """The format of a parameter's quantized states (``quant.formats``), None for float32 states."""
    qmap = state.get(KEYS[0].qmap)
    return format_of(qmap) if isinstance(qmap, torch.Tensor) else None


def shared_bytes(state: dict[str, Any]) -> bool:
    """Whether a parameter's states are 4-bit codes sharing ``state1``'s bytes (the module doc)."""
    fmt = format_of_state(state)
    return fmt is not None and fmt.bits == 4


def layout_of(spec: RuleSpec) -> tuple[KeptState, ...]:
    """The state keys that keep a rule's slots (see the module doc); the slots stacked in one
    key share its map, so they must agree on their sign."""
    n = min(spec.states, len(KEYS))
    rows = [spec.states - n + 1] + [1] * (n - 1)
    layout, start = [], 0
    for keys, count in zip(KEYS, rows):
        signs = set(spec.signed[start : start + count])
        if len(signs) != 1:
            raise ValueError(f"slots {start}..{start + count - 1} are stacked in {keys.values} but differ in sign")
        layout.append(KeptState(keys, count, signs.pop()))
        start += count
    return tuple(layout)


# ---- allocation -----------------------------------------------------------------------------


class Buffers(Protocol):
    """Where a new state's tensors come from (the optimizer: paged or not, sharded like its parameter)."""

    def state_buffer(self, p: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor: ...

    def absmax_buffer(self, p: torch.Tensor, shape) -> torch.Tensor: ...

    def qmap_on(self, name: str, device: torch.device) -> torch.Tensor: ...


def new_state(p: torch.Tensor, config: dict[str, Any], layout, buffers: Buffers, *, layer_wise: bool) -> dict[str, Any]:
    """A parameter's first state: zeros, quantized in the format of ``config``'s ``optim_bits``
    (``quant.formats``) when ``p`` is large enough. Built apart and returned whole: an allocation
    that fails leaves no half state behind."""
    fmt = FORMATS.get(config["optim_bits"]) if p.numel() >= config["min_8bit_size"] else None
    state: dict[str, Any] = {STEP: 0}
    for i, kept in enumerate(layout):
        if fmt is None:
            state[kept.keys.values] = buffers.state_buffer(p, torch.float32, kept.shape(p))
            continue
        if fmt.bits == 8 or i == 0:  # (4-bit: the states share state1's bytes)
            state[kept.keys.values] = buffers.state_buffer(p, torch.uint8, kept.shape(p))
        state[kept.keys.qmap] = buffers.qmap_on(fmt.map_name(kept.signed), p.device)
    if fmt is not None:
        for kept in layout:
            if config["block_wise"]:
                state[kept.keys.absmax] = buffers.absmax_buffer(p, kept.absmax_shape(p, fmt.blocksize))
            else:
                for key in (kept.keys.max, kept.keys.new_max):
                    state[key] = torch.zeros(1, dtype=torch.float32, device=p.device)
    if config["percentile_clipping"] < 100:
        state[GNORM_VEC] = torch.zeros(100, dtype=torch.float32, device=p.device)
    if layer_wise and config["max_unorm"] > 0:
        state[UNORM_VEC] = torch.zeros(1, dtype=torch.float32, device=p.device)
    return state


class MapCopies:
    """One copy per device of each of the optimizer's maps, shared by every parameter there (so
    that backends batching parameters see one map, and its tables are built once)."""

    def __init__(self) -> None:
        self._copies: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # -> (source, copy)

    def on(self, name: str, source: torch.Tensor, device: torch.device) -> torch.Tensor:
        if source.device == device:
            return source
        source_then, copy = self._copies.get((name, device), (None, None))
        if source_then is not source:  # first use, or the optimizer's map was replaced
            copy = source.to(device)
            self._copies[(name, device)] = (source, copy)
        return copy


# ---- the kernels' views ---------------------------------------------------------------------


def slot(state: dict[str, Any], keys: StateKeys, row: int | None = None, *, shift: int = 0) -> StateSlot:
    """One state as a flat slot; ``row`` picks one row of a stacked state (AdEMAMix's state1);
    4-bit codes are those of ``state1``'s bytes from bit ``shift`` up. State tensors are
    contiguous (as created, and as loaded): the flat views alias them."""
    values = dtensor.local(state[KEYS[0].values if shift else keys.values]).detach()  # (an alias: see SlotCache)
    values = (values if row is None else values[row]).view(-1)
    if values.dtype != torch.uint8:
        return StateSlot(values)
    absmax, qmap = state.get(keys.absmax), state[keys.qmap]
    if absmax is not None:
        blocksize = format_of(qmap).blocksize
        absmax = absmax.detach() if row is None else absmax.detach()[row]
        if dtensor.is_dtensor(absmax) or absmax.dim() != 1:  # a shard's blocks within the padded global layout
            absmax = dtensor.blocks_of(absmax, values.numel(), blocksize=blocksize)
        return StateSlot(values, qmap, absmax, blocksize, shift)
    state[keys.new_max].copy_(state[keys.max])  # the previous scale, as bitsandbytes keeps it
    return StateSlot(values, qmap, state[keys.max], WHOLE_TENSOR)


def slots(state: dict[str, Any], layout) -> list[StateSlot]:
    """The kernels' view of a parameter's states: one slot per slot of the rule, in its order."""
    if shared_bytes(state):  # 4-bit: the second state's codes are the high half of state1's bytes
        return [slot(state, kept.keys, shift=shift) for kept, shift in zip(layout, CODE_SHIFTS)]
    return [slot(state, kept.keys, None if kept.rows == 1 else row) for kept in layout for row in range(kept.rows)]


def rounds_stochastically(state: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether a parameter's never-negative states round stochastically: they are quantized, and
    ``config["state_rounding"]`` says so, or leaves it to their format (``quant.formats``)."""
    fmt = format_of_state(state)
    return fmt is not None and (config.get("state_rounding") or fmt.unsigned_rounding) == STOCHASTIC_ROUNDING


def with_draw(slots: list[StateSlot], layout, state: dict[str, Any], config: dict[str, Any], draw) -> list[StateSlot]:
    """A step's slots: those of never-negative states, where they round stochastically
    (``rounds_stochastically``), with the step's ``draw``; the others as they are."""
    if draw is None or not rounds_stochastically(state, config):
        return slots
    signs = [kept.signed for kept in layout for _ in range(1 if shared_bytes(state) else kept.rows)]
    return [s if signed else dataclasses.replace(s, draw=draw) for s, signed in zip(slots, signs)]


# The state entries a parameter's slots are views of.
_VIEWED = tuple(getattr(keys, field) for field in ("values", "absmax", "qmap") for keys in KEYS)


class _Entry(NamedTuple):
    stamp: tuple  # (id, address) of each state tensor the slots view
    param: weakref.ref  # the parameter (its id may be reused once it is gone)
    slots: list[StateSlot]
    token: object  # this entry, to its finalizers


class _Entries(dict):
    """id(param) -> _Entry: a dict subclass, so that finalizers can hold it weakly and keep
    neither it nor its slots alive."""


def _drop_entry(entries_ref: weakref.ref, key: int, token: object) -> None:
    """A state tensor behind an entry was freed: forget the entry (unless already replaced)."""
    entries = entries_ref()
    if entries is not None and key in entries and entries[key].token is token:
        del entries[key]


class SlotCache:
    """Each parameter's slots, kept from the last step while its state holds the same tensors at
    the same addresses: building the flat views costs ~4 us per parameter and step, as much as the
    update of a small tensor. One-scale states are built anew (their slots copy the previous scale
    on each build).

    Kept slots must not keep a dropped state's memory: they view detached aliases (``slot``),
    which hold the storage but not the state tensors, and an entry goes as soon as one of its
    state tensors is freed (``opt.state.clear()``, a load, a move)."""

    def __init__(self) -> None:
        self._entries = _Entries()

    def slots_of(self, p: torch.Tensor, state: dict[str, Any], layout) -> list[StateSlot]:
        if KEYS[0].max in state:
            return slots(state, layout)
        tensors = [state.get(key) for key in _VIEWED]
        stamp = tuple(None if t is None else (id(t), t.data_ptr()) for t in tensors)  # (a DTensor's address is 0: its id decides)
        seen = self._entries.get(id(p))
        if seen is not None and seen.stamp == stamp and seen.param() is p:
            return seen.slots
        made = slots(state, layout)
        token = object()
        self._entries[id(p)] = _Entry(stamp, weakref.ref(p), made, token)
        for key, t in zip(_VIEWED, tensors):
            if t is not None and key not in QMAP_KEYS:  # (the maps are shared: they outlive states)
                weakref.finalize(t, _drop_entry, weakref.ref(self._entries), id(p), token).atexit = False
        return made
