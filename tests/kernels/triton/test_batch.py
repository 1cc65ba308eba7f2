"""The Triton backend's ``update_many``: small tensors of like jobs in one launch, against one
launch per tensor, bit for bit, under Triton's interpreter.

As test_triton_kernel.py (whose cases and helpers this file builds on) this file has two faces:
in a normal pytest run it holds ``test_interpreted``, which runs the cases below in a child
pytest process with ``TRITON_INTERPRET=1``; in that child it holds the cases. One launch per
tensor is checked against the reference there, so here a batch only has to match it: every bit
of parameters, 8-bit codes, block scales and fp32 states, and each tensor's skipped-block count.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_triton_kernel import INTERPRETING, assert_same, copy, count_calls, fresh, gradient, hyper, run_interpreted

from qoptim.kernels.types import BLOCK, Job, StateSlot
from qoptim.quant.maps import signed_map

BATCHED_RULES = ("adam", "ademamix", "lion", "momentum", "rmsprop", "adagrad")
SIZES = (1, 255, 257, 1000, 3000)  # a partial block, one past a block, several blocks
STEPS = 3

if INTERPRETING:
    from test_triton_kernel import pytestmark  # noqa: F401  the same expected numpy warnings, on NaN / Inf lanes

    from qoptim.kernels import reference, triton_batch
    from qoptim.kernels import triton as tk


def interpreted():
    """This file's cases in a child pytest process that interprets Triton."""
    run_interpreted(__file__)


# ---- the cases ------------------------------------------------------------------------


def own_maps(p: torch.Tensor, slots: list[StateSlot]) -> tuple[torch.Tensor, list[StateSlot]]:
    """Every 8-bit state with a copy of its map of its own, as the optimizers give each CUDA
    parameter: a batch must read each tensor's map from its table row."""
    for slot in slots:
        if slot.quantized:
            slot.code = slot.code.clone()
    return p, slots


def started(rule: str, n: int, layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[StateSlot]]:
    """A parameter with random states of ``rule`` in ``layout`` (non-negative fp32 values, fit
    for any state): a map decodes them, where zero states would decode alike in any map."""
    p, slots = fresh(rule, n, layout, dtype)
    for slot in slots:
        if slot.quantized:
            slot.values.random_(0, 256)
            slot.absmax.uniform_(0.01, 0.1)
        else:
            slot.values.uniform_(0.0, 0.01)
    return p, slots


def job(rule, p, slots, step, index=0, skip_nonfinite=True, **changes) -> Job:
    """A job of ``rule`` on ``p``: a gradient with NaN / Inf in places that depend on the step
    and the tensor, and percentile clipping's gradient scale on every other tensor."""
    g = gradient(p.numel(), p.dtype, step + index)
    hp = hyper(rule, step)._replace(gnorm_scale=0.37 if (index + step) % 2 else 1.0, **changes)
    return Job(rule, p, g, slots, hp, skip_nonfinite)


def twin(job_: Job) -> Job:
    """The same job on copies of its parameter and states."""
    p, slots = copy(job_.p, job_.slots)
    return job_._replace(p=p, slots=slots)


def one_at_a_time(job_: Job):
    """What a job gives on its own: one launch, or the reference where the backend has none."""
    return (tk.update if tk.supports(job_.rule, job_.p, job_.slots) else reference.update)(*job_)


