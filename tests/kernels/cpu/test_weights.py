"""The weight formats of a 16-bit parameter (issue #17: master corrections of 24 and 32 bits,
stochastic rounding) fused into the CPU kernels, bit for bit as the reference backend: weight,
correction, states and scales after every step.

Each weight format is a compiled specialization of every task, so the full cross (every layout,
dtype and format) runs on Adam, and the other rules on one (dtype, format) per layout, taken in
turn so that each rule meets several formats; the paths other than the best take a few cases.
Every case runs sizes 1 to 65537 (parallel tasks from 65536, ``PARALLEL_MIN`` below) over steps
with NaN and Inf gradients (skipped blocks: weight and correction left as they were).

LAMB and LARS: the kernel's trust ratio sums in another order than torch's (see test_rules.py):
it is checked to 1e-9 against the reference's, of the master's values, and the reference then
steps with the kernel's.
"""

import math

import pytest
import torch
from support import assert_backend_matches_reference, assert_same, copy_state, count_calls, fresh, gradient, hyper
from support.cpu_states import kernel_oracle, torch_threads, two_threads
from support.weights import SEED, WEIGHT_CASES, WeightCase

from qoptim.kernels import NEAREST, Job, WeightFormat, cpu, reference
from qoptim.kernels import rules as rule_table
from qoptim.kernels.cpu import step
from qoptim.quant import master

SIZES = [1, 255, 257, 4097, 65537]  # the last one: several tasks (PARALLEL_MIN below)
STEPS = 6  # NaN / Inf gradients on steps 2, 3 and 5 (support.gradient)
LAYOUTS = ("blockwise", "whole_tensor", "fp32")
DTYPES = (torch.bfloat16, torch.float16)
CASES = {case.name: case for case in WEIGHT_CASES}
FORMATS = [(dtype, name) for dtype in DTYPES for name in CASES]  # the six compiled forms of a 16-bit parameter

# Adam: everything; every other rule: each layout with one of the forms, in turn (each layout
# meets every form on some rule, each rule both dtypes or all three formats)
CROSS = [("adam", layout, dtype, name) for layout in LAYOUTS for dtype, name in FORMATS]
OTHERS = [rule for rule in rule_table.RULES if rule != "adam"]
CROSS += [(rule, layout, *FORMATS[(2 * r + k) % len(FORMATS)])
          for r, rule in enumerate(OTHERS) for k, layout in enumerate(LAYOUTS)]  # fmt: skip
# the trust rules (their pass reads the master) on fp16 masters too
CROSS += [("lars", "blockwise", torch.float16, "master32"), ("lamb", "fp32", torch.float16, "master24")]
# the paths other than the best: one, two and three 8-bit states, each form on one of them
PATH_CASES = [
    ("lion", "blockwise", torch.bfloat16, "master24"),
    ("lamb", "whole_tensor", torch.float16, "stochastic"),
    ("ademamix", "blockwise", torch.float16, "master32"),
    ("adam", "whole_tensor", torch.bfloat16, "stochastic"),
]


def case_id(rule, layout, dtype, name):
    return f"{rule}-{layout}-{str(dtype)[6:]}-{name}"


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """Parallel tasks from 65536 elements, and the rest of ``kernel_oracle``."""
    with kernel_oracle(monkeypatch, 1 << 16):
        yield


def check(rule, layout, dtype, case, sizes=SIZES, start=None):
    """The kernel against the reference, each size over ``STEPS`` steps; ``start(p)`` may set
    the parameter's values first."""
    for n in sizes:
        p, slots = fresh(rule, n, layout, dtype)
        if start is not None:
            start(p)
        steps = [(gradient(n, dtype, s), hyper(rule, s)) for s in range(1, STEPS + 1)]
        counts = assert_backend_matches_reference(two_threads, rule, p, slots, steps, True, weights=case)
        assert sum(counts), "no block was skipped"


@pytest.mark.parametrize("rule,layout,dtype,name", CROSS, ids=[case_id(*c) for c in CROSS])
def test_the_weight_formats_are_bit_identical_to_the_reference(rule, layout, dtype, name):
    check(rule, layout, dtype, CASES[name])


