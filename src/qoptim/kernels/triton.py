"""The CUDA backend: fused Triton kernels for every rule of the reference (Adam / AdamW, AdEMAMix,
Lion, SGD, LARS, RMSprop, Adagrad, LAMB), with 8-bit states in 256-blocks, 8-bit states with one
scale per tensor, or fp32 states, on fp32 / fp16 / bf16 parameters.

The modules, one idea each:
  * ``triton_rules``: each rule's per-element math, and the constants it reads (host side);
  * ``triton_block``: the one block kernel that dequantizes, applies a rule, requantizes;
  * ``triton_trust``: LAMB's and LARS's trust ratio, made on the device;
  * here: the seam (``supports``, ``update``, ``grad_norm_sq``) and the passes of a step.

Exactness against the reference (same IEEE float32 result for every element):
  * division and square root use the correctly rounded ``div_rn`` / ``sqrt_rn`` (plain ``/`` and
    ``tl.sqrt`` are approximate on the GPU);
  * launches pass ``enable_fp_fusion=False`` so that no multiply and add are contracted into an
    FMA that torch's separate ops would round twice;
  * every Python-side constant (``1 - beta1``, ``lr / (1 - beta1**step)``, ...) is computed in
    double exactly as the reference writes it and handed to the kernel as float32, as torch does
    with a Python scalar (``triton_rules.Scalars``).
The one exception is the trust ratio of LAMB / LARS, whose float64 sums cannot add in the
reference's order (see ``triton_trust``).

A step is one or more passes of the block kernel, all queued on the device with no host sync:
a norms pass first for LAMB / LARS, a peaks pass for the whole-tensor 8-bit layout (the new
global scale must be known before any element is requantized: a ``torch.amax`` over the
programs' peaks gives it), then the step itself. Skipped (NaN/Inf-gradient) blocks are counted by
one atomic add per program into a device int32 counter, read by the optimizer once per step.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import triton

from ..quant.maps import midpoints
from . import reference
from .triton_block import BLOCKWISE_8BIT, FP32_STATES, NORMS_PASS, PEAKS_PASS, STEP_PASS, WHOLE_TENSOR_8BIT, block_kernel
from .triton_rules import FAMILIES, Scalars, switches
from .triton_trust import TrustRatio, ratio_from_sums
from .types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, UpdateResult

__all__ = ["update", "grad_norm_sq", "supports", "trust_ratio"]

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The kernel takes three states whatever the rule; a rule with fewer gets placeholders.
MAX_STATES = 3


def supports(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> bool:
    """A rule of the reference with all its states in one layout this module has a kernel for."""
    family = FAMILIES.get(rule)
    if family is None or p.dtype not in PARAM_DTYPES or len(slots) != family.states:
        return False
    layouts = {_layout(slot) for slot in slots}
    return len(layouts) == 1 and None not in layouts


def grad_norm_sq(g: torch.Tensor) -> float:
    # One torch.dot per chunk is already bandwidth-bound on the GPU: no kernel of our own needed.
    return reference.grad_norm_sq(g)


def update(
    rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True
) -> UpdateResult:
    """One fused step of ``rule`` on a flat contiguous parameter (see the module docstring)."""
    if not supports(rule, p, slots):
        raise ValueError(f"the Triton backend has no kernel for rule {rule!r} with these states")
    if p.numel() == 0:
        return UpdateResult(skipped_blocks=0)
    step = _Step(rule, p, g, slots, hp, skip_nonfinite)
    if step.family.trust:
        step.trust = step.trust_ratio()
    if step.layout == WHOLE_TENSOR_8BIT.value:
        new_scales = step.peaks()
        step.run(STEP_PASS, new_scales=new_scales)
        for i, slot in enumerate(slots):
            slot.absmax.copy_(new_scales[i])
    else:
        step.run(STEP_PASS)
    return UpdateResult(skipped_blocks=step.skipped[0] if skip_nonfinite else 0)  # read by the optimizer once per step


def trust_ratio(
    rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True
) -> TrustRatio:
    """LAMB's or LARS's trust ratio for this step, as device scalars (nothing is written):
    ``reference._trust_ratio`` on the device."""
    if not supports(rule, p, slots) or not FAMILIES[rule].trust:
        raise ValueError(f"the Triton backend has no trust ratio for rule {rule!r} with these states")
    return _Step(rule, p, g, slots, hp, skip_nonfinite).trust_ratio()


class _Step:
    """The launches of one step of one parameter: the kernel arguments every pass shares."""

    def __init__(self, rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool):
        self.rule, self.family = rule, FAMILIES[rule]
        self.p, self.g, self.slots, self.hp, self.skip_nonfinite = p, g, slots, hp, skip_nonfinite
        self.layout = _layout(slots[0])
        self.n = p.numel()
        self.n_blocks = triton.cdiv(self.n, BLOCK)
        self.rows = _rows_per_program(self.n_blocks)
        self.programs = triton.cdiv(self.n_blocks, self.rows)
        self.skipped = torch.zeros(1, dtype=torch.int32, device=p.device)
        self.trust = None  # TrustRatio, once made
        padded = slots + slots[:1] * (MAX_STATES - len(slots))  # placeholders, never read
        self.state_args = [a for slot in padded for a in _state_args(slot)]
        # floats, all of them: an int argument would make the kernel take (and specialize on) an int
        self.scalars = [float(x) for x in self.family.scalars(hp)._replace(gnorm_scale=hp.gnorm_scale)]
        self.flags = dict(
            N_STATES=self.family.states,
            LAYOUT=self.layout,
            SCALE_GRAD=hp.gnorm_scale != 1.0,
            SKIP=bool(skip_nonfinite),
            PARAM_BF16=p.dtype == torch.bfloat16,
            ROWS=self.rows,
            BLOCK_SIZE=BLOCK,
            **switches(self.family, hp),
        )

    def run(self, pass_, new_scales=None, peaks=None, sums=None) -> None:
        """One pass of the block kernel; the buffers a pass does not read get placeholders."""
        trust_factor = None if self.trust is None else self.trust.factor
        buffers = [self.skipped if b is None else b for b in (new_scales, peaks, sums, trust_factor)]
        block_kernel[(self.programs,)](self.p, self.g, *self.state_args, *buffers, self.skipped, self.n, self.n_blocks,
                                       *self.scalars, PASS=pass_.value, **self.flags, **_LAUNCH_OPTIONS)  # fmt: skip

    def peaks(self) -> torch.Tensor:
        """The new one-per-tensor scale of each state (NaN-propagating, like the reference's amax)."""
        peaks = torch.empty((self.programs, self.family.states), dtype=torch.float32, device=self.p.device)
        self.run(PEAKS_PASS, peaks=peaks)
        return peaks.amax(dim=0)

    def trust_ratio(self) -> TrustRatio:
        sums = torch.empty((self.programs, 2), dtype=torch.float64, device=self.p.device)
        self.run(NORMS_PASS, sums=sums)
        lr, weight_decay, max_unorm = float(self.hp.lr), float(self.hp.weight_decay), float(self.hp.max_unorm)
        return ratio_from_sums(self.family.rule, sums, lr, weight_decay, max_unorm, _SCALAR_LAUNCH_OPTIONS)


def _layout(slot: StateSlot) -> int | None:
    """The state layout switch of a slot, or None where no kernel covers it."""
    if not slot.quantized:
        return FP32_STATES.value if slot.values.dtype == torch.float32 else None
    if slot.code is None or slot.code.numel() != 256 or slot.absmax is None:
        return None
    if slot.blocksize == BLOCK:
        return BLOCKWISE_8BIT.value
    if slot.blocksize == WHOLE_TENSOR:
        return WHOLE_TENSOR_8BIT.value
    return None


def _state_args(slot: StateSlot) -> tuple[torch.Tensor, ...]:
    """values, code, midpoints, absmax of one slot; fp32 states pass their values as unread placeholders."""
    if not slot.quantized:
        return slot.values, slot.values, slot.values, slot.values
    return slot.values, slot.code, _search_table(slot.code), slot.absmax


# id(code map) -> (weak reference to it, its version and address then, its search table): the
# optimizers pass the same map tensor every step, so its table is built once, not every step.
_SEARCH_TABLES: dict[int, tuple] = {}


def _search_table(code: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints of ``code`` and an unread +inf sentinel (256 floats for the 8-step
    search), cached by the map tensor itself while it is unchanged in place."""
    seen = _SEARCH_TABLES.get(id(code))
    stamp = (code._version, code.data_ptr())
    if seen is not None and seen[0]() is code and seen[1] == stamp:
        return seen[2]
    sentinel = torch.full((1,), math.inf, dtype=torch.float32, device=code.device)
    table = torch.cat([midpoints(code), sentinel])
    if len(_SEARCH_TABLES) >= 64:
        _SEARCH_TABLES.clear()
    _SEARCH_TABLES[id(code)] = (weakref.ref(code), stamp, table)
    return table


def _rows_per_program(n_blocks: int) -> int:
    """GPU: 4 blocks (1024 elements) per program, 4 warps, 8 elements per thread. Interpreter:
    tiles of up to 64 blocks, since its cost is mostly per program and per op, hardly per
    element; no bigger than the parameter needs (a power of two)."""
    if not INTERPRETED:
        return 4
    return min(64, triton.next_power_of_2(n_blocks))


# Whether the kernels were built for Triton's CPU interpreter (decided when triton.jit ran).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_LAUNCH_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False, "num_warps": 4}
_SCALAR_LAUNCH_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False, "num_warps": 1}  # one-program kernels

# The kernel's float arguments are triton_rules.Scalars, passed positionally in its order.
_first_scalar = block_kernel.arg_names.index(Scalars._fields[0])
assert tuple(block_kernel.arg_names[_first_scalar : _first_scalar + len(Scalars._fields)]) == Scalars._fields

# A kernel for every rule of the reference, with its number of states.
assert all(FAMILIES[name].states == count for name, (_, count) in reference.RULES.items())
