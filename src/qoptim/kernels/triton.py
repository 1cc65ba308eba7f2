"""The CUDA backend: fused Triton kernels for Adam / AdamW (8-bit blockwise, 8-bit whole-tensor, 32-bit).

Each kernel program owns ``ROWS`` 256-blocks as a [ROWS, 256] tile and does, per block, what the
reference does per chunk and in the same float-op order: dequantize with the old scale, apply
the Adam rule in fp32, take the block's new scale, requantize by the count of midpoints below
``x * (1 / scale)``, round the parameter back to its dtype (round to nearest even).

Exactness against the reference (same IEEE float32 result for every element):
  * division and square root use the correctly rounded ``div_rn`` / ``sqrt_rn`` (plain ``/`` and
    ``tl.sqrt`` are approximate on the GPU);
  * launches pass ``enable_fp_fusion=False`` so that no multiply and add are contracted into an
    FMA that torch's separate ops would round twice;
  * every Python-side constant (``1 - beta1``, ``lr / (1 - beta1**step)``, ...) is computed in
    double exactly as the reference writes it and handed to the kernel as float32, as torch does
    with a Python scalar.

The whole-tensor 8-bit layout needs the new global scale before any element is requantized, so it
runs the same kernel twice: a first pass that writes only each program's peak of the updated
states, a ``torch.amax`` over those peaks (on the device, no host sync), and the real pass.

Skipped (NaN/Inf-gradient) blocks are counted by one atomic add per program into a device int32
counter, read once per call.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..quant.maps import midpoints
from .reference import grad_norm_sq as _reference_grad_norm_sq
from .types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, UpdateResult

__all__ = ["update", "grad_norm_sq", "supports"]

# State layouts, a compile-time switch of the kernel.
FP32_STATES, BLOCKWISE_8BIT, WHOLE_TENSOR_8BIT = 0, 1, 2

PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _quantize(x, inv_scale, mids_ptr):
    """uint8 code of each x: the number of the 255 midpoints strictly below u = x * inv_scale.

    A branchless binary search over ``mids_ptr`` (256 floats, the last one an unread sentinel).
    The test is ``not (mid >= u)`` rather than ``mid < u`` so that a NaN lands on 255, where
    torch.bucketize puts it.
    """
    u = x * inv_scale
    index = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(8):  # steps of 128, 64, ..., 1
        mid = tl.load(mids_ptr + index + ((128 >> k) - 1))
        index += tl.where(mid >= u, 0, 128 >> k)
    return index.to(tl.uint8)


@triton.jit
def _inverse(scale):
    """1 / scale, or 0 for a zero (or NaN) scale: the reference's ``where(absmax > 0, 1 / absmax, 0)``."""
    positive = scale > 0
    safe = tl.where(positive, scale, 1.0)  # no division by zero, even in lanes thrown away
    return tl.where(positive, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)


@triton.jit
def _nan_max(x, axis: tl.constexpr):
    """max along ``axis``, NaN where a NaN is among the values (as torch.amax; tl.max may drop NaNs)."""
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis=axis))


@triton.jit
def _row_absmax(x, mask):
    """max |x| of each row over its valid elements."""
    return _nan_max(tl.where(mask, tl.abs(x), 0.0), 1)


@triton.jit
def _round_to_bf16(x):
    """float32 -> bfloat16, round to nearest even, in integer ops: Triton's interpreter truncates
    instead (the GPU would round correctly; the result is the same). NaN becomes torch's 0x7FC0."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_state(ptr, code_ptr, absmax_ptr, offs, mask, rows, row_mask, LAYOUT: tl.constexpr):
    """fp32 values of one state's tile (dequantized with the old scale for 8-bit layouts)."""
    if LAYOUT == 0:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    codes = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
    if LAYOUT == 1:
        scale = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)[:, None]
    else:
        scale = tl.load(absmax_ptr)
    return tl.load(code_ptr + codes) * scale


