"""A 16-bit parameter's weight format, as the optimizers keep it: ``master_weight_bits`` (a
correction that, with the bf16 / fp16 weight, holds an fp32 master: ``quant.master``) and
``weight_rounding`` (stochastic rounding of a weight without a master); their checks, the state
entries they keep, and the kernels' view of them (``kernels.WeightFormat``).

Both are optimizer settings (the ``args`` of bitsandbytes' optimizers, so a parameter can take its
own through ``GlobalOptimManager.override_config``). An fp32 parameter is its own master: neither
setting changes it or keeps anything for it. The state follows the setting at each step: a
parameter gets a zero correction (its weight is its master) when a width is set, its correction
re-encoded when the width changes, and dropped when it is unset (the weight stays as it is).
A parameter whose weight or states round stochastically (``weight_rounding="stochastic"``;
``state_rounding="stochastic"``, the 4-bit states' default: ``state.rounds_stochastically``) keeps a seed
(``rounding_seed``) that keys both: a step's draws are ``step_draw``'s, the weight taking the high
16 bits of each element's hash and the state the low 16.

The state keeps a 24-bit master's correction as int8 of the parameter's shape, a 32-bit one's as
uint8 of shape ``(*p.shape, 2)``: the int16 in its two bytes, little-endian (torch.distributed's
gloo and NCCL have no int16, and FSDP2 / DCP gather and shard the state like the parameter)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..kernels import NEAREST, WeightFormat
from ..quant import master
from ..quant.formats import NEAREST_ROUNDING, STOCHASTIC_ROUNDING
from . import dtensor, validation
from .state import MASTER_CORRECTION, ROUNDING_SEED, Buffers, rounds_stochastically

__all__ = [
    "SETTINGS_DOC", "WEIGHT_ROUNDINGS", "check_loaded", "check_settings", "correction_bits", "correction_from_values", "correction_values",
    "master_weight", "step_draw", "sync_state", "weight_format",
]  # fmt: skip

WEIGHT_ROUNDINGS = (NEAREST_ROUNDING, STOCHASTIC_ROUNDING)

# appended to every optimizer class's docstring (``optimizer._StateOptimizer.__init_subclass__``)
SETTINGS_DOC = """

    Lean training (qoptim's own, keyword-only): ``master_weight_bits=24`` or ``32`` keeps for each
    bf16 / fp16 parameter a correction (1 or 2 bytes per element) that, with the weight, holds an
    fp32 master which every step updates (32 bits on bf16: the fp32 master bit for bit; the weight
    is the master rounded to nearest); ``weight_rounding="stochastic"`` instead rounds the updated
    weight stochastically. fp32 parameters are their own master: neither setting changes them or
    keeps anything for them. ``master_weight(p)`` returns a parameter's fp32 master.
    ``state_rounding`` rounds the never-negative quantized states (second moments, sums of
    squares): ``"nearest"`` (8-bit states' default, bitsandbytes'), ``"stochastic"`` (right on
    average, keyed by seed, step and element; 4-bit states' default), None for the default. See
    the README's "Lean training" section.
"""


def check_settings(master_weight_bits: Any, weight_rounding: Any) -> None:
    if isinstance(master_weight_bits, bool) or master_weight_bits not in (None, *master.MASTER_BITS):
        raise ValueError(f"master_weight_bits must be None, 24 or 32, got {master_weight_bits!r}")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise ValueError(f"weight_rounding must be one of {WEIGHT_ROUNDINGS}, got {weight_rounding!r}")
    if master_weight_bits is not None and weight_rounding == STOCHASTIC_ROUNDING:
        raise ValueError(
            f"weight_rounding='stochastic' rounds weights that have no master; with master_weight_bits={master_weight_bits} "
            "the master already keeps what rounding loses: choose one"
        )


def sync_state(p: torch.Tensor, state: dict[str, Any], config: dict[str, Any], buffers: Buffers, position: tuple[int, int]) -> None:
    """Bring a parameter's weight-format entries in line with its settings (see the module doc).
    ``position`` (group, index) keys a new rounding seed."""
    check_settings(config["master_weight_bits"], config["weight_rounding"])
    validation.check_state_rounding(config.get("state_rounding"))
    if _rounds_stochastically(p, state, config):
        state.setdefault(ROUNDING_SEED, _seed(position))
    else:
        state.pop(ROUNDING_SEED, None)
    if p.dtype not in master.HALF_PRECISION:
        return
    bits = config["master_weight_bits"]
    correction = state.get(MASTER_CORRECTION)
    if bits is None:
        if correction is not None:
            _drop(state, position)
    elif correction is None:
        state[MASTER_CORRECTION] = _new_correction(p, bits, buffers)
    elif correction_bits(correction) != bits:  # another width: the same master, encoded anew
        weight, new = master.encode(_decoded(p, correction), p.dtype, bits)
        dtensor.local(p.detach()).copy_(weight)
        state[MASTER_CORRECTION] = _new_correction(p, bits, buffers)
        _as_integers(state[MASTER_CORRECTION]).copy_(new.view(-1))


def _rounds_stochastically(p: torch.Tensor, state: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether a parameter's weight or its states round stochastically (and so need a seed)."""
    return (config["weight_rounding"] == STOCHASTIC_ROUNDING and p.dtype in master.HALF_PRECISION) or rounds_stochastically(state, config)


def _drop(state: dict[str, Any], position: tuple[int, int]) -> None:
    warnings.warn(
        f"master_weight_bits is None for parameter {position[1]} of param group {position[0]}, which has a "
        f"{correction_bits(state[MASTER_CORRECTION])}-bit master: its correction is dropped, the weight keeps the master "
        "rounded to nearest (pass master_weight_bits to keep it, e.g. when loading a checkpoint of a run with a master)",
        RuntimeWarning,
        stacklevel=6,
    )
    del state[MASTER_CORRECTION]


_STORED = {24: (torch.int8, ()), 32: (torch.uint8, (2,))}  # bits -> the state's dtype and trailing dims (module doc)


def _new_correction(p: torch.Tensor, bits: int, buffers: Buffers) -> torch.Tensor:
    """A zero correction (the weight is its own master), sharded like ``p`` (and paged with the optimizer)."""
    dtype, trailing = _STORED[bits]
    if dtensor.is_dtensor(p):  # (state_buffer's extra dims lead; these trail: the same shards as p's)
        local = torch.zeros((*dtensor.local(p).shape, *trailing), dtype=dtype, device=p.device)
        return dtensor.wrap(local, p, p.placements, (*p.shape, *trailing))
    return buffers.state_buffer(p, dtype, (*p.shape, *trailing))


def correction_bits(correction: torch.Tensor) -> int:
    """The master's width a stored correction is for."""
    return 24 if correction.dtype == torch.int8 else 32


def _as_integers(correction: torch.Tensor) -> torch.Tensor:
    """A stored correction's local values as flat int8 / int16 (an alias)."""
    flat = dtensor.local(correction.detach()).view(-1)
    return flat if flat.dtype == torch.int8 else flat.view(torch.int16)


def correction_values(correction: torch.Tensor) -> torch.Tensor:
    """A (plain) stored correction's integers as float32 of the parameter's shape (FSDP1's export:
    it gathers only float states shaped like the parameter)."""
    shape = correction.shape if correction.dtype == torch.int8 else correction.shape[:-1]
    return _as_integers(correction).float().view(shape)


def correction_from_values(values: torch.Tensor, bits: Any) -> torch.Tensor:
    """``correction_values``' inverse: the stored correction of a ``bits``-bit master."""
    dtype = master.CORRECTION_DTYPES.get(bits) if not isinstance(bits, bool) else None
    limits = torch.iinfo(dtype) if dtype is not None else None
    if limits is None or not bool((values == values.round()).all() and (values.abs() <= limits.max + 1).all()):
        raise ValueError(f"an exported {MASTER_CORRECTION} must hold the integers of a 24- or 32-bit master, with its width; got {bits!r}")
    integers = values.to(dtype).contiguous()
    return integers if bits == 24 else integers.view(torch.uint8).view(*values.shape, 2)


_SEED_SALT = 0x9E3779B9  # (so that the first parameter's seed is not lowbias32's fixed point, 0)


def _seed(position: tuple[int, int]) -> int:
    """A parameter's rounding seed: from its place in the groups alone, so it draws nothing from
    torch's generator and every process has the same, whatever its torch seed (DDP's replicas and
    FSDP2's shards of a parameter must round alike: torch's seed differs between processes unless
    each sets it alike). It is kept in the state: a resumed run goes on with it."""
    gindex, pindex = position
    return master.lowbias32(master.lowbias32(gindex << 20 ^ pindex) ^ _SEED_SALT)


def weight_format(p: torch.Tensor, state: dict[str, Any], config: dict[str, Any], draw: master.Draw | None) -> WeightFormat:
    """The kernels' view of a parameter's weight format at the step of ``draw`` (``step_draw``)."""
    if p.dtype not in master.HALF_PRECISION:
        return NEAREST
    correction = state.get(MASTER_CORRECTION)
    if correction is not None:
        return WeightFormat(correction=_as_integers(correction))
    if draw is not None and config["weight_rounding"] == STOCHASTIC_ROUNDING:
        return WeightFormat(draw=draw)
    return NEAREST


def step_draw(p: torch.Tensor, state: dict[str, Any], step: int) -> master.Draw | None:
    """The draws of a parameter's stochastic rounding at ``step`` (None: it has no seed)."""
    seed = state.get(ROUNDING_SEED)
    return None if seed is None else master.Draw(master.step_key(int(seed), step), _first_index(p))


def _first_index(p: torch.Tensor) -> int:
    """The flat index in the whole parameter of a shard's first element (0 unsharded): with it a
    shard draws what the whole tensor would there, so the rounding does not depend on the sharding
    (for sharding along dim 0, FSDP2's; along another dim, shards still draw apart)."""
    if not dtensor.is_dtensor(p) or dtensor.sharding(p) is None:
        return 0
    _, d = dtensor.sharding(p)
    start, _ = dtensor.local_rows(p)
    return start * (p.numel() // max(p.shape[d], 1))


def master_weight(p: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    """A new fp32 tensor of ``p``'s master (a DTensor like ``p`` for a DTensor)."""
    correction = state.get(MASTER_CORRECTION)
    weights = dtensor.local(p.detach())
    if correction is None or p.dtype not in master.HALF_PRECISION:
        local = weights.to(torch.float32, copy=True)
    else:
        local = master.decode(weights, _as_integers(correction).view(weights.shape))
    return dtensor.like(p, local, p.shape) if dtensor.is_dtensor(p) else local


def _decoded(p: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    weights = dtensor.local(p.detach())
    return master.decode(weights, _as_integers(correction).view(weights.shape))


def check_loaded(name: str, p: torch.Tensor, state: dict[str, Any]) -> None:
    """A loaded parameter state's weight-format entries, checked before anything is assigned."""
    correction = state.get(MASTER_CORRECTION)
    if correction is not None:
        fits = isinstance(correction, torch.Tensor) and any(
            correction.dtype == dtype and tuple(correction.shape) == (*p.shape, *trailing) for dtype, trailing in _STORED.values()
        )
        if not fits:
            got = f"{correction.dtype} {tuple(correction.shape)}" if isinstance(correction, torch.Tensor) else type(correction).__name__
            raise ValueError(f"{name}: {MASTER_CORRECTION} must be an int8 tensor of shape {tuple(p.shape)} (24 bits) or uint8 of "
                             f"shape {(*p.shape, 2)} (32 bits), got {got}")  # fmt: skip
        if p.dtype not in master.HALF_PRECISION:
            raise ValueError(f"{name}: {MASTER_CORRECTION} belongs to a bfloat16 or float16 parameter, this one is {p.dtype}")
    seed = state.get(ROUNDING_SEED)
    if seed is not None:
        if isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point():
            seed = seed.item()
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 32:
            raise ValueError(f"{name}: {ROUNDING_SEED} must be an int in [0, 2**32), got {state.get(ROUNDING_SEED)!r}")
