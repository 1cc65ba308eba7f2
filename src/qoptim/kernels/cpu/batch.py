"""Many small parameters in one kernel call: the CPU backend's ``update_many``.

A model's small tensors (biases, norms, small projections) each cost a Numba call of their own
on the one-at-a-time path: argument unboxing and the host-side preparation come to tens of
microseconds per tensor, far more than the update of a few thousand elements. Here the
parameters of one step that share a rule, a dtype, a state layout, hyperparameters and code
maps go to the kernels together: their addresses travel as one int64 array, the kernel views
each tensor's memory again (``numba.carray``) and runs the very task function of the
one-at-a-time path on it, so results are identical bit for bit.

Batched: fp32 states, block-wise 8-bit states and 4-bit states of tensors below ``BATCH_LIMIT``
elements, the quantized ones rounded to nearest or stochastically (each row its own draw).
Everything else (larger tensors, whose own call costs little next to their work; one-scale
8-bit states, which take two passes; LAMB and LARS, whose trust ratio needs a pass of its own)
takes the one-at-a-time path. A batch is cut into parts of at most ``PART`` elements (a
tensor's blocks split as a task of the one-at-a-time path splits them), and the threads share
the parts out evenly: a model's mid-size matrices go in the same call as its biases.
"""

from __future__ import annotations

from typing import Callable

import numba
import numpy as np
import torch
from numba import njit
from numba.core import types
from numba.extending import intrinsic, overload

from .. import reference
from ..rules import RULES
from ..types import BLOCK, Job, UpdateResult, one_state_draw, state_draw
from . import launch, paths
from .bits import ZERO
from .jit import JIT
from .four_bit import four_bit_task
from .layout import Layout, as_numpy, draw_args, flat_cpu, kernel_kind, kernel_stochastic, kernel_tables, padded, plan, weights_fit
from .nibbles import HALF_BLOCK, NO_DRAW, nibble_tables_of
from .rules import KERNEL_STATES, constants, marker_of
from .tables import tables_of
from .tasks import Pass, eight_bit_task, fp32_task

__all__ = ["BATCH_LIMIT", "PART", "parts", "task_bounds", "update_many"]

# Tensors below this many elements are batched; larger ones are worth a launch of their own.
BATCH_LIMIT = 1 << 22
# A batched tensor is cut into parts of at most this many elements (~0.1 ms of one thread's
# work), so that threads share a batch out evenly whatever its tensors' sizes.
PART = 1 << 17

# Columns of a batch's address table: param, grad, then (values, absmax) per state; then the
# parameter's weight format: its correction's address, its draw's key and first index; then the
# draw of its stochastically rounded states (one per job: the step's), key and first index.
_P, _G, _STATES = 0, 1, 2
_C, _KEY, _FIRST, _STATE_KEY, _STATE_FIRST = range(_STATES + 2 * KERNEL_STATES, _STATES + 2 * KERNEL_STATES + 5)


def update_many(jobs: list[Job], one: Callable[[Job, Layout | None], UpdateResult]) -> list[UpdateResult]:
    """``one(job, its layout)`` for every job (the one-at-a-time path, the layout from
    ``layout.plan``), but small tensors of like jobs in one call."""
    if len(jobs) == 1:  # nothing to batch with (gradient release's usual call): ``one`` checks it
        return [one(jobs[0], plan(jobs[0].rule, jobs[0].p, jobs[0].slots))]
    results: list[UpdateResult | None] = [None] * len(jobs)
    batches: dict[tuple, list[int]] = {}
    layouts: dict[int, Layout | None] = {}
    tables_seen: list = []  # the keys name tables by id(): alive until the end, no id is reused
    for job in jobs:  # a bad weight format is refused before any parameter changes
        reference.check_weights(job.p, job.weights)
    for i, job in enumerate(jobs):
        layouts[i] = layout = plan(job.rule, job.p, job.slots)
        key = _batch_key(job, layout, tables_seen)
        if key is None:
            results[i] = one(job, layout)
        else:
            batches.setdefault(key, []).append(i)
    for key, indices in batches.items():
        if len(indices) == 1:
            results[indices[0]] = one(jobs[indices[0]], layouts[indices[0]])
            continue
        for i, count in zip(indices, _run(key, [jobs[i] for i in indices])):
            results[i] = UpdateResult(skipped_blocks=int(count))
    return results


