"""The weight formats of issue #17 in the Triton kernels (``kernels.types.WeightFormat``: a 24- or
32-bit master held by a bf16 / fp16 weight and its correction, or stochastic rounding) against the
reference, bit for bit (the correction too), under Triton's interpreter (``TRITON_INTERPRET=1``,
see ``support.interpreter``): every rule, layout, 16-bit dtype and format, odd sizes, NaN / Inf
gradients (skipped blocks keep weight and correction), the trust ratio's norms (of the master),
many small tensors of mixed formats in batches, and the encoding's edge values.

As in ``test_rules.py``, LAMB's and LARS's steps are checked given the reference's trust ratio
(the kernel's own float64 sums add in another order; ``test_trust_ratio_reads_the_master`` checks
that ratio on its own).
"""

from __future__ import annotations

import math

import pytest
import torch
from support import (INTERPRETER_MARKS, INTERPRETING, LAYOUTS, RULES, TRUST_RULES, assert_backend_matches_reference,
                     assert_same, assert_same_state, copy_state, count_calls, dtype_id, fresh, gradient,
                     hyper)  # fmt: skip
from support.weights import HALF_DTYPES, WEIGHT_CASES, WeightCase

from qoptim.kernels import reference, rules
from qoptim.kernels.types import BLOCK, NEAREST, Job, WeightFormat
from qoptim.quant import master

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)
from support.triton_oracle import oracle  # noqa: E402,F401  (the fixture)
from qoptim.kernels.triton import batch  # noqa: E402
from qoptim.kernels.triton.launch import weight_switch  # noqa: E402

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

# a partial block, one past a block, many blocks and a partial one: the number of steps of each
# (NaN / Inf gradients on steps 2, 3 and 5, support.cases.gradient; on 5 in two blocks)
SIZE_STEPS = {1: 3, 255: 3, 257: 3, 4097: 5}
CASE_IDS = [case.name for case in WEIGHT_CASES]
NEAREST_CASE = WeightCase("nearest", None, False)  # no master, no draw: rounded to nearest even


def check_steps(rule: str, n: int, layout: str, dtype: torch.dtype, case: WeightCase, steps: int) -> None:
    """``steps`` steps of the kernel and of the reference in ``case``'s format, side by side."""
    p, slots = fresh(rule, n, layout, dtype)
    run = ((gradient(n, dtype, step), hyper(rule, step)) for step in range(1, steps + 1))
    skipped = assert_backend_matches_reference(tk.update, rule, p, slots, run, True, weights=case)
    if n > 4 * BLOCK and steps >= 5:
        assert skipped[4] == 2  # step 5: two blocks with a NaN


def rotated(rule_index: int, case_index: int) -> tuple[str, torch.dtype]:
    """The layout and dtype of a (rule, case) in the sampled cross: each case meets every layout
    and dtype together over the rules, each rule every layout and both dtypes over the cases."""
    k = (rule_index + case_index) % 6
    return LAYOUTS[k % 3], HALF_DTYPES[k % 2]


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_matches_reference_at_every_size(oracle, rule, case):
    """Odd sizes and steps with NaN / Inf gradients, in a layout and dtype that rotate
    (``rotated``); ``test_every_combination_matches_reference`` crosses all of them on one size."""
    layout, dtype = rotated(RULES.index(rule), WEIGHT_CASES.index(case))
    for n, steps in SIZE_STEPS.items():
        check_steps(rule, n, layout, dtype, case, steps)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES)
def test_every_combination_matches_reference(oracle, rule, layout, dtype, case):
    """Every rule x layout x 16-bit dtype x format: two steps of 600 elements (the second with a
    NaN gradient: a skipped block)."""
    check_steps(rule, 600, layout, dtype, case, steps=2)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=CASE_IDS)
