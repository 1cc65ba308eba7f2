"""The one block kernel of the Triton backend, for every rule, state layout and pass.

Each program owns ``ROWS`` 256-blocks as a [ROWS, 256] tile and does, per block, what the
reference does per chunk and in the same float-op order: dequantize each state with its old
scale, apply the rule in fp32 (``rules.apply_rule``), take the new scales, requantize by the
count of midpoints below ``x * (1 / scale)``, or stochastically where a block-wise state has a
draw (``states``: every state layout, 4-bit included), write the parameter back in its weight format
(``weights``: rounded to nearest even, stochastically, or encoded as a master with its correction,
which is read decoded). Blocks whose gradient holds a NaN or Inf keep their parameter, correction
and states (``SKIP``).

Three passes over the same tile code, a compile-time switch:
  * ``STEP_PASS`` writes the parameter and the states;
  * ``PEAKS_PASS`` (whole-tensor 8-bit layout) writes only each program's peak of each updated
    state: the new global scales must be known before any element is requantized;
  * ``NORMS_PASS`` (LAMB, LARS) writes only each program's two float64 sums of squares whose
    square roots make the trust ratio (see ``trust``).

One launch covers one flat parameter, or (``BATCHED``) many: each program then finds its tensor's
pointers, size, gradient scale, draws and skip counter in a row of an int64 table (``batch``)
and runs the same tile code on them.

What a launch takes (the layout of a state, its kernel arguments, the float arguments and
switches of a step, the tile height) is made in ``launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..rules import MAX_STATES, Scalars, Switches
from .rules import LAMB, MOMENTUM, apply_rule, lamb_direction
from .states import load_states, store_states, tile_peak
from .weights import STOCHASTIC_WEIGHTS, load_weights, store_weights, widen

# Passes, a compile-time switch (see the module docstring).
STEP_PASS, PEAKS_PASS, NORMS_PASS = (tl.constexpr(i) for i in range(3))

# The kernel takes MAX_STATES (3) states whatever the rule; a rule with fewer gets placeholders.
# A batch table's row (int64): the kernel's pointer arguments in its order (param, grad, master
# correction, then values, code, rounding table, scales of each state), then the tensor's element
# count, its first program, its gradient scale (float32 bits), its weight's draw's key and first
# index, and its states' draw's key and first index (stochastic rounding).
POINTERS = 3 + 4 * MAX_STATES
(N_COLUMN, FIRST_PROGRAM_COLUMN, GNORM_SCALE_COLUMN, DRAW_KEY_COLUMN, DRAW_FIRST_COLUMN, STATE_KEY_COLUMN,
 STATE_FIRST_COLUMN) = (tl.constexpr(POINTERS + i) for i in range(7))  # fmt: skip
TABLE_COLUMNS = tl.constexpr(POINTERS + 7)


@triton.jit
def _sum_of_squares(x, mask):
    """Sum of x * x over the valid elements, in float64 (x is float32: each square is exact)."""
    x = tl.where(mask, x, 0.0).to(tl.float64)
    return tl.sum(tl.sum(x * x, axis=1), axis=0)


@triton.jit
def _store_peaks(out_ptr, s0, s1, s2, mask, N_STATES: tl.constexpr):
    tl.store(out_ptr, tile_peak(s0, mask))
    if N_STATES > 1:
        tl.store(out_ptr + 1, tile_peak(s1, mask))
    if N_STATES > 2:
        tl.store(out_ptr + 2, tile_peak(s2, mask))


@triton.jit
def _store_trust_sums(sums_ptr, pid, a, b, bad, mask):
    """The tile's sums of a * a and b * b, skipped blocks left out as the reference leaves them
    out: ``a * good`` (a NaN parameter would stay NaN) and ``where(good, b, 0)``."""
    good = (bad == 0)[:, None]
    a = a * good.to(tl.float32)
    b = tl.where(good, b, 0.0)
    tl.store(sums_ptr + 2 * pid, _sum_of_squares(a, mask))
    tl.store(sums_ptr + 2 * pid + 1, _sum_of_squares(b, mask))


@triton.jit
def _address(row, column: tl.constexpr, like):
    """The address in ``column`` of a batch table's ``row``, as a pointer of ``like``'s type."""
    return tl.load(row + column).to(like.dtype)


@triton.jit
def _state_addresses(row, column: tl.constexpr, values_ptr, code_ptr, rounding_ptr, absmax_ptr):
    """One state's four pointers from a batch table's ``row``, from ``column`` on."""
    return (_address(row, column, values_ptr), _address(row, column + 1, code_ptr), _address(row, column + 2, rounding_ptr),
            _address(row, column + 3, absmax_ptr))  # fmt: skip


@triton.jit(do_not_specialize=["draw_key", "draw_first", "state_key", "state_first"])
def block_kernel(
    p_ptr, g_ptr,
    c_ptr,  # MASTER_24 / MASTER_32: the master correction (int8 / int16); otherwise a placeholder
    # each state's values, code map, rounding table (its midpoints, or its stochastic steps), scales
    s0_ptr, code0_ptr, rounding0_ptr, absmax0_ptr,
    s1_ptr, code1_ptr, rounding1_ptr, absmax1_ptr,
    s2_ptr, code2_ptr, rounding2_ptr, absmax2_ptr,
    new_scales_ptr,  # whole-tensor layout, STEP_PASS: the new global scale of each state
    peaks_ptr,  # PEAKS_PASS: N_STATES float32 peaks per program
    sums_ptr,  # NORMS_PASS: two float64 sums of squares per program
    trust_ptr,  # LARS, LAMB: the float32 factor made of the trust ratio (see trust.py)
    skipped_ptr,  # int64 counter of skipped blocks (BATCHED: one per tensor)
    table_ptr,  # BATCHED: a row of TABLE_COLUMNS int64 per tensor
    owner_ptr,  # BATCHED: the table row of each program
    n, n_blocks,
    draw_key, draw_first,  # STOCHASTIC_WEIGHTS: the step's key (< 2**32) and the first element's index (mod 2**32)
    state_key, state_first,  # STOCHASTIC_STATES: the same, of the states' draw
    # kernels.rules.Scalars, in its order
    beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha, eps, weight_decay, decay_factor,
    step_size, bias_correction1, bias_correction2, bias_correction2_sqrt, one_minus_dampening, gnorm_scale,
    RULE: tl.constexpr, N_STATES: tl.constexpr, LAYOUT: tl.constexpr, PASS: tl.constexpr, NEVER_NEGATIVE: tl.constexpr,
    STOCHASTIC_STATES: tl.constexpr,
    DECAY: tl.constexpr, TRUST: tl.constexpr, NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,  # kernels.rules.Switches
    SCALE_GRAD: tl.constexpr, SKIP: tl.constexpr, WEIGHTS: tl.constexpr,
    PARAM_BF16: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BATCHED: tl.constexpr,
):  # fmt: skip
    """One pass of one rule over ``ROWS`` blocks of a flat parameter (the states past
    ``N_STATES`` are placeholders, never read). ``NEVER_NEGATIVE``: bit i set where the rule's
    state i is never negative (``kernels.rules.RuleSpec.signed``). ``STOCHASTIC_STATES``: bit i
    set where state i is rounded stochastically (``states``). ``WEIGHTS``: the parameter's
    weight format (``weights``). ``BATCHED``: the parameter is the one of this program's table row,
    and the pointer arguments are placeholders that only give the types."""
    pid = tl.program_id(0).to(tl.int64)
    key = draw_key.to(tl.uint32)
    first = draw_first.to(tl.int64)
    states_key = state_key.to(tl.uint32)
    states_first = state_first.to(tl.int64)
    if BATCHED:  # columns: param, grad, correction, then four per state (see POINTERS)
        tensor = tl.load(owner_ptr + pid)
        row = table_ptr + tensor * TABLE_COLUMNS
        p_ptr = _address(row, 0, p_ptr)
        g_ptr = _address(row, 1, g_ptr)
        c_ptr = _address(row, 2, c_ptr)
        s0_ptr, code0_ptr, rounding0_ptr, absmax0_ptr = _state_addresses(row, 3, s0_ptr, code0_ptr, rounding0_ptr, absmax0_ptr)
        if N_STATES > 1:
            s1_ptr, code1_ptr, rounding1_ptr, absmax1_ptr = _state_addresses(row, 7, s1_ptr, code1_ptr, rounding1_ptr,
                                                                             absmax1_ptr)  # fmt: skip
        if N_STATES > 2:
            s2_ptr, code2_ptr, rounding2_ptr, absmax2_ptr = _state_addresses(row, 11, s2_ptr, code2_ptr, rounding2_ptr,
                                                                             absmax2_ptr)  # fmt: skip
        if WEIGHTS == STOCHASTIC_WEIGHTS:
            key = tl.load(row + DRAW_KEY_COLUMN).to(tl.uint32)
            first = tl.load(row + DRAW_FIRST_COLUMN)
        if STOCHASTIC_STATES != 0:
            states_key = tl.load(row + STATE_KEY_COLUMN).to(tl.uint32)
            states_first = tl.load(row + STATE_FIRST_COLUMN)
        n = tl.load(row + N_COLUMN)
        n_blocks = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
        pid -= tl.load(row + FIRST_PROGRAM_COLUMN)  # programs are the tensor's own: a tile lies within it
        gnorm_scale = tl.load(row + GNORM_SCALE_COLUMN).to(tl.int32).to(tl.float32, bitcast=True)
        skipped_ptr += tensor
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_blocks
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < n

    p_old = load_weights(p_ptr, c_ptr, offs, mask, WEIGHTS, PARAM_BF16)  # fp32: the master, where there is one
    g = widen(tl.load(g_ptr + offs, mask=mask, other=0.0))
    bad = tl.zeros((ROWS,), dtype=tl.int32)
    if SKIP:
        # |g| < inf is false for NaN and for +-Inf: the block is left as it was.
        bad = tl.max((~(tl.abs(g) < float("inf"))).to(tl.int32), axis=1)
        if PASS == STEP_PASS:
            tl.atomic_add(skipped_ptr, tl.sum(tl.where(row_mask, bad, 0), axis=0))
    if SCALE_GRAD:
        g = g * gnorm_scale

    if PASS == NORMS_PASS and RULE == MOMENTUM:
        # LARS: the norms of the parameter and of the gradient; no state is read.
        _store_trust_sums(sums_ptr, pid, p_old, g, bad, mask)
    else:
        s0_old, s1_old, s2_old, packed = load_states(s0_ptr, code0_ptr, absmax0_ptr, s1_ptr, code1_ptr, absmax1_ptr, s2_ptr,
                                                     code2_ptr, absmax2_ptr, offs, mask, rows, row_mask, n, LAYOUT, N_STATES,
                                                     BLOCK_SIZE)  # fmt: skip

        if PASS == NORMS_PASS:
            tl.static_assert(RULE == LAMB)
            direction, _m, _v = lamb_direction(p_old, g, s0_old, s1_old, beta1, one_minus_beta1, beta2, one_minus_beta2,
                                               eps, weight_decay, bias_correction1, bias_correction2, DECAY)  # fmt: skip
            _store_trust_sums(sums_ptr, pid, p_old, direction, bad, mask)
        else:
            trust_factor = 1.0
            if TRUST:
                trust_factor = tl.load(trust_ptr)
            p, s0, s1, s2 = apply_rule(p_old, g, s0_old, s1_old, s2_old, trust_factor, beta1, one_minus_beta1, beta2,
                                       one_minus_beta2, beta3, one_minus_beta3, alpha, eps, weight_decay, decay_factor,
                                       step_size, bias_correction1, bias_correction2, bias_correction2_sqrt,
                                       one_minus_dampening, RULE, DECAY, TRUST, NESTEROV, FIRST_STEP)  # fmt: skip
            keep = bad[:, None] != 0
            s0 = tl.where(keep, s0_old, s0)
            s1 = tl.where(keep, s1_old, s1)
            s2 = tl.where(keep, s2_old, s2)
            if PASS == PEAKS_PASS:
                _store_peaks(peaks_ptr + N_STATES * pid, s0, s1, s2, mask, N_STATES)
            else:
                store_weights(p_ptr, c_ptr, p, offs, mask & (keep == 0), key, first, WEIGHTS, PARAM_BF16)
                store_states(s0_ptr, code0_ptr, rounding0_ptr, absmax0_ptr, s1_ptr, code1_ptr, rounding1_ptr, absmax1_ptr,
                             s2_ptr, code2_ptr, rounding2_ptr, absmax2_ptr, new_scales_ptr, s0, s1, s2, packed, offs, mask, rows,
                             row_mask, n, bad, states_key, states_first, LAYOUT, N_STATES, NEVER_NEGATIVE, STOCHASTIC_STATES,
                             BLOCK_SIZE)  # fmt: skip


# The kernel's float arguments are kernels.rules.Scalars, passed positionally in its order; its
# switches include every field of kernels.rules.Switches, upper-cased (launch.step_arguments).
_first_scalar = block_kernel.arg_names.index(Scalars._fields[0])
assert tuple(block_kernel.arg_names[_first_scalar : _first_scalar + len(Scalars._fields)]) == Scalars._fields
assert all(name.upper() in block_kernel.arg_names for name in Switches._fields)

# A batch table row holds the kernel's pointer arguments in its order, MAX_STATES states' worth.
assert block_kernel.arg_names[POINTERS - 1] == f"absmax{MAX_STATES - 1}_ptr" and block_kernel.arg_names[2] == "c_ptr"