@pytest.mark.parametrize("rule,layout,dtype,name", PATH_CASES, ids=[case_id(*c) for c in PATH_CASES])
@pytest.mark.parametrize("path", ["avx2", "portable"], indirect=True)
def test_the_other_paths_are_bit_identical_too(rule, layout, dtype, name, path):
    check(rule, layout, dtype, CASES[name], sizes=[257, 65537])


def edge_values(dtype):
    """Zeros of both signs, subnormals, the smallest normals, values near the largest finite
    one and past it, values about to change binade, Inf and NaN, among ordinary values."""
    info = torch.finfo(dtype)
    tiny, top = info.smallest_normal, info.max
    sub = tiny * 2.0 ** -3
    return torch.tensor(
        [0.0, -0.0, sub, -sub, tiny * 2.0 ** -9, tiny, -tiny, tiny * (1 - 2.0 ** -5), 1.0, -1.0, 1 - 2.0 ** -12, 2.0 - 2.0 ** -9,
         top, -top, top * (1 - 2.0 ** -9), math.inf, -math.inf, math.nan, -math.nan, 0.5, 2.0 ** -20, -(2.0 ** -30)]
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["blockwise", "fp32"])
@pytest.mark.parametrize("dtype,name", FORMATS, ids=[f"{str(d)[6:]}-{n}" for d, n in FORMATS])
def test_edge_values_in_the_parameter_are_bit_identical_too(dtype, name, layout):
    """Edge values spread over every block (the first element of each included), with the
    master's start (``WeightCase.start``) then taking each past its weight's grid."""
    values = edge_values(dtype)

    def start(p):
        every = torch.arange(0, p.numel(), 7)
        p[every] = values[torch.arange(len(every)) % len(values)].to(dtype)

    check("adam", layout, dtype, CASES[name], sizes=[255, 4097], start=start)


def test_a_master_pair_is_kept_where_nothing_changes():
    """With a zero step (lr 0, no decay) the weight and its correction stay bit for bit, and
    stochastic rounding leaves a 16-bit value as it is."""
    for dtype in DTYPES:
        for case in WEIGHT_CASES:
            p, slots = fresh("adam", 4097, "blockwise", dtype)
            correction = case.start(p)
            before = p.clone(), None if correction is None else correction.clone()
            hp = hyper("adam", 1)._replace(lr=0.0, weight_decay=0.0)
            cpu.update("adam", p, gradient(4097, dtype, 1), slots, hp, True, case.at(correction, hp))
            assert_same(p, before[0])
            if correction is not None:
                assert torch.equal(correction, before[1])


# ---- many small tensors in one call ----------------------------------------------------------

BATCH_FORMATS = [WeightCase("nearest", None, False), *WEIGHT_CASES]