def test_a_skipped_block_keeps_its_weight_and_correction(case):
    n = 4 * BLOCK
    p, slots = fresh("adam", n, "blockwise", torch.bfloat16)
    correction = case.start(p)
    g = torch.randn(n).bfloat16() * 0.01
    tk.update("adam", p, g, slots, hyper("adam", 1), True, case.at(correction, hyper("adam", 1)))  # non-trivial states
    before = p.clone(), None if correction is None else correction.clone()
    g[BLOCK + 5] = math.inf
    hp = hyper("adam", 2)
    assert tk.update("adam", p, g, slots, hp, True, case.at(correction, hp)).skipped_blocks == 1
    kept, moved = slice(BLOCK, 2 * BLOCK), slice(0, BLOCK)
    assert torch.equal(p[kept].view(torch.int16), before[0][kept].view(torch.int16))
    if correction is not None:
        assert torch.equal(correction[kept], before[1][kept])
        assert not torch.equal(correction[moved], before[1][moved])  # the master moved below the weight
    else:
        assert not torch.equal(p[moved], before[0][moved])


@pytest.mark.parametrize("case", WEIGHT_CASES[:2], ids=CASE_IDS[:2])
@pytest.mark.parametrize("layout", ["blockwise", "fp32"])
@pytest.mark.parametrize("rule", TRUST_RULES)
def test_trust_ratio_reads_the_master(rule, layout, case):
    """The norms pass reads the decoded master: the ratio agrees with the reference's to a
    relative 1e-12 (its float64 sums add in another order), where on the first step the weight
    alone is off by ~1e-4 (the cases' masters start up to a spacing above their weights)."""
    dtype = HALF_DTYPES[(TRUST_RULES.index(rule) + WEIGHT_CASES.index(case) + (layout == "fp32")) % 2]  # both, over the cases
    p, slots = fresh(rule, 4099, layout, dtype)
    correction = case.start(p)
    for step in range(1, 4):
        g, hp = gradient(p.numel(), dtype, step), hyper(rule, step)
        weights = case.at(correction, hp)
        expected = reference.trust_ratio(rule, p, g, slots, hp, True, weights)
        got = tk.trust_ratio(rule, p, g, slots, hp, True, weights)
        assert float(got.ratio) == pytest.approx(expected, rel=1e-12, abs=0), f"{dtype}, step {step}"
        if step == 1:  # (later the weight is the master rounded to nearest: off only in second order)
            assert float(got.ratio) != pytest.approx(reference.trust_ratio(rule, p, g, slots, hp, True), rel=1e-6)
        tk.update(rule, p, g, slots, hp, True, weights)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_draw_indices_wrap_around_32_bits(oracle, dtype):
    """An element's draw reads its index modulo 2**32 (uint32 wrap-around): a shard's first index
    past 2**32, and one whose elements cross a multiple of it."""
    for first in (2**33 + 5, 2**32 - 100):
        case = WeightCase("stochastic", None, True, first_index=first)
        check_steps("adam", 700, "fp32", dtype, case, steps=2)


# ---- many small tensors, mixed formats -------------------------------------------------------

FORMATS = ("nearest", *CASE_IDS)


def mixed_tensors(rule: str, layout: str) -> list[tuple]:
    """(parameter, states, format, correction, first index) for every 16-bit dtype and format,
    in two small sizes, and fp32 parameters with a draw (ignored: in the batch of nothing rounded)."""
    tensors = []
    for i, (dtype, name) in enumerate((d, f) for d in HALF_DTYPES for f in FORMATS):
        for n in (1 + 100 * i, 700 + 31 * i):
            p, slots = fresh(rule, n, layout, dtype)
            case = dict(zip(CASE_IDS, WEIGHT_CASES)).get(name)
            correction = None if case is None else case.start(p)
            first = 1000 * i + n if n < 700 else (i + 1) * 2**32 - 300  # (the index wraps around 2**32 in the tensor)
            tensors.append((p, slots, case, correction, first))
    for n in (40, 300):
        p, slots = fresh(rule, n, layout, torch.float32)
        tensors.append((p, slots, WEIGHT_CASES[2], None, n))
    return tensors


