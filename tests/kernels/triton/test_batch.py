"""The Triton backend's ``update_many``: small tensors of like jobs in one launch, against one
launch per tensor, bit for bit, under Triton's interpreter (``TRITON_INTERPRET=1``, see
``support.interpreter``).

One launch per tensor is checked against the reference in ``test_rules.py``, so here a batch only
has to match it: every bit of parameters, 8-bit codes, block scales and fp32 states, and each
tensor's skipped-block count.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import (INTERPRETER_MARKS, INTERPRETING, RULES, assert_same_state, copy_state, count_calls, dtype_id, fresh,
                     gradient, hyper)  # fmt: skip

from qoptim.kernels import reference, rules
from qoptim.kernels.types import BLOCK, Job, StateSlot
from qoptim.quant.maps import signed_map

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)
from qoptim.kernels.triton import batch, launch  # noqa: E402

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

BATCHED_RULES = tuple(rule for rule in RULES if not rules.RULES[rule].trust)  # a trust ratio takes launches of its own
SIZES = (1, 255, 257, 1000, 3000)  # a partial block, one past a block, several blocks
STEPS = 3


def own_maps(p: torch.Tensor, slots: list[StateSlot]) -> tuple[torch.Tensor, list[StateSlot]]:
    """Every 8-bit state with a copy of its map of its own (the optimizers share one map per
    kind and device; other callers may not): a batch must read each tensor's map from its table row."""
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
    p, slots = copy_state(job_.p, job_.slots)
    return job_._replace(p=p, slots=slots)


def one_at_a_time(job_: Job):
    """What a job gives on its own: one launch, or the reference where the backend has none."""
    return (tk.update if tk.supports(job_.rule, job_.p, job_.slots) else reference.update)(*job_)


def assert_same_update(batched: list[Job], single: list[Job], batched_results, single_results) -> None:
    for ours, theirs, ours_result, their_result in zip(batched, single, batched_results, single_results, strict=True):
        assert int(ours_result.skipped_blocks) == int(their_result.skipped_blocks)
        assert_same_state(ours.p, ours.slots, theirs.p, theirs.slots, f"{ours.rule} of {ours.p.numel()}:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["blockwise", "fp32"])  # the batched layouts
@pytest.mark.parametrize("rule", BATCHED_RULES)
def test_batch_matches_one_launch_per_tensor(monkeypatch, rule, layout, dtype):
    """A step of tensors of several sizes in one launch, with per-tensor gradient scales and
    skipped blocks, gives what a launch per tensor gives."""
    batches = count_calls(monkeypatch, batch, "run")
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


def test_mixed_jobs_split_into_batches_and_launches_of_their_own(monkeypatch):
    monkeypatch.setattr(batch, "BATCH_LIMIT", 2048)
    batches = count_calls(monkeypatch, batch, "run")
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


def test_skipped_blocks_are_counted_per_tensor():
    tensors = [fresh("adam", n, "blockwise", torch.float32) for n in (4 * BLOCK, 3 * BLOCK, 10)]
    grads = [torch.randn(p.numel()) * 0.01 for p, _ in tensors]
    grads[0][[5, 3 * BLOCK + 1]] = math.nan  # two blocks
    grads[2][9] = -math.inf  # the one block
    hp = hyper("adam", 1)
    results = tk.update_many([Job("adam", p, g, slots, hp) for (p, slots), g in zip(tensors, grads)])
    assert [int(r.skipped_blocks) for r in results] == [2, 0, 1]
    assert all(r.skipped_blocks.dtype == torch.int64 for r in results)


def test_a_batch_keeps_the_search_tables_it_points_to(monkeypatch):
    """The batch table holds raw addresses of cached search tables; a cache that clears itself
    while the table is built (here: at every new map) must not free one before the launch
    (memory taken by other tensors in between would be read as midpoints)."""
    monkeypatch.setattr(launch, "SEARCH_TABLES_MAX", 2)
    litter = []
    upload = batch.upload

    def upload_then_take_freed_memory(*args):
        uploaded = upload(*args)
        litter.extend(torch.full((256,), math.nan) for _ in range(64))  # the size of a search table
        return uploaded

    monkeypatch.setattr(batch, "upload", upload_then_take_freed_memory)
    tensors = [own_maps(*started("adam", n, "blockwise", torch.float32)) for n in SIZES]
    jobs = [job("adam", p, slots, 1, i) for i, (p, slots) in enumerate(tensors)]
    single = [twin(j) for j in jobs]
    results = tk.update_many(jobs)
    assert litter  # the batch went through upload
    assert_same_update(jobs, single, results, [tk.update(*j) for j in single])