@triton.jit
def _store_state(ptr, mids_ptr, absmax_ptr, new_scale_ptr, x, offs, mask, rows, row_mask, bad, LAYOUT: tl.constexpr):
    """Write one state's updated tile; blocks in ``bad`` keep their bytes and scale, except in the
    whole-tensor layout, where every element is recoded with the new global scale (as the reference)."""
    if LAYOUT == 0:
        tl.store(ptr + offs, x, mask=mask & (bad[:, None] == 0))
    elif LAYOUT == 1:
        scale = _row_absmax(x, mask)
        keep = row_mask & (bad == 0)
        tl.store(absmax_ptr + rows, scale, mask=keep)
        codes = _quantize(x, _inverse(scale)[:, None], mids_ptr)
        tl.store(ptr + offs, codes, mask=mask & keep[:, None])
    else:
        codes = _quantize(x, _inverse(tl.load(new_scale_ptr)), mids_ptr)
        tl.store(ptr + offs, codes, mask=mask)


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr,
    s1_ptr, code1_ptr, mids1_ptr, absmax1_ptr,
    s2_ptr, code2_ptr, mids2_ptr, absmax2_ptr,
    new_scale_ptr,  # whole-tensor layout, second pass: the two new global scales
    peaks_ptr,  # whole-tensor layout, first pass: two peaks per program
    skipped_ptr,  # int32 counter of skipped blocks
    n, n_blocks,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    weight_decay, decay_factor, step_size, bias_correction2_sqrt, gnorm_scale,
    LAYOUT: tl.constexpr, L2_DECAY: tl.constexpr, DECOUPLED_DECAY: tl.constexpr, SCALE_GRAD: tl.constexpr,
    SKIP: tl.constexpr, PEAKS_ONLY: tl.constexpr, PARAM_BF16: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_blocks
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < n

    p_old = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_old = _load_state(s1_ptr, code1_ptr, absmax1_ptr, offs, mask, rows, row_mask, LAYOUT)
    v_old = _load_state(s2_ptr, code2_ptr, absmax2_ptr, offs, mask, rows, row_mask, LAYOUT)

    bad = tl.zeros((ROWS,), dtype=tl.int32)
    if SKIP:
        # |g| < inf is false for NaN and for +-Inf: the block is left as it was.
        bad = tl.max((~(tl.abs(g) < float("inf"))).to(tl.int32), axis=1)
        if not PEAKS_ONLY:
            tl.atomic_add(skipped_ptr, tl.sum(tl.where(row_mask, bad, 0), axis=0))
    if SCALE_GRAD:
        g = g * gnorm_scale

    # The Adam rule, in the reference's order of float operations.
    p = p_old
    if L2_DECAY:
        g = g + p * weight_decay
    m = m_old * beta1 + g * one_minus_beta1
    v = v_old * beta2 + (g * g) * one_minus_beta2
    if DECOUPLED_DECAY:
        p = p * decay_factor
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - tl.math.div_rn(m, denom) * step_size

    keep = bad[:, None] != 0
    m = tl.where(keep, m_old, m)
    v = tl.where(keep, v_old, v)
    if PEAKS_ONLY:
        tl.store(peaks_ptr + 2 * pid, _nan_max(_row_absmax(m, mask), 0))
        tl.store(peaks_ptr + 2 * pid + 1, _nan_max(_row_absmax(v, mask), 0))
    else:
        if PARAM_BF16:
            p_new = _round_to_bf16(p)
        else:
            p_new = p.to(p_ptr.dtype.element_ty)  # float16: round to nearest even
        tl.store(p_ptr + offs, p_new, mask=mask & (keep == 0))
        _store_state(s1_ptr, mids1_ptr, absmax1_ptr, new_scale_ptr, m, offs, mask, rows, row_mask, bad, LAYOUT)
        _store_state(s2_ptr, mids2_ptr, absmax2_ptr, new_scale_ptr + 1, v, offs, mask, rows, row_mask, bad, LAYOUT)


# ---- host side ---------------------------------------------------------------------


