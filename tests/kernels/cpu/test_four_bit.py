"""4-bit states (issue #18: two states' codes in one byte per element, a scale per 128) in the
fused CPU kernels (``layout.Layout.FOUR_BIT``, ``four_bit``, ``nibbles``), bit for bit as the
reference backend: parameter, shared bytes (both halves), scales and skipped-block counts after
every step, one at a time and batched (``update_many``), with the weight formats of a 16-bit
parameter, on every path of the table lookups.

Every rule with at most two states (``support.FOUR_BIT_RULES``) on every parameter dtype, sizes
from 1 to past a million (several tasks on worker threads), steps with NaN and Inf gradients,
skipping on and off. States start random (every code of both halves, scales of all sizes) as
well as at zero. LAMB and LARS: the kernel's trust ratio sums in another order than torch's
(see test_rules.py): it is checked to 1e-9 against the reference's, which then steps with it.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from numba import njit
from support import FOUR_BIT, FOUR_BIT_RULES, assert_backend_matches_reference, assert_same_state, copy_state, fresh
from support import count_calls, edge_gradient, gradient, hyper, with_draws
from support.cpu_states import kernel_oracle, torch_threads, two_threads
from support.weights import WEIGHT_CASES

from qoptim.kernels import Job, StateSlot, cpu, reference
from qoptim.kernels.cpu import batch, launch, layout, paths
from qoptim.kernels.cpu.nibbles import NO_DRAW, nibble_tables_of, nibble_view, quantize
from qoptim.quant.blockwise import quantize_stochastic
from qoptim.quant.formats import FORMATS, state_map
from qoptim.quant.maps import midpoints, signed_map
from qoptim.quant.master import Draw, lowbias32

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 255, 257, 4097)  # 4097: two tasks (PARALLEL_MIN below)
STEPS = 6  # NaN / Inf gradients on steps 2, 3 and 5 (support.gradient)


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """Parallel tasks from 4096 elements, and the rest of ``kernel_oracle``."""
    with kernel_oracle(monkeypatch, 4096):
        yield


def randomized(rule, n, dtype, seed):
    """A parameter and 4-bit states of ``rule`` with random codes in both halves of every byte
    (a rule of one state: the other half too, which it must keep) and random scales, some 0."""
    p, slots = fresh(rule, n, FOUR_BIT, dtype)
    gen = torch.Generator().manual_seed(seed)
    slots[0].values.copy_(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8))
    for s in slots:
        s.absmax.copy_(torch.rand(s.absmax.shape, generator=gen) * 10.0 ** torch.randint(-6, 2, s.absmax.shape, generator=gen))
        s.absmax[::5] = 0.0
    return p, slots


def steps_of(rule, n, dtype, count=STEPS):
    return [(gradient(n, dtype, s), hyper(rule, s)) for s in range(1, count + 1)]


def check(rule, dtype, n, skip, weights=None, start=fresh, steps=STEPS):
    p, slots = start(rule, n, FOUR_BIT, dtype) if start is fresh else start(rule, n, dtype, n)
    assert layout.plan(rule, p, slots) == layout.Layout.FOUR_BIT
    counts = assert_backend_matches_reference(two_threads, rule, p, slots, steps_of(rule, n, dtype, steps), skip, weights=weights)
    assert not skip or sum(counts), "no block was skipped"


# ---- which states the kernels take --------------------------------------------------------------


@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_plan_takes_four_bit_states(rule):
    p, slots = fresh(rule, 300, FOUR_BIT, torch.bfloat16)
    assert layout.plan(rule, p, slots) == layout.Layout.FOUR_BIT
    assert cpu.supports(rule, p, slots)


def mixed_layouts(n):
    """Adam's states as the kernels do not take them: (name, slots) each."""
    four = fresh("adam", n, FOUR_BIT, torch.float32)[1]
    eight = fresh("adam", n, "blockwise", torch.float32)[1]
    own_bytes = [StateSlot(s.values.clone(), s.code, s.absmax, s.blocksize, s.shift) for s in four]
    unsorted = state_map(FORMATS[4].signed_map).flip(0).contiguous()
    return {
        "four and eight bits": [four[0], eight[1]],
        "four bits and fp32": [four[0], StateSlot(torch.zeros(n))],
        "bytes not shared": own_bytes,
        "one shift for both": [four[0], StateSlot(four[1].values, four[1].code, four[1].absmax, four[1].blocksize, 0)],
        "blocks of 256": [StateSlot(s.values, s.code, torch.zeros(-(-n // 256)), 256, s.shift) for s in four],
        "an unsorted map": [StateSlot(four[0].values, unsorted, four[0].absmax, four[0].blocksize, 0), four[1]],
        "scales of another size": [StateSlot(s.values, s.code, torch.zeros(1), s.blocksize, s.shift) for s in four],
    }


@pytest.mark.parametrize("case", list(mixed_layouts(1)))
def test_plan_refuses_other_mixes_which_take_the_reference(case):
    """A mix the kernels do not cover goes to the reference: the same result as its own."""
    n = 700
    slots = mixed_layouts(n)[case]
    p = torch.randn(n)
    assert layout.plan("adam", p, slots) is None and not cpu.supports("adam", p, slots)
    if case in ("an unsorted map", "scales of another size", "blocks of 256"):
        return  # (no defined answer in the reference either: bucketize on unsorted midpoints, scales that do not fit)
    assert_backend_matches_reference(cpu.update, "adam", p, slots, steps_of("adam", n, torch.float32, 3), True)


# ---- bit for bit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_every_rule_and_dtype_is_bit_identical_to_the_reference(rule, dtype, skip):
    for n in SIZES:
        check(rule, dtype, n, skip)
        check(rule, dtype, n, skip, start=randomized)


@pytest.mark.parametrize("rule,dtype", [("adam", torch.bfloat16), ("lamb", torch.float32), ("lion", torch.float16)])
def test_a_large_tensor_on_many_tasks(rule, dtype):
    """Past a million elements (one reference chunk and more): eight tasks on two threads."""
    n = (1 << 20) + 4099
    with torch_threads(2):
        assert launch.tasks_for(n) == launch.threads() * launch.TASKS_PER_THREAD > 1
    check(rule, dtype, n, True, steps=3, start=randomized)


# Adam: every weight format of both 16-bit dtypes; every other rule: one in turn
FORMATS_16 = [(dtype, case) for dtype in (torch.bfloat16, torch.float16) for case in WEIGHT_CASES]
WEIGHT_CROSS = [("adam", dtype, case) for dtype, case in FORMATS_16]
WEIGHT_CROSS += [(rule, *FORMATS_16[r % len(FORMATS_16)]) for r, rule in enumerate(FOUR_BIT_RULES) if rule != "adam"]


@pytest.mark.parametrize("rule,dtype,case", WEIGHT_CROSS, ids=[f"{r}-{str(d)[6:]}-{c.name}" for r, d, c in WEIGHT_CROSS])
def test_the_weight_formats_are_bit_identical_too(rule, dtype, case):
    for n in SIZES:
        check(rule, dtype, n, True, weights=case, start=randomized)


# the paths other than the best: one state and two, the trust pass, a weight format
PATH_CASES = [("adam", torch.float32, None), ("lion", torch.bfloat16, None), ("lamb", torch.float16, WEIGHT_CASES[0])]


@pytest.mark.parametrize("rule,dtype,case", PATH_CASES, ids=[f"{r}-{str(d)[6:]}" for r, d, _ in PATH_CASES])
@pytest.mark.parametrize("path", ["avx2", "portable"], indirect=True)
def test_the_other_paths_are_bit_identical_too(rule, dtype, case, path):
    for n in (255, 4097):
        check(rule, dtype, n, True, weights=case, start=randomized)


# ---- numeric edges ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("rule", ["adam", "lion", "rmsprop", "adagrad"])
def test_numeric_edges_are_bit_identical_too(rule, skip):
    """Huge gradients make Inf and NaN states (propagated where skipping is off, and so NaN
    scales and codes); subnormal and zero gradients; zero and NaN scales to start with."""
    n = 1000
    p, slots = randomized(rule, n, torch.float32, 3)
    slots[0].absmax[3] = math.nan
    steps = [(edge_gradient(n, s), hyper(rule, s)) for s in range(1, 5)]
    assert_backend_matches_reference(two_threads, rule, p, slots, steps, skip)
    if not skip:
        assert slots[0].absmax.isnan().any()


def test_all_zero_and_all_subnormal_blocks():
    """Blocks whose states stay 0 (scale 0: every code from u = 0) or hold subnormals only."""
    n = 513
    p, slots = fresh("adam", n, FOUR_BIT, torch.float32)
    tiny = torch.finfo(torch.float32).smallest_normal
    g = torch.zeros(n)
    g[256:] = tiny * 2.0**-10
    steps = [(g, hyper("adam", s)._replace(weight_decay=0.0)) for s in (1, 4)]
    assert_backend_matches_reference(two_threads, "adam", p, slots, steps, True)
    assert slots[0].absmax[0] == 0.0 and slots[0].absmax[2] > 0.0


# ---- batched ---------------------------------------------------------------------------------


def test_update_many_mixes_small_and_large_jobs(monkeypatch):
    """Many small 4-bit jobs of several rules and dtypes, a few large ones (their own call), an
    8-bit job and a LAMB one (the one-at-a-time path) in one update_many, each bit for bit as
    the reference, step by step."""
    monkeypatch.setattr(batch, "BATCH_LIMIT", 1 << 14)
    monkeypatch.setattr(batch, "PART", 1 << 11)  # (several parts per batched tensor)
    small = [(rule, n, dtype) for rule in ("adam", "lion", "momentum") for n in (1, 200, 257, 3000, 9000)
             for dtype in (torch.float32, torch.bfloat16)]  # fmt: skip
    large = [("adam", 40000, torch.float32), ("lion", 20000, torch.bfloat16)]
    cases = small + large + [("lamb", 3000, torch.float32), ("rmsprop", 700, torch.float16)]
    jobs = [randomized(rule, n, dtype, seed) for seed, (rule, n, dtype) in enumerate(cases)]
    eight = fresh("adam", 1000, "blockwise", torch.float32)
    cases.append(("adam", 1000, torch.float32))
    jobs.append(eight)
    theirs = [copy_state(p, slots) for p, slots in jobs]
    calls = count_calls(monkeypatch, batch, "four_bit_batch_task")
    for number in range(1, STEPS + 1):
        grads = [gradient(n, dtype, number) for _, n, dtype in cases]
        hps = [hyper(rule, number)._replace(gnorm_scale=0.5 if i % 4 == 0 else 1.0) for i, (rule, _, _) in enumerate(cases)]
        with torch_threads(2):
            batch_jobs = [Job(rule, p, g, slots, hp, True) for (rule, _, _), (p, slots), g, hp in zip(cases, jobs, grads, hps)]
            got = cpu.update_many(batch_jobs)
        for (rule, _, _), (p, slots), (p_ref, slots_ref), g, hp, result in zip(cases, jobs, theirs, grads, hps, got):
            expected = reference.update(rule, p_ref, g, slots_ref, hp, True)
            assert int(result.skipped_blocks) == expected.skipped_blocks, f"step {number}"
            assert_same_state(p, slots, p_ref, slots_ref, f"step {number}, {rule} of {p.numel()}:")
    assert calls, "the small 4-bit jobs ran batched"


def test_one_state_rules_keep_the_other_half_of_each_byte():
    """Lion's one state in the high half (shift 4) of bytes whose low half is another's: kept."""
    n = 600
    p = torch.randn(n) * 0.1
    code = state_map(FORMATS[4].signed_map)
    values = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    slots = [StateSlot(values, code, torch.rand(-(-n // 128)), 128, 4)]
    low = values & 0xF
    assert layout.plan("lion", p, slots) == layout.Layout.FOUR_BIT
    assert_backend_matches_reference(two_threads, "lion", p, slots, steps_of("lion", n, torch.float32), True)
    assert torch.equal(values & 0xF, low)


def test_the_eight_bit_map_is_not_taken_for_four_bits():
    """A 256-code map on a 4-bit slot's shape is an 8-bit state: not a 4-bit layout."""
    n = 300
    slots = fresh("lion", n, FOUR_BIT, torch.float32)[1]
    slots = [StateSlot(slots[0].values, signed_map(), slots[0].absmax, 128, 0)]
    assert layout.plan("lion", torch.zeros(n), slots) is None



# ---- the quantizer itself ----------------------------------------------------------------------------


@njit(_nrt=False, error_model="numpy")  # (as the kernels: their inlined helpers take arrays without reference counts)
def quantize_on(values, inv, state, q, path, lo=0):
    quantize(values, inv, nibble_view(state), lo, q, path)


@pytest.mark.parametrize("name", FORMATS[4].map_names)
@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"], indirect=True)
def test_the_quantizer_is_bucketize_on_every_path(name, path):
    """Every midpoint itself and its float neighbours (a tie goes to the lower code), every code,
    both zeros, subnormals, the extremes, Inf and NaN: torch.bucketize's index, lane for lane
    (sizes past 16 lanes and not a multiple of them)."""
    code = state_map(name)
    mids = midpoints(code)
    below, above = torch.nextafter(mids, torch.tensor(-math.inf)), torch.nextafter(mids, torch.tensor(math.inf))
    tiny = torch.finfo(torch.float32).smallest_normal
    extremes = [3.0e38, -3.0e38, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.0]
    specials = torch.tensor([0.0, -0.0, tiny * 2.0**-5, -tiny * 2.0**-5, *extremes])
    u = torch.cat([mids, below, above, code, specials, torch.rand(61) * 2 - 1])
    tables = nibble_tables_of(code)
    state = (np.zeros(1, np.uint8), np.zeros(1, np.float32), *tables, 0, NO_DRAW, np.int64(0))
    for inv in (1.0, 0.5, 0.0):
        q = np.zeros(u.numel(), np.uint8)
        quantize_on(u.numpy(), np.float32(inv), state, q, paths.current())
        expected = torch.bucketize(u * inv, mids)
        assert torch.equal(torch.from_numpy(q).long(), expected), f"scale reciprocal {inv}"


# ---- stochastic rounding (``quant.blockwise.quantize_stochastic``: the 4-bit second moment's) ------------


def drawn(start=randomized, first=0, signed_too=False):
    """``start``'s states with a draw (key from the seed, first index ``first``) on those never
    negative, as the optimizers round a 4-bit second moment; ``signed_too``: on every state."""

    def make(rule, n, dtype, seed):
        p, slots = start(rule, n, FOUR_BIT, dtype) if start is fresh else start(rule, n, dtype, seed)
        return p, with_draws(rule, slots, Draw(lowbias32(seed + 7), first), signed_too)

    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_stochastic_rounding_is_bit_identical_to_the_reference(rule, dtype):
    """From zero states and random ones; a first index past 2**32 - n (the index wraps around)."""
    for n in SIZES:
        check(rule, dtype, n, True, start=drawn(fresh))
        check(rule, dtype, n, False, start=drawn(first=(1 << 32) - 100))


@pytest.mark.parametrize("path", ["avx2", "portable"], indirect=True)
def test_stochastic_rounding_on_the_other_paths(path):
    for n in (255, 4097):
        check("adam", torch.bfloat16, n, True, weights=WEIGHT_CASES[0], start=drawn(first=12345))
        check("lion", torch.float32, n, True, start=drawn(signed_too=True))


def test_stochastic_rounding_on_many_tasks_and_at_the_edges():
    """Each task draws its elements' own bits (a large tensor on eight tasks); huge, subnormal,
    zero, Inf and NaN gradients, NaN scales."""
    check("adam", torch.float32, (1 << 20) + 4099, True, steps=2, start=drawn(first=3))
    n = 1000
    p, slots = drawn()("adam", n, torch.float32, 3)
    slots[1].absmax[3] = math.nan
    steps = [(edge_gradient(n, s), hyper("adam", s)) for s in range(1, 5)]
    assert_backend_matches_reference(two_threads, "adam", p, slots, steps, False)


def test_batched_jobs_round_stochastically_with_their_own_draws(monkeypatch):
    """Small jobs with draws (each its own key and first index) and without, in one update_many."""
    monkeypatch.setattr(batch, "PART", 1 << 11)
    cases = [(rule, n, dtype) for rule in ("adam", "lion") for n in (1, 257, 3000, 9000) for dtype in (torch.float32, torch.bfloat16)]
    jobs = [(drawn(first=seed * 1000) if seed % 3 else randomized)(rule, n, dtype, seed) for seed, (rule, n, dtype) in enumerate(cases)]
    theirs = [copy_state(p, slots) for p, slots in jobs]
    calls = count_calls(monkeypatch, batch, "four_bit_batch_task")
    for number in range(1, 4):
        grads = [gradient(n, dtype, number) for _, n, dtype in cases]
        with torch_threads(2):
            got = cpu.update_many([Job(rule, p, g, slots, hyper(rule, number), True) for (rule, _, _), (p, slots), g in zip(cases, jobs, grads)])
        for (rule, _, _), (p, slots), (p_ref, slots_ref), g, result in zip(cases, jobs, theirs, grads, got):
            expected = reference.update(rule, p_ref, g, slots_ref, hyper(rule, number), True)
            assert int(result.skipped_blocks) == expected.skipped_blocks
            assert_same_state(p, slots, p_ref, slots_ref, f"step {number}, {rule} of {p.numel()}:")
    assert calls, "the small 4-bit jobs ran batched"


@pytest.mark.parametrize("name", FORMATS[4].map_names)
@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"], indirect=True)
def test_the_stochastic_quantizer_is_the_reference_on_every_path(name, path):
    """Every code and its float neighbours, both zeros, subnormals, the extremes, Inf and NaN, at
    three scales and an offset into the tensor: ``quantize_stochastic``'s codes, lane for lane."""
    code = state_map(name)
    below, above = torch.nextafter(code, torch.tensor(-math.inf)), torch.nextafter(code, torch.tensor(math.inf))
    tiny = torch.finfo(torch.float32).smallest_normal
    specials = torch.tensor([0.0, -0.0, tiny * 2.0**-5, -tiny * 2.0**-5, 3.0e38, -3.0e38, math.inf, -math.inf, math.nan, 2.0])
    u = torch.cat([code, below, above, specials, torch.rand(300) * 2 - 1])
    tables = nibble_tables_of(code)
    key, first, lo = 0x9E3779B9, 5, 17
    state = (np.zeros(1, np.uint8), np.zeros(1, np.float32), *tables, 4, np.int64(key), np.int64(first))
    for inv in (1.0, 0.5, 0.0):
        q = np.zeros(u.numel(), np.uint8)
        quantize_on(u.numpy(), np.float32(inv), state, q, paths.current(), lo)
        scale = torch.tensor([1.0 / inv if inv else 0.0])
        expected = quantize_stochastic(u, scale.expand(u.numel()), code, 1, Draw(key, first + lo))
        assert torch.equal(torch.from_numpy(q), expected), f"scale reciprocal {inv}"


@pytest.mark.parametrize("path", ["avx512", "avx2"], indirect=True)
def test_the_linear_map_rounds_stochastically_without_a_search(path):
    """The second moments' map {1, .., 16} / 16 counts its codes by a floor (``nibble_lanes``), the
    others by the search: both ``quantize_stochastic``'s codes over 60 orders of magnitude of both
    signs, at every sixteenth up to 64 and its float neighbours."""
    linear, dynamic = nibble_tables_of(state_map("linear4")), nibble_tables_of(state_map("dynamic4"))
    assert linear.linear and not dynamic.linear
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.exp(torch.rand(2000, generator=gen) * 138 - 69)  # 1e-30 .. 1e30
    sixteenths = torch.arange(0, 1025, dtype=torch.float32) / 16
    u = torch.cat([magnitudes, -magnitudes, sixteenths, torch.nextafter(sixteenths, torch.tensor(-math.inf)),
                   torch.nextafter(sixteenths, torch.tensor(math.inf))])  # fmt: skip
    state = (np.zeros(1, np.uint8), np.zeros(1, np.float32), *linear, 4, np.int64(0xDEADBEEF), np.int64(3))
    q = np.zeros(u.numel(), np.uint8)
    quantize_on(u.numpy(), np.float32(1.0), state, q, paths.current())
    expected = quantize_stochastic(u, torch.ones(u.numel()), state_map("linear4"), 1, Draw(0xDEADBEEF, 3))
    assert torch.equal(torch.from_numpy(q), expected)


def test_states_with_draws_of_their_own_are_not_batched_and_fp32_states_take_none(monkeypatch):
    """The optimizers give a step's states one draw; a job whose states carry two takes the
    one-at-a-time path (a batch row holds one), bit for bit as the reference; a draw on fp32
    states is the reference's to refuse, not the kernels' to ignore."""
    jobs = []
    for seed, n in enumerate((300, 700)):
        p, slots = randomized("adam", n, torch.float32, seed)
        jobs.append((p, [dataclasses.replace(s, draw=Draw(lowbias32(seed * 2 + i), i)) for i, s in enumerate(slots)]))
    theirs = [copy_state(p, slots) for p, slots in jobs]
    calls = count_calls(monkeypatch, batch, "four_bit_batch_task")
    grads = [gradient(p.numel(), p.dtype, 1) for p, _ in jobs]
    got = cpu.update_many([Job("adam", p, g, slots, hyper("adam", 1), True) for (p, slots), g in zip(jobs, grads)])
    for (p, slots), (p_ref, slots_ref), g, result in zip(jobs, theirs, grads, got):
        expected = reference.update("adam", p_ref, g, slots_ref, hyper("adam", 1), True)
        assert int(result.skipped_blocks) == expected.skipped_blocks
        assert_same_state(p, slots, p_ref, slots_ref, f"adam of {p.numel()}:")
    assert not calls
    p, slots = fresh("adam", 300, "fp32", torch.float32)
    slots = [dataclasses.replace(s, draw=Draw(1)) for s in slots]
    assert layout.plan("adam", p, slots) is None
    with pytest.raises(ValueError, match="quantized block-wise"):
        cpu.update("adam", p, gradient(300, torch.float32, 1), slots, hyper("adam", 1), True)