def mixed_jobs(rule: str, tensors: list[tuple], step: int) -> list[Job]:
    """One step's jobs: a draw key of its own per tensor (each parameter has its own seed) and a
    first index per tensor; percentile clipping's gradient scale on every other tensor."""
    jobs = []
    for i, (p, slots, case, correction, first) in enumerate(tensors):
        hp = hyper(rule, step)._replace(gnorm_scale=0.37 if (i + step) % 2 else 1.0)
        if case is None:
            weights = NEAREST
        elif case.stochastic:
            weights = WeightFormat(draw=master.Draw(master.step_key(i, step), first))
        else:
            weights = case.at(correction, hp)
        jobs.append(Job(rule, p, gradient(p.numel(), p.dtype, step + i % 3), slots, hp, True, weights))
    return jobs


def twin(job: Job) -> Job:
    """The same job on copies of its parameter, states and correction."""
    p, slots = copy_state(job.p, job.slots)
    correction = None if job.weights.correction is None else job.weights.correction.clone()
    return job._replace(p=p, slots=slots, weights=job.weights._replace(correction=correction))


BATCHED_RULES = [rule for rule in RULES if not rules.RULES[rule].trust]  # a trust ratio takes launches of its own


@pytest.mark.parametrize("rule, layout", [(rule, ("blockwise", "fp32")[i % 2]) for i, rule in enumerate(BATCHED_RULES)])
def test_mixed_formats_batch_by_format_and_match_reference(monkeypatch, rule, layout):
    """Each rule in one of the batched layouts (alternating): every 16-bit dtype and format,
    fp32 with a draw, three steps; one batch per dtype and format, each equal to the reference."""
    batches = count_calls(monkeypatch, batch, "run")
    tensors = mixed_tensors(rule, layout)
    for step in range(1, 4):
        jobs = mixed_jobs(rule, tensors, step)
        theirs = [twin(j) for j in jobs]
        results = tk.update_many(jobs)
        for number, (ours, ref, result) in enumerate(zip(jobs, theirs, results, strict=True)):
            where = f"step {step}, job {number} ({ours.p.dtype}, {ours.p.numel()})"
            assert int(result.skipped_blocks) == reference.update(*ref).skipped_blocks, where
            assert_same_state(ours.p, ours.slots, ref.p, ref.slots, where)
            if ours.weights.correction is not None:
                assert_same(ours.weights.correction, ref.weights.correction, f"{where}: correction")
    kinds = {(j.p.dtype, weight_switch(j.p, j.weights)) for j in jobs}
    assert len(kinds) == 2 * len(FORMATS) + 1  # fp32 with a draw batches with nothing rounded
    assert len(batches) == 3 * len(kinds)
    for (call,) in batches:
        assert len({(j.p.dtype, weight_switch(j.p, j.weights)) for j in call}) == 1, "a batch of unlike formats"


def test_a_refused_job_leaves_every_parameter_as_it_was():
    p, slots = fresh("adam", 300, "fp32", torch.bfloat16)
    bad_p, bad_slots = fresh("adam", 300, "fp32", torch.float32)
    hp = hyper("adam", 1)
    good = Job("adam", p, torch.ones(300, dtype=torch.bfloat16), slots, hp)
    bad = Job("adam", bad_p, torch.ones(300), bad_slots, hp, True, WeightFormat(correction=torch.zeros(300, dtype=torch.int8)))
    before, bad_before = p.clone(), bad_p.clone()
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        tk.update_many([good, bad])
    assert torch.equal(p, before) and torch.equal(bad_p, bad_before)
    both = WeightFormat(correction=torch.zeros(300, dtype=torch.int16), draw=master.Draw(1))
    with pytest.raises(ValueError, match="not rounded stochastically"):
        tk.update("adam", p, good.g, slots, hp, True, both)
    with pytest.raises(ValueError, match="int8 or int16"):
        tk.update("adam", p, good.g, slots, hp, True, WeightFormat(correction=torch.zeros(299, dtype=torch.int8)))
    strided = WeightFormat(correction=torch.zeros(600, dtype=torch.int8)[::2])  # the kernel reads it as flat memory
    with pytest.raises(ValueError, match="contiguous"):
        tk.update("adam", p, good.g, slots, hp, True, strided)
    assert torch.equal(p, before)