def supports(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> bool:
    """Adam / AdamW with both states in one layout this module has a kernel for."""
    if rule != "adam" or p.dtype not in PARAM_DTYPES or len(slots) != 2:
        return False
    layouts = {_layout(slot) for slot in slots}
    return len(layouts) == 1 and None not in layouts


def grad_norm_sq(g: torch.Tensor) -> float:
    # One torch.dot per chunk is already bandwidth-bound on the GPU: no kernel of our own needed.
    return _reference_grad_norm_sq(g)


def update(
    rule: str, p: torch.Tensor, g: torch.Tensor, slots: list[StateSlot], hp: Hyper, skip_nonfinite: bool = True
) -> UpdateResult:
    """One fused Adam step of a flat contiguous parameter (see the module docstring)."""
    if not supports(rule, p, slots):
        raise ValueError(f"the Triton backend has no kernel for rule {rule!r} with these states")
    n = p.numel()
    if n == 0:
        return UpdateResult(skipped_blocks=0)
    layout = _layout(slots[0])
    n_blocks = triton.cdiv(n, BLOCK)
    rows = ROWS_PER_PROGRAM
    grid = (triton.cdiv(n_blocks, rows),)
    skipped = torch.zeros(1, dtype=torch.int32, device=p.device)
    state_args = [a for slot in slots for a in _state_args(slot)]
    flags = dict(
        LAYOUT=layout,
        L2_DECAY=bool(hp.weight_decay and not hp.decoupled),
        DECOUPLED_DECAY=bool(hp.weight_decay and hp.decoupled),
        SCALE_GRAD=hp.gnorm_scale != 1.0,
        SKIP=bool(skip_nonfinite),
        PARAM_BF16=p.dtype == torch.bfloat16,
        ROWS=rows,
        BLOCK_SIZE=BLOCK,
    )
    scalars = _adam_scalars(hp)

    def launch(new_scale: torch.Tensor, peaks: torch.Tensor, peaks_only: bool) -> None:
        _adam_kernel[grid](p, g, *state_args, new_scale, peaks, skipped, n, n_blocks, *scalars, PEAKS_ONLY=peaks_only, **flags,
                           **_LAUNCH_OPTIONS)  # fmt: skip

    if layout == WHOLE_TENSOR_8BIT:
        peaks = torch.empty(2 * grid[0], dtype=torch.float32, device=p.device)
        launch(peaks, peaks, peaks_only=True)
        new_scale = peaks.view(-1, 2).amax(dim=0)  # NaN-propagating, like the reference's amax
        launch(new_scale, peaks, peaks_only=False)
        slots[0].absmax.copy_(new_scale[0])
        slots[1].absmax.copy_(new_scale[1])
    else:
        launch(skipped, skipped, peaks_only=False)  # placeholders: the layout reads neither
    return UpdateResult(skipped_blocks=skipped[0] if skip_nonfinite else 0)  # read by the optimizer once per step


def _layout(slot: StateSlot) -> int | None:
    if not slot.quantized:
        return FP32_STATES if slot.values.dtype == torch.float32 else None
    if slot.blocksize == BLOCK:
        return BLOCKWISE_8BIT
    if slot.blocksize == WHOLE_TENSOR:
        return WHOLE_TENSOR_8BIT
    return None


def _state_args(slot: StateSlot) -> tuple[torch.Tensor, ...]:
    """values, code, midpoints, absmax of one slot; fp32 states pass their values as unread placeholders."""
    if not slot.quantized:
        return slot.values, slot.values, slot.values, slot.values
    return slot.values, slot.code, _search_table(slot.code), slot.absmax


def _search_table(code: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints of ``code`` and an unread +inf sentinel: 256 floats for the 8-step search."""
    sentinel = torch.full((1,), math.inf, dtype=torch.float32, device=code.device)
    return torch.cat([midpoints(code), sentinel])


def _adam_scalars(hp: Hyper) -> tuple[float, ...]:
    """The kernel's scalar arguments, computed in double as the reference computes them; the
    launch rounds each to float32, as torch rounds a Python scalar."""
    return (
        hp.beta1,
        1.0 - hp.beta1,
        hp.beta2,
        1.0 - hp.beta2,
        hp.eps,
        hp.weight_decay,
        1.0 - hp.lr * hp.weight_decay,
        hp.lr / (1.0 - hp.beta1**hp.step),
        math.sqrt(1.0 - hp.beta2**hp.step),
        hp.gnorm_scale,
    )


# Whether the kernels above were built for Triton's CPU interpreter (decided when triton.jit ran).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# GPU: 4 blocks (1024 elements) per program, 4 warps, 8 elements per thread. Interpreter: big
# tiles, since its cost is mostly per program and per op, hardly per element.
ROWS_PER_PROGRAM = 64 if INTERPRETED else 4

_LAUNCH_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False, "num_warps": 4}
