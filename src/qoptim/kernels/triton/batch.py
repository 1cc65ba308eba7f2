"""Many small parameters in one launch of the block kernel: the CUDA backend's ``update_many``.

A launch costs tens of microseconds of host time (argument handling, the driver) where a small
tensor's update takes about one on the GPU: a model's hundreds of biases, norms and small
projections would spend the optimizer step launching kernels. Here the parameters of a step that
share a rule, a dtype, a state layout, a weight format (a master of one width, stochastic
rounding, or neither), which states round stochastically, and the kernel's float arguments and
switches (each tensor's gradient scale and draws aside) go in one launch of the block kernel in
its ``BATCHED`` mode.

A batch's one int64 buffer, built on the host and copied to the device in one transfer:
  * the table, a row per tensor (``block.TABLE_COLUMNS``): the kernel's pointer arguments
    (param, grad, master correction, each state's values, code map, rounding table and scales), the
    element count, the tensor's first program, its gradient scale (percentile clipping's, per
    tensor), and the key and first index of its weight's draw and of its states' (stochastic
    rounding: a key per parameter);
  * the owner of each program (a row of the table): every tensor gets whole programs of ``ROWS``
    blocks, so each tile lies within one tensor and the tile code is that of a launch of its
    own: the same result, bit for bit;
  * a zeroed skipped-block counter per tensor: the results are 0-d views of them, read by the
    optimizer once per step.
Code maps travel per tensor rather than being something a batch shares: the optimizers share
one map per kind and device, but the seam does not promise it (each ``StateSlot`` carries its
own map, and other callers may give each tensor a map of its own).

Batched: fp32, block-wise 8-bit and 4-bit states of parameters below ``BATCH_LIMIT`` elements. The rest
takes launches of its own (``qoptim.kernels.triton.update``): large tensors (their launch costs little next to
their work), the whole-tensor 8-bit layout (a pass for the peaks, then each tensor's new scale),
LAMB and LARS (a pass for the norms, then each tensor's trust ratio).
"""

from __future__ import annotations

import numpy as np
import torch

from ..rules import RULES
from ..types import BLOCK, Job, state_draw
from .block import (DRAW_FIRST_COLUMN, DRAW_KEY_COLUMN, FIRST_PROGRAM_COLUMN, GNORM_SCALE_COLUMN, N_COLUMN, POINTERS,
                    STATE_FIRST_COLUMN, STATE_KEY_COLUMN, STEP_PASS, TABLE_COLUMNS, block_kernel)  # fmt: skip
from .launch import (LAUNCH_OPTIONS, draw_args, layout_of, pointer_args, rows_per_program, step_arguments,
                     stochastic_mask, weight_switch)  # fmt: skip
from .states import BLOCKWISE_4BIT, BLOCKWISE_8BIT, FP32_STATES

__all__ = ["BATCH_LIMIT", "batch_key", "run", "upload"]

# Parameters below this many elements are batched: ~10 MB of traffic for a larger one, a few
# microseconds of GPU time, is enough to hide the host time of its own launch.
BATCH_LIMIT = 1 << 20

_BATCHED_LAYOUTS = (FP32_STATES.value, BLOCKWISE_8BIT.value, BLOCKWISE_4BIT.value)


def batch_key(job: Job) -> tuple | None:
    """What jobs must share to go in one launch (and so the kernel's switches and float
    arguments), or None for launches of their own (``job`` is one the backend supports)."""
    rule, p, slots, hp, skip_nonfinite = job.rule, job.p, job.slots, job.hp, job.skip_nonfinite
    layout = layout_of(slots[0])
    if RULES[rule].trust or layout not in _BATCHED_LAYOUTS or not 0 < p.numel() < BATCH_LIMIT:
        return None
    # the gradient scale travels per tensor (percentile clipping scales each gradient on its own),
    # and so do draws (a key per parameter); a weight format and the states' roundings are switches
    # of the kernel
    return (rule, p.device, p.dtype, layout, hp._replace(gnorm_scale=1.0), bool(skip_nonfinite), weight_switch(p, job.weights),
            stochastic_mask(slots))  # fmt: skip


def run(jobs: list[Job]) -> tuple[torch.Tensor, ...]:
    """One launch for the jobs of one batch key; each job's skipped-block count, as a 0-d int64
    device tensor."""
    first = jobs[0]
    scalars, flags = step_arguments(RULES[first.rule], first.p, first.slots, first.hp, first.skip_nonfinite, first.weights)
    flags["SCALE_GRAD"] = any(job.hp.gnorm_scale != 1.0 for job in jobs)  # x * 1.0 is x: the others lose nothing
    sizes = np.array([job.p.numel() for job in jobs], dtype=np.int64)
    rows = rows_per_program(-(-int(sizes.max()) // BLOCK))
    programs = -(-sizes // (rows * BLOCK))  # whole programs per tensor
    # the tensors behind the table's pointers, held until the launch is queued (memory freed
    # after that is reused only by work queued later): among them are cached search tables,
    # which the cache clearing itself while the table is built would otherwise free
    tensors = [pointer_args(job.p, job.g, job.slots, job.weights) for job in jobs]
    table, owner, skipped = upload(jobs, tensors, sizes, programs, first.p.device)
    types_only = tensors[0]  # the kernel reads each tensor's pointers from the table
    other_passes = [skipped] * 4  # new scales, peaks, sums, trust factor: unread placeholders
    grid = (int(programs.sum()),)
    sizes_and_draws = [0] * 6  # n, n_blocks, the weight's and the states' draws: each tensor's own, in the table
    block_kernel[grid](*types_only, *other_passes, skipped, table, owner, *sizes_and_draws, *scalars, PASS=STEP_PASS.value,
                       ROWS=rows, BATCHED=True, **flags, **LAUNCH_OPTIONS)  # fmt: skip
    return skipped.unbind()


def upload(jobs: list[Job], tensors: list, sizes: np.ndarray, programs: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """The batch's table (the addresses of each job's ``tensors``), program owners and zeroed
    skip counters on ``device``: views of one int64 buffer, copied there in one transfer."""
    table = np.empty((len(jobs), TABLE_COLUMNS.value), dtype=np.int64)
    table[:, :POINTERS] = [[arg.data_ptr() for arg in args] for args in tensors]
    table[:, N_COLUMN.value] = sizes
    table[:, FIRST_PROGRAM_COLUMN.value] = np.cumsum(programs) - programs
    table[:, GNORM_SCALE_COLUMN.value] = np.array([job.hp.gnorm_scale for job in jobs], dtype=np.float32).view(np.int32)
    table[:, [DRAW_KEY_COLUMN.value, DRAW_FIRST_COLUMN.value]] = [draw_args(job.weights.draw) for job in jobs]
    table[:, [STATE_KEY_COLUMN.value, STATE_FIRST_COLUMN.value]] = [draw_args(state_draw(job.slots)) for job in jobs]
    owner = np.repeat(np.arange(len(jobs), dtype=np.int64), programs)
    counters = np.zeros(len(jobs), dtype=np.int64)
    buffer = _to_device(np.concatenate([table.ravel(), owner, counters]), device)
    return list(buffer.split([table.size, owner.size, counters.size]))


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    staged = torch.from_numpy(host)
    if device.type == "cuda":  # from pinned memory the copy is queued behind the step's work, with no wait for it
        staged = staged.pin_memory()
    return staged.to(device, non_blocking=True)