# ---- edge values of the encoding -------------------------------------------------------------


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros of both signs, subnormals, the smallest normal, values at and just below the largest
    finite one, and (last) Inf and NaN, of ``dtype``."""
    info = torch.finfo(dtype)
    smallest = info.smallest_normal * info.eps  # the smallest subnormal
    largest_subnormal = info.smallest_normal - smallest
    values = [0.0, -0.0, smallest, -smallest, 3 * smallest, largest_subnormal, -largest_subnormal, info.smallest_normal,
              -info.smallest_normal, info.max, -info.max, info.max * (1 - info.eps), -info.max * (1 - info.eps), 1.0, -1.0,
              math.inf, -math.inf, math.nan]  # fmt: skip
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def edge_parameter(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """600 elements: the finite edge values in blocks 0 and 1, Inf and NaN in block 2 (an
    8-bit block state turns NaN as a whole there), random values between; and a gradient that
    pushes the largest values past the largest finite weight, leaves subnormals near themselves,
    and is NaN in one element of block 1 (a skipped block with edges in it)."""
    edges = edge_values(dtype)
    finite, nonfinite = edges[:-3], edges[-3:]
    p = (torch.randn(600) * 0.1).to(dtype)
    p[0 : len(finite)] = finite
    p[BLOCK : BLOCK + len(finite)] = finite
    p[2 * BLOCK : 2 * BLOCK + 3] = nonfinite
    info = torch.finfo(dtype)
    g = torch.randn(600) * 0.01
    g[0 : len(finite)] = 0.0
    g[9:13] = -info.max * torch.tensor([1.0, -1.0, 1.0, -1.0]) * (100 if dtype == torch.float16 else 1)  # toward +-inf
    g[2:7] = info.smallest_normal * torch.tensor([1.0, -1.0, 0.5, 2.0, -0.25])
    g[BLOCK + 20] = math.nan
    return p, g.to(dtype)


@pytest.mark.parametrize("case", (*WEIGHT_CASES, NEAREST_CASE), ids=(*CASE_IDS, NEAREST_CASE.name))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rule, layout", [("momentum", "fp32"), ("adam", "blockwise"), ("lion", "fp32")])
def test_edge_values_match_reference(oracle, rule, layout, dtype, case):
    """Three steps from the edge values, skipping non-finite gradients and propagating them."""
    for skip_nonfinite in (True, False):
        p, g = edge_parameter(dtype)
        slots = fresh(rule, p.numel(), layout, dtype)[1]
        steps = [(g, hyper(rule, step)._replace(lr=1e-2)) for step in range(1, 4)]
        assert_backend_matches_reference(tk.update, rule, p, slots, steps, skip_nonfinite, weights=case)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_a_step_that_leaves_the_master_leaves_weight_and_correction(dtype, case):
    """Decoding and encoding again gives back the same pair (``quant.master``): a step of zero
    gradient, rate and decay keeps every weight and correction, the edge values' too."""
    p = edge_parameter(dtype)[0]
    correction = case.start(p)
    before = p.clone(), None if correction is None else correction.clone()
    p_ref, correction_ref = p.clone(), None if correction is None else correction.clone()
    slots = fresh("adam", p.numel(), "fp32", dtype)[1]
    hp = hyper("adam", 1)._replace(lr=0.0, weight_decay=0.0)
    zero = torch.zeros_like(p)
    tk.update("adam", p, zero, slots, hp, True, case.at(correction, hp))
    reference.update("adam", p_ref, zero, fresh("adam", p.numel(), "fp32", dtype)[1], hp, True, case.at(correction_ref, hp))
    assert_same(p, before[0], "weight")
    assert_same(p, p_ref, "weight, the reference's")
    if correction is not None:
        assert_same(correction, before[1], "correction")
        assert_same(correction, correction_ref, "correction, the reference's")