def assert_same_update(batched: list[Job], single: list[Job], batched_results, single_results) -> None:
    for ours, theirs, ours_result, their_result in zip(batched, single, batched_results, single_results):
        assert int(ours_result.skipped_blocks) == int(their_result.skipped_blocks)
        assert_same(ours.p, theirs.p)
        for mine, other in zip(ours.slots, theirs.slots):
            assert_same(mine.values, other.values)
            if mine.quantized:
                assert_same(mine.absmax, other.absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", ["blockwise", "fp32"])
@pytest.mark.parametrize("rule", BATCHED_RULES)
def batch_matches_one_launch_per_tensor(monkeypatch, rule, layout, dtype):
    """A step of tensors of several sizes in one launch, with per-tensor gradient scales and
    skipped blocks, gives what a launch per tensor gives."""
    batches = count_calls(monkeypatch, triton_batch, "run")
    tensors = [own_maps(*fresh(rule, n, layout, dtype)) for n in SIZES]
    for step in range(1, STEPS + 1):
        jobs = [job(rule, p, slots, step, i) for i, (p, slots) in enumerate(tensors)]
        single = [twin(j) for j in jobs]
        results = tk.update_many(jobs)
        assert_same_update(jobs, single, results, [tk.update(*j) for j in single])
        assert len(batches) == step and len(batches[-1][0]) == len(SIZES)  # all of them in one launch
        tensors = [(j.p, j.slots) for j in jobs]


def a_mixed_step() -> list[Job]:
    """Jobs of one step: three batches of two (one of them not skipping non-finite gradients),
    interleaved with jobs that take launches of their own or the reference."""
    other_map = signed_map().clone()
    other_map[1:-1] *= 0.9  # still sorted, within [-1, 1]
    p, slots = started("adam", 700, "blockwise", torch.float32)
    slots[0].code = other_map  # a map of its own in a batch
    fp64_states = [StateSlot(torch.zeros(300)) for _ in range(2)]
    mixed_p, mixed_slots = started("adam", 300, "blockwise", torch.float32)
    mixed_slots[1] = StateSlot(torch.zeros(300))  # one 8-bit state, one fp32
    empty, empty_slots = fresh("adam", 0, "blockwise", torch.float32)
    return [
        job("adam", p, slots, 2, 1),
        job("lamb", *started("lamb", 500, "fp32", torch.float32), 2),  # trust ratio: launches of its own
        job("adam", *started("adam", 40, "blockwise", torch.float32), 2, 2),  # finite gradient: reads its map
        job("lion", *started("lion", 300, "fp32", torch.bfloat16), 2, 0, skip_nonfinite=False),
        job("adam", *started("adam", 3000, "blockwise", torch.float32), 2, 2),  # over the (lowered) batch limit
        job("adam", *started("adam", 300, "blockwise", torch.float32), 2, 3, lr=5e-4),  # other hyperparameters
        job("adam", *started("adam", 600, "whole_tensor", torch.float32), 2),  # whole-tensor scales: a pass for the peaks
        job("adam", torch.randn(300, dtype=torch.float64), fp64_states, 2),  # no kernel: the reference
        job("adam", mixed_p, mixed_slots, 2),  # no kernel: the reference
        job("lion", *started("lion", 1000, "fp32", torch.bfloat16), 2, 1, skip_nonfinite=False),
        Job("adam", empty, torch.zeros(0), empty_slots, hyper("adam", 2)),
        job("lars", *started("lars", 600, "blockwise", torch.float16), 2),  # trust ratio
        job("adam", *started("adam", 257, "blockwise", torch.float32), 2, 4, lr=5e-4),
        job("rmsprop", *started("rmsprop", 100, "fp32", torch.float16), 2),  # a batch key of its own: a plain launch
    ]


def mixed_jobs_split_into_batches_and_launches_of_their_own(monkeypatch):
    monkeypatch.setattr(triton_batch, "BATCH_LIMIT", 2048)
    batches = count_calls(monkeypatch, triton_batch, "run")
    jobs = a_mixed_step()
    single = [twin(j) for j in jobs]
    results = tk.update_many(jobs)
    assert_same_update(jobs, single, results, [one_at_a_time(j) for j in single])
    assert sorted(len(call[0]) for call in batches) == [2, 2, 2]
    batched = {id(j.p) for call in batches for j in call[0]}
    for j, result in zip(jobs, results):
        if id(j.p) in batched and j.skip_nonfinite:  # a device counter, read once per step by the optimizer
            assert isinstance(result.skipped_blocks, torch.Tensor) and result.skipped_blocks.dim() == 0
        elif id(j.p) in batched:
            assert result.skipped_blocks == 0


def skipped_blocks_are_counted_per_tensor():
    tensors = [fresh("adam", n, "blockwise", torch.float32) for n in (4 * BLOCK, 3 * BLOCK, 10)]
    grads = [torch.randn(p.numel()) * 0.01 for p, _ in tensors]
    grads[0][[5, 3 * BLOCK + 1]] = math.nan  # two blocks
    grads[2][9] = -math.inf  # the one block
    hp = hyper("adam", 1)
    results = tk.update_many([Job("adam", p, g, slots, hp) for (p, slots), g in zip(tensors, grads)])
    assert [int(r.skipped_blocks) for r in results] == [2, 0, 1]
    assert all(r.skipped_blocks.dtype == torch.int64 for r in results)


def a_batch_keeps_the_search_tables_it_points_to(monkeypatch):
    """The batch table holds raw addresses of cached search tables; a cache that clears itself
    while the table is built (here: at every new map) must not free one before the launch
    (memory taken by other tensors in between would be read as midpoints)."""
    from qoptim.kernels import triton_block

    monkeypatch.setattr(triton_block, "_SEARCH_TABLES_MAX", 2)
    litter = []
    upload = triton_batch._upload

    def upload_then_take_freed_memory(*args):
        uploaded = upload(*args)
        litter.extend(torch.full((256,), math.nan) for _ in range(64))  # the size of a search table
        return uploaded

    monkeypatch.setattr(triton_batch, "_upload", upload_then_take_freed_memory)
    tensors = [own_maps(*started("adam", n, "blockwise", torch.float32)) for n in SIZES]
    jobs = [job("adam", p, slots, 1, i) for i, (p, slots) in enumerate(tensors)]
    single = [twin(j) for j in jobs]
    results = tk.update_many(jobs)
    assert litter  # the batch went through _upload
    assert_same_update(jobs, single, results, [tk.update(*j) for j in single])


# Which face this file shows to pytest (see the module docstring).
if INTERPRETING:
    test_batch_matches_one_launch_per_tensor = batch_matches_one_launch_per_tensor
    test_mixed_jobs_split_into_batches_and_launches_of_their_own = mixed_jobs_split_into_batches_and_launches_of_their_own
    test_skipped_blocks_are_counted_per_tensor = skipped_blocks_are_counted_per_tensor
    test_a_batch_keeps_the_search_tables_it_points_to = a_batch_keeps_the_search_tables_it_points_to
else:
    test_interpreted = interpreted