def _batch_key(job: Job, layout: Layout | None, tables_seen: list) -> tuple | None:
    """What jobs must share to run in one call, or None for the one-at-a-time path: a layout
    the kernels cover (``layout.plan``, which leaves out empty tensors: a rank's shard of a
    small parameter can be one), fp32, 8-bit in 256-blocks or 4-bit, the same maps and
    roundings (and 4-bit states the same shifts) and the same weight format (``_weight_form``);
    each row draws with its own key and first index."""
    rule, p, g, slots, hp, skip_nonfinite, weights = job
    if p.numel() >= BATCH_LIMIT or RULES[rule].trust:
        return None
    if layout not in (Layout.FP32, Layout.BLOCK, Layout.FOUR_BIT) or not flat_cpu(g, p.dtype, p.numel()) or not weights_fit(p, weights):
        return None
    if not one_state_draw(slots):  # (a batch row holds one states' draw: the step's)
        return None
    states = (layout,)
    if layout == Layout.BLOCK:  # and the maps, by their tables, and which states round stochastically
        tables = [tables_of(s.code) for s in slots]
        tables_seen += tables  # the key names them by id(): alive until the batches ran
        states += tuple((id(t), s.draw is not None) for t, s in zip(tables, slots))
    if layout == Layout.FOUR_BIT:  # the maps by their tables, and where each state's code sits in a byte
        tables = [nibble_tables_of(s.code) for s in slots]
        tables_seen += tables
        states += tuple((id(t), s.shift, s.draw is not None) for t, s in zip(tables, slots))
    # gnorm_scale travels per tensor (percentile clipping scales each gradient on its own)
    hp = hp if hp.gnorm_scale == 1.0 else hp._replace(gnorm_scale=1.0)
    return rule, p.dtype, states, hp, bool(skip_nonfinite), _weight_form(job)


def _weight_form(job: Job) -> str | torch.dtype:
    """A job's weight format as the kernels compile it: "nearest" (an fp32 parameter's draw is
    ignored), "stochastic", or the dtype of its master's correction."""
    if job.p.dtype == torch.float32:
        return "nearest"
    if job.weights.correction is not None:
        return job.weights.correction.dtype
    return "stochastic" if job.weights.draw is not None else "nearest"


def _form_marker(form: str | torch.dtype):
    """The batch tasks' argument that tells them a weight form (``_weights_view``)."""
    if form == "nearest":
        return None
    if form == "stochastic":
        return np.int64(0)
    return torch.empty(0, dtype=form).numpy()  # (an empty array of the correction's dtype)


def _run(key: tuple, jobs: list[Job]) -> np.ndarray:
    """One call for the jobs of one batch key; returns each job's skipped-block count."""
    rule, _, (layout, *_), hp, skip, form = key
    addresses = np.array([_addresses(job) for job in jobs], dtype=np.int64)
    sizes = np.array([job.p.numel() for job in jobs], dtype=np.int64)
    gscales = np.array([job.hp.gnorm_scale for job in jobs], dtype=np.float32)
    table = parts(sizes)
    ntasks = min(launch.tasks_for(int(sizes.sum())), len(table))
    like = as_numpy(jobs[0].p[:0])  # an empty array of the kernels' view of the parameter dtype
    like = (like, _form_marker(form))
    args = (task_bounds(table[:, _PART_SIZE], ntasks), table, marker_of(rule), like, addresses, sizes, gscales, constants(rule, hp), skip)
    per_task = np.zeros(ntasks, dtype=np.int64)
    per_part = np.zeros(len(table), dtype=np.int64)
    kind = kernel_kind(layout, jobs[0].slots)  # (the jobs of a key draw alike: ``_batch_key``)
    if layout == Layout.FP32:
        launch.run(fp32_batch_task, ntasks, per_task, (*args, per_part))
    elif layout == Layout.FOUR_BIT:
        tables = padded(tuple((*nibble_tables_of(s.code), s.shift, s.draw is not None) for s in jobs[0].slots))
        paths.on_best_path(lambda path: launch.run(four_bit_batch_task, ntasks, per_task, (*args, *tables, path, per_part)), kind)
    else:
        tables = padded(tuple(_eight_bit_tables(s) for s in jobs[0].slots))
        paths.on_best_path(lambda path: launch.run(eight_bit_batch_task, ntasks, per_task, (*args, *tables, path, per_part)), kind)
    skipped = np.zeros(len(jobs), dtype=np.int64)
    np.add.at(skipped, table[:, _PART_JOB], per_part)
    return skipped


