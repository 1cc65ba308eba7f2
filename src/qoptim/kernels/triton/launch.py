"""What a launch of the block kernel takes: the layout switch of the states, the pointer arguments,
the float arguments and switches of one step (the weight format's and the states' roundings
included, and their draws), the tile height, and the quantizer's tables of each map (midpoints
for rounding to nearest, steps for rounding stochastically).

Every float argument is a field of ``kernels.rules.Scalars``, computed in double on the host
exactly as the reference writes it, and rounded to float32 by the launch, as torch rounds a
Python scalar operand of a float32 tensor. The switches are ``kernels.rules.Switches`` and the
rule's ``RULE`` (``rules.MATH_SWITCH``), compile-time constants.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import triton

from ...quant import master
from ...quant.blockwise import stochastic_steps
from ...quant.maps import midpoints
from ..rules import MAX_STATES, RuleSpec, Switches, switches
from ...quant.formats import FORMATS
from ..types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, WeightFormat, one_state_draw, state_draw
from .rules import MATH_SWITCH
from .states import BLOCKWISE_4BIT, BLOCKWISE_8BIT, FP32_STATES, WHOLE_TENSOR_8BIT
from .weights import MASTER_24, MASTER_32, NEAREST_WEIGHTS, STOCHASTIC_WEIGHTS

# Whether the kernels were built for Triton's CPU interpreter (decided when triton.jit ran).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# No contracted multiply-adds: torch rounds each multiply and add on its own.
LAUNCH_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False, "num_warps": 4}
SCALAR_LAUNCH_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False, "num_warps": 1}  # one-program kernels


# The layouts whose states the kernel rounds stochastically (a slot's draw): the block-wise ones.
STOCHASTIC_LAYOUTS = (BLOCKWISE_8BIT.value, BLOCKWISE_4BIT.value)


def layout_of(slot: StateSlot) -> int | None:
    """The state layout switch of a slot (``states``), or None where no kernel covers it."""
    if not slot.quantized:
        return FP32_STATES.value if slot.values.dtype == torch.float32 else None
    if slot.code is None or slot.absmax is None:
        return None
    if slot.code.numel() == FORMATS[4].codes:
        return BLOCKWISE_4BIT.value if slot.blocksize == FORMATS[4].blocksize else None
    if slot.code.numel() != FORMATS[8].codes:
        return None
    if slot.blocksize == BLOCK:
        return BLOCKWISE_8BIT.value
    if slot.blocksize == WHOLE_TENSOR:
        return WHOLE_TENSOR_8BIT.value
    return None


def states_layout(slots: list[StateSlot]) -> int | None:
    """The one layout switch of a parameter's states, or None where they are in no layout a
    kernel covers, or in several. 4-bit states must share their bytes as the kernel reads them:
    one tensor, state i's code from bit ``4 * i`` up (``StateSlot.shift``), at most two states.
    The kernel rounds stochastically only block-wise states (8-bit or 4-bit), all with one draw
    (the step's, as the optimizers give it: one hash per element serves them all): a draw
    elsewhere (which the reference refuses), or two draws, are left to the reference."""
    layouts = {layout_of(slot) for slot in slots}
    if len(layouts) != 1:
        return None
    layout = layouts.pop()
    if layout == BLOCKWISE_4BIT.value and not _shares_bytes(slots):
        return None
    if state_draw(slots) is not None and (layout not in STOCHASTIC_LAYOUTS or not one_state_draw(slots)):
        return None
    return layout


def _shares_bytes(slots: list[StateSlot]) -> bool:
    first = slots[0].values
    return len(slots) <= 2 and all(slot.shift == FORMATS[4].bits * i and slot.values.data_ptr() == first.data_ptr()
                                   and slot.values.numel() == first.numel() for i, slot in enumerate(slots))  # fmt: skip


def pointer_args(p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], weights: WeightFormat) -> list[torch.Tensor]:
    """The kernel's first ``POINTERS`` arguments: param, grad, master correction, then each
    state's values, code, rounding table (``rounding_table``) and scales; what a rule, layout or
    weight format does not read gets an unread placeholder."""
    padded = slots + slots[:1] * (MAX_STATES - len(slots))
    correction = p if weights.correction is None else weights.correction
    return [p, g, correction, *(arg for slot in padded for arg in _state_args(slot))]


def _state_args(slot: StateSlot) -> tuple[torch.Tensor, ...]:
    if not slot.quantized:
        return slot.values, slot.values, slot.values, slot.values
    return slot.values, slot.code, rounding_table(slot), slot.absmax


def rounding_table(slot: StateSlot) -> torch.Tensor:
    """The table a quantized state is rounded with: its map's steps where it has a draw
    (``steps_table``: rounded stochastically), else its midpoints (``search_table``: to nearest)."""
    return search_table(slot.code) if slot.draw is None else steps_table(slot.code)


def step_arguments(spec: RuleSpec, p: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool,
                   weights: WeightFormat) -> tuple[list[float], dict]:  # fmt: skip
    """The kernel's float arguments (``rules.Scalars``, in its order) and compile-time switches
    for one step of a parameter like ``p`` with states like ``slots`` in ``weights``' format,
    all but the tile height ``ROWS`` and ``BATCHED``."""
    # floats, all of them: an int argument would make the kernel take (and specialize on) an int
    scalars = [float(x) for x in spec.scalars(hp)]
    flags = dict(
        RULE=MATH_SWITCH[spec.math],
        N_STATES=spec.states,
        NEVER_NEGATIVE=never_negative_mask(spec),
        STOCHASTIC_STATES=stochastic_mask(slots),
        LAYOUT=layout_of(slots[0]),
        SCALE_GRAD=hp.gnorm_scale != 1.0,
        SKIP=bool(skip_nonfinite),
        WEIGHTS=weight_switch(p, weights),
        PARAM_BF16=p.dtype == torch.bfloat16,
        BLOCK_SIZE=BLOCK,
        **switch_flags(spec, hp),
    )
    return scalars, flags


def weight_switch(p: torch.Tensor, weights: WeightFormat) -> int:
    """The kernel's ``WEIGHTS``: the format in which it reads and writes ``p`` (``weights``)."""
    if p.dtype not in master.HALF_PRECISION:
        return NEAREST_WEIGHTS.value  # fp32 is its own master, and is not rounded
    if weights.correction is not None:
        return {24: MASTER_24, 32: MASTER_32}[master.bits_of(weights.correction.dtype)].value
    return NEAREST_WEIGHTS.value if weights.draw is None else STOCHASTIC_WEIGHTS.value


def draw_args(draw: master.Draw | None) -> tuple[int, int]:
    """A draw as the kernel takes it (the weight's ``draw_key`` and ``draw_first``, the states'
    ``state_key`` and ``state_first``): its key and its first index modulo 2**32 (an element's
    draw reads only the low 32 bits of its index); zeros without a draw."""
    if draw is None:
        return 0, 0
    return draw.key & 0xFFFFFFFF, draw.first_index & 0xFFFFFFFF


def stochastic_mask(slots: list[StateSlot]) -> int:
    """The kernel's ``STOCHASTIC_STATES``: bit i set where state i is rounded stochastically."""
    return sum(1 << i for i, slot in enumerate(slots) if slot.draw is not None)


def never_negative_mask(spec: RuleSpec) -> int:
    """The kernel's ``NEVER_NEGATIVE``: bit i set where the rule's state i is never negative."""
    return sum(1 << i for i, signed in enumerate(spec.signed) if not signed)


# The kernel's constexpr argument of each field of rules.Switches (checked in ``block``).
SWITCH_ARGS = tuple(name.upper() for name in Switches._fields)


def switch_flags(spec: RuleSpec, hp: Hyper) -> dict[str, int | bool]:
    """``rules.switches`` as the kernel's constexpr arguments, the decay mode as its int."""
    chosen = switches(spec, hp)
    flags = dict(zip(SWITCH_ARGS, chosen))
    flags["DECAY"] = int(chosen.decay)
    return flags


def rows_per_program(n_blocks: int) -> int:
    """GPU: 4 blocks (1024 elements) per program, 4 warps, 8 elements per thread. Interpreter:
    tiles of up to 64 blocks, since its cost is mostly per program and per op, hardly per
    element; no bigger than the parameter needs (a power of two)."""
    if not INTERPRETED:
        return 4
    return min(64, triton.next_power_of_2(n_blocks))


# (id(code map), builder) -> (weak reference to the map, its version and address then, its
# table): the optimizers pass the same map tensor every step (one per map kind and device, shared
# by all the parameters there), so its tables are built once, not every step. Bounded for callers
# that make maps of their own (a copy per parameter would fill it with small tables).
_MAP_TABLES: dict[tuple, tuple] = {}
SEARCH_TABLES_MAX = 16384  # a module setting, so that a test can make the cache clear itself


def search_table(code: torch.Tensor) -> torch.Tensor:
    """The midpoints of ``code`` and an unread +inf sentinel (256 floats for the 8-step search of
    an 8-bit map, 16 for the 4-step search of a 4-bit one: ``states.round_to_code``), cached by
    the map tensor itself while it is unchanged in place."""
    return _cached_table(code, _midpoints_and_sentinel)


def steps_table(code: torch.Tensor) -> torch.Tensor:
    """``quant.blockwise.stochastic_steps`` of ``code``, the steps of its stochastic rounding
    (``states.round_stochastically``): the reference's table itself, not one divided again here;
    cached as ``search_table``."""
    return _cached_table(code, stochastic_steps)


def _midpoints_and_sentinel(code: torch.Tensor) -> torch.Tensor:
    sentinel = torch.full((1,), math.inf, dtype=torch.float32, device=code.device)
    return torch.cat([midpoints(code), sentinel])


def _cached_table(code: torch.Tensor, build) -> torch.Tensor:
    """``build(code)``, made once per map tensor while it is unchanged in place."""
    key = (id(code), build)
    seen = _MAP_TABLES.get(key)
    stamp = (code._version, code.data_ptr())
    if seen is not None and seen[0]() is code and seen[1] == stamp:
        return seen[2]
    table = build(code)
    if len(_MAP_TABLES) >= SEARCH_TABLES_MAX:
        _forget_dead_maps()
    _MAP_TABLES[key] = (weakref.ref(code), stamp, table)
    return table


def _forget_dead_maps() -> None:
    """Drop the tables of maps gone; all of them if that frees too little."""
    for key in [key for key, (ref, _, _) in _MAP_TABLES.items() if ref() is None]:
        del _MAP_TABLES[key]
    if len(_MAP_TABLES) >= SEARCH_TABLES_MAX // 2:
        _MAP_TABLES.clear()