def batch_jobs(rule, layout):
    """Small parameters of every dtype and weight format (an fp32 one with a draw too, which it
    ignores), two or more of each so that every form makes a batch."""
    jobs = []
    sizes = [1, 255, 700, 3000, 257]
    for k in range(3 * len(BATCH_FORMATS) * len(DTYPES)):
        case = BATCH_FORMATS[k % len(BATCH_FORMATS)]
        dtype = (torch.float32, *DTYPES)[k // len(BATCH_FORMATS) % 3]
        if dtype == torch.float32 and case.master_bits is not None:
            continue
        n = sizes[k % len(sizes)]
        p, slots = fresh(rule, n, layout, dtype)
        correction = case.start(p) if dtype != torch.float32 else None
        jobs.append((case, p, slots, correction))
    return jobs


@pytest.mark.parametrize("layout", ["blockwise", "fp32"])
@pytest.mark.parametrize("rule", ["adam", "lion"])
def test_batched_jobs_of_mixed_formats_equal_the_reference_one_by_one(rule, layout, monkeypatch):
    """Every job batched (none takes the one-at-a-time path, nor the reference), each equal to
    the reference's step of it alone."""
    ours = batch_jobs(rule, layout)
    theirs = [(case, *copy_state(p, slots), None if c is None else c.clone()) for case, p, slots, c in ours]
    for number in range(1, STEPS + 1):
        jobs = []
        for k, (case, p, slots, correction) in enumerate(ours):
            hp = hyper(rule, number)._replace(gnorm_scale=0.5 if k % 4 == 1 else 1.0)
            jobs.append(Job(rule, p, gradient(p.numel(), p.dtype, number), slots, hp, True, case.at(correction, hp)))
        with monkeypatch.context() as m, torch_threads(2):
            alone = count_calls(m, step, "run") + count_calls(m, reference, "update")
            results = cpu.update_many(jobs)
        assert not alone, "a job was not batched"
        for job, result, (case, p, slots, correction) in zip(jobs, results, theirs):
            expected = reference.update(rule, p, job.g, slots, job.hp, True, case.at(correction, job.hp))
            assert int(result.skipped_blocks) == expected.skipped_blocks
            assert_same(job.p, p, f"step {number}: parameter")
            for mine, other in zip(job.slots, slots):
                assert_same(mine.values, other.values, f"step {number}: state")
                if mine.quantized:
                    assert_same(mine.absmax, other.absmax, f"step {number}: scales")
            if correction is not None:
                assert torch.equal(job.weights.correction, correction), f"step {number}: correction"


# ---- what the kernels refuse or hand on --------------------------------------------------------


def test_a_bad_format_is_refused_before_anything_changes():
    p, slots = fresh("adam", 300, "blockwise", torch.bfloat16)
    good = WeightFormat(correction=torch.zeros(300, dtype=torch.int8))
    bad = [
        WeightFormat(correction=torch.zeros(299, dtype=torch.int8)),  # another size
        WeightFormat(correction=torch.zeros(300, dtype=torch.int32)),  # no such width
        WeightFormat(correction=torch.zeros(300, dtype=torch.int8), draw=master.Draw(1)),  # both
    ]
    q, twins = copy_state(p, slots)
    hp = hyper("adam", 1)
    g = gradient(300, torch.bfloat16, 1)
    for weights in bad:
        with pytest.raises(ValueError):
            cpu.update("adam", p, g, slots, hp, True, weights)
        with pytest.raises(ValueError):
            cpu.update_many([Job("adam", q, g, twins, hp, True, good), Job("adam", p, g, slots, hp, True, weights)])
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        assert torch.equal(good.correction, torch.zeros(300, dtype=torch.int8))
        assert all(torch.equal(a.values, b.values) for a, b in zip(slots, twins))
    p32, slots32 = fresh("adam", 300, "blockwise", torch.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        cpu.update("adam", p32, g.float(), slots32, hp, True, WeightFormat(correction=torch.zeros(300, dtype=torch.int16)))


def test_an_fp32_parameter_ignores_a_draw():
    p, slots = fresh("adam", 300, "blockwise", torch.float32)
    q, twins = copy_state(p, slots)
    g, hp = gradient(300, torch.float32, 1), hyper("adam", 1)
    cpu.update("adam", p, g, slots, hp, True, WeightFormat(draw=master.Draw(master.step_key(SEED, 1), 5)))
    cpu.update("adam", q, g, twins, hp, True, NEAREST)
    assert_same(p, q)


def test_a_correction_the_kernels_cannot_take_goes_to_the_reference():
    """A strided correction: the reference's step (still the same bits)."""
    case = CASES["master32"]
    p, slots = fresh("adam", 300, "blockwise", torch.bfloat16)
    correction = case.start(p)
    strided = torch.zeros(600, dtype=torch.int16)[::2]
    strided.copy_(correction)
    q, twins = copy_state(p, slots)
    g, hp = gradient(300, torch.bfloat16, 1), hyper("adam", 1)
    cpu.update("adam", p, g, slots, hp, True, WeightFormat(correction=strided))
    reference.update("adam", q, g, twins, hp, True, WeightFormat(correction=correction))
    assert_same(p, q)
    assert torch.equal(strided, correction)