def _eight_bit_tables(slot) -> tuple:
    """An 8-bit state's map tables as the batch tasks take them (``_8bit_state``): its nearest
    and stochastic tables (``layout.kernel_tables``, ``layout.kernel_stochastic``), and whether
    it rounds stochastically."""
    tables = kernel_tables(tables_of(slot.code))
    return tables, kernel_stochastic(slot.code, tables), slot.draw is not None


# Columns of a batch's parts table: the job, which part of it, of how many, and its size.
_PART_JOB, _PART_INDEX, _PART_COUNT, _PART_SIZE = range(4)


def parts(sizes: np.ndarray) -> np.ndarray:
    """The parts of a batch (``PART``): a row (job, part, parts, elements) each."""
    counts = -(-sizes // PART)
    job = np.repeat(np.arange(len(sizes)), counts)
    first = np.cumsum(counts) - counts
    index = np.arange(len(job)) - first[job]
    return np.stack([job, index, counts[job], -(-sizes[job] // counts[job])], axis=1).astype(np.int64)


def _addresses(job: Job) -> list[int]:
    """The job's memory: param, grad, then each state's codes (or values) and scales; states
    past the rule's count repeat the first (the kernels never touch them)."""
    row = [job.p.data_ptr(), job.g.data_ptr()]
    for slot in job.slots:
        row += [slot.values.data_ptr(), slot.absmax.data_ptr() if slot.absmax is not None else 0]
    while len(row) < _STATES + 2 * KERNEL_STATES:
        row += row[_STATES : _STATES + 2]
    correction, draw = job.weights
    row.append(0 if correction is None else correction.data_ptr())
    return row + [*draw_args(draw), *draw_args(state_draw(job.slots))]


def task_bounds(sizes: np.ndarray, ntasks: int) -> np.ndarray:
    """Split a batch's parts (of ``sizes`` elements) into ``ntasks`` runs with about equal
    element counts."""
    if ntasks == 1:
        return np.array([0, len(sizes)], dtype=np.int64)
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, ntasks) / ntasks, side="left") + 1
    return np.concatenate(([0], np.minimum(cuts, len(sizes)), [len(sizes)])).astype(np.int64)


# ---- kernels -----------------------------------------------------------------------------


@intrinsic
def _pointer(typingctx, address, like):
    """``address`` (an int64) as a pointer to elements of ``like``'s dtype (an array, or a
    numpy scalar type)."""
    dtype = like.dtype if isinstance(like, types.Array) else like.instance_type
    pointer = types.CPointer(dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(**JIT)
def _view(address, n, like):
    return numba.carray(_pointer(address, like), n)


@njit(**JIT)
def _8bit_state(row, k, n, tables):
    """State ``k`` of the tensor at ``row`` as the one-at-a-time kernels take it (``tables``: its
    map tables, nearest and stochastic, and whether it rounds stochastically: ``_eight_bit_tables``)."""
    tables, stochastic, drawn = tables
    values = _view(row[_STATES + 2 * k], n, np.uint8)
    absmax = _view(row[_STATES + 2 * k + 1], (n + BLOCK - 1) // BLOCK, np.float32)
    key = row[_STATE_KEY] if drawn else NO_DRAW
    return values, absmax, tables, stochastic, key, row[_STATE_FIRST]


@njit(**JIT)
def _4bit_state(row, k, n, tables):
    """4-bit state ``k`` of the tensor at ``row`` as the one-at-a-time kernels take it
    (``tables``: its map tables, shift and whether it rounds stochastically)."""
    code, mids, table, uppers, bounds, steps, linear, shift, stochastic = tables
    values = _view(row[_STATES + 2 * k], n, np.uint8)
    absmax = _view(row[_STATES + 2 * k + 1], (n + HALF_BLOCK - 1) // HALF_BLOCK, np.float32)
    key = row[_STATE_KEY] if stochastic else NO_DRAW
    return values, absmax, code, mids, table, uppers, bounds, steps, linear, shift, key, row[_STATE_FIRST]


# The layout and pass of a batch's 8-bit tasks (ints: see ``layout.Layout``)
_BLOCK, _STEP = int(Layout.BLOCK), int(Pass.STEP)

# The batch tasks run on the CPU backend's worker threads (``launch.run``): without the GIL.
_TASK = dict(nogil=True, **JIT)


def _weights_view(row, n, like):
    """The parameter at ``row`` as the tasks take it (``weights``, ``layout.weight_view``),
    ``like`` = (an empty array of its kernel dtype, ``_form_marker``)."""


@overload(_weights_view, jit_options=JIT)
def _weights_view_impl(row, n, like):
    form = like[1]
    if isinstance(form, types.NoneType):
        return lambda row, n, like: (_view(row[_P], n, like[0]),)
    if isinstance(form, types.Array):
        return lambda row, n, like: (_view(row[_P], n, like[0]), _view(row[_C], n, like[1]))
    return lambda row, n, like: (_view(row[_P], n, like[0]), row[_KEY], row[_FIRST])


@njit(**JIT)
def _part(k, parts, addresses, sizes, like):
    """Part ``k`` of a batch: its tensor's index, address row and size, which part of how
    many it is, and the tensor's parameter (its view: ``_weights_view``) and gradient."""
    i, part, count = parts[k, _PART_JOB], parts[k, _PART_INDEX], parts[k, _PART_COUNT]
    row, n = addresses[i], sizes[i]
    return i, row, n, part, count, _weights_view(row, n, like), _view(row[_G], n, like[0])


@njit(**_TASK)
def eight_bit_batch_task(t, ntasks, bounds, parts, rule, like, addresses, sizes, gscales, k, skip, t0, t1, t2, path, skipped):
    """The parts of task ``t``, one after the other (each a task of the one-at-a-time path
    on its tensor); skipped[part] = the blocks it skipped; returns their sum."""
    inverse = (ZERO, ZERO, ZERO)  # unused: block-wise scales are computed per block
    peaks = np.zeros((1, 3), np.float32)  # unused: written by a one-scale first pass only
    total = 0
    for j in range(bounds[t], bounds[t + 1]):
        i, row, n, part, count, p, g = _part(j, parts, addresses, sizes, like)
        s0, s1, s2 = _8bit_state(row, 0, n, t0), _8bit_state(row, 1, n, t1), _8bit_state(row, 2, n, t2)
        skipped[j] = eight_bit_task(part, count, rule, p, g, s0, s1, s2, gscales[i], k, skip, _BLOCK, _STEP, inverse, path, peaks)
        total += skipped[j]
    return total


@njit(**_TASK)
def fp32_batch_task(t, ntasks, bounds, parts, rule, like, addresses, sizes, gscales, k, skip, skipped):
    """``eight_bit_batch_task`` for fp32 states."""
    total = 0
    for j in range(bounds[t], bounds[t + 1]):
        i, row, n, part, count, p, g = _part(j, parts, addresses, sizes, like)
        s0, s1, s2 = _view(row[_STATES], n, np.float32), _view(row[_STATES + 2], n, np.float32), _view(row[_STATES + 4], n, np.float32)
        skipped[j] = fp32_task(part, count, rule, p, g, s0, s1, s2, gscales[i], k, skip)
        total += skipped[j]
    return total


@njit(**_TASK)
def four_bit_batch_task(t, ntasks, bounds, parts, rule, like, addresses, sizes, gscales, k, skip, t0, t1, t2, path, skipped):
    """``eight_bit_batch_task`` for 4-bit states."""
    total = 0
    for j in range(bounds[t], bounds[t + 1]):
        i, row, n, part, count, p, g = _part(j, parts, addresses, sizes, like)
        s0, s1, s2 = _4bit_state(row, 0, n, t0), _4bit_state(row, 1, n, t1), _4bit_state(row, 2, n, t2)
        skipped[j] = four_bit_task(part, count, rule, p, g, s0, s1, s2, gscales[i], k, skip, path)
        total += skipped[j]
    return total
