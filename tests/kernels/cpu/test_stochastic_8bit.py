"""8-bit block-wise states rounded stochastically (a slot's draw: ``quant.blockwise.quantize_stochastic``)
in the fused CPU kernels (``quantize.round_stochastically``), bit for bit as the reference backend:
parameter, codes, scales and skipped-block counts after every step, one at a time and batched
(``update_many``), with the weight formats of a 16-bit parameter, on every path.

Every rule with a never-negative state (``STOCHASTIC_RULES``: those states carry the draw, as the
optimizers give a second moment one) on every parameter dtype, sizes from 1 to two tasks, steps
with NaN and Inf gradients, skipping on and off, a new key every step (``optim.weights.step_draw``).
States start at zero and random (every code, scales of all sizes, some 0); first indices other
than 0 (a shard's) and near 2**32 (the index wraps around). The quantizer itself is checked
against ``quantize_stochastic`` on every path, on the standard maps and on odd ones (equal
neighbours, codes one float apart, infinite ends, signed zeros). A draw on a state that is not
block-wise (fp32, one scale per tensor) is the reference's to refuse.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from numba import njit
from support import LAYOUTS, RULES, assert_backend_matches_reference, assert_same_state, copy_state, count_calls, fresh, gradient, hyper
from support import edge_gradient, with_draws
from support.cpu_states import kernel_oracle, torch_threads, two_threads
from support.weights import WEIGHT_CASES

from qoptim.kernels import BLOCK, Job, cpu, reference
from qoptim.kernels.cpu import batch, layout, paths
from qoptim.kernels.cpu.quantize import quantize, round_up_by_draw
from qoptim.kernels.cpu.tables import stochastic_tables_for, tables_for
from qoptim.kernels.rules import RULES as SPECS
from qoptim.quant.blockwise import quantize_stochastic, quantize_with_absmax
from qoptim.quant.maps import signed_map, unsigned_map
from qoptim.quant.master import Draw, lowbias32, step_key

BLOCKWISE = LAYOUTS[0]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 255, 257, 4097)  # 4097: two tasks (PARALLEL_MIN below)
STEPS = 6  # NaN / Inf gradients on steps 2, 3 and 5 (support.gradient)
STOCHASTIC_RULES = tuple(rule for rule in RULES if not all(SPECS[rule].signed))
WRAPS = (1 << 32) - 2000  # a first index whose elements' indices pass 2**32 (a 4097-element tensor's do)


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """Parallel tasks from 4096 elements, and the rest of ``kernel_oracle``."""
    with kernel_oracle(monkeypatch, 4096):
        yield


def randomized(rule, n, dtype, seed):
    """A parameter and 8-bit states of ``rule`` with random codes (every one of 256) and random
    scales of many sizes, every fifth 0."""
    p, slots = fresh(rule, n, BLOCKWISE, dtype)
    gen = torch.Generator().manual_seed(seed)
    for s in slots:
        s.values.copy_(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8))
        s.absmax.copy_(torch.rand(s.absmax.shape, generator=gen) * 10.0 ** torch.randint(-6, 2, s.absmax.shape, generator=gen))
        s.absmax[::5] = 0.0
    return p, slots


def zero(rule, n, dtype, seed):
    return fresh(rule, n, BLOCKWISE, dtype)


def drawn(seed, first=0):
    """Each step's draw of a parameter with rounding seed ``seed`` whose first element has index ``first``."""
    return lambda hp: Draw(step_key(seed, hp.step), first)


def redrawn(rule, seed, first=0):
    """``rule``'s slots with each step's draw (``drawn``) on its never-negative states: the oracle's ``redraw``."""
    draws = drawn(seed, first)
    return lambda slots, hp: with_draws(rule, slots, draws(hp))


def steps_of(rule, n, dtype, count=STEPS):
    return [(gradient(n, dtype, s), hyper(rule, s)) for s in range(1, count + 1)]


def check(rule, dtype, n, skip, start=zero, first=0, weights=None, steps=STEPS, seed=0):
    """``steps`` steps of ``rule`` from ``start``'s states with a draw per step on the never-negative
    ones: the kernels take them (``Layout.BLOCK``) and step bit for bit as the reference."""
    p, slots = start(rule, n, dtype, seed)
    assert layout.plan(rule, p, with_draws(rule, slots, Draw(1))) == layout.Layout.BLOCK
    redraw = redrawn(rule, seed + 1, first)
    counts = assert_backend_matches_reference(two_threads, rule, p, slots, steps_of(rule, n, dtype, steps), skip, weights=weights,
                                              redraw=redraw)  # fmt: skip
    assert not skip or sum(counts), "no block was skipped"


# ---- which states the kernels take ----------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_block_wise_states_with_draws_are_the_kernels(rule):
    """A draw on the never-negative states, or on every state: block-wise states stay the kernels'."""
    p, slots = fresh(rule, 300, BLOCKWISE, torch.bfloat16)
    for signed_too in (False, True):
        drawn_slots = with_draws(rule, slots, Draw(7, 3), signed_too)
        assert layout.plan(rule, p, drawn_slots) == layout.Layout.BLOCK
        assert cpu.supports(rule, p, drawn_slots)


@pytest.mark.parametrize("kind", ["whole_tensor", "fp32"])
def test_draws_on_states_not_in_blocks_are_left_to_the_reference(kind, monkeypatch):
    """One scale per tensor or fp32 states with a draw: not the kernels' (one at a time or
    batched), and the reference refuses them; without the draw the kernels take them."""
    p, slots = fresh("adam", 300, kind, torch.float32)
    assert layout.plan("adam", p, slots) is not None
    drawn_slots = with_draws("adam", slots, Draw(5))
    assert layout.plan("adam", p, drawn_slots) is None and not cpu.supports("adam", p, drawn_slots)
    g = gradient(300, torch.float32, 1)
    with pytest.raises(ValueError, match="quantized block-wise"):
        cpu.update("adam", p, g, drawn_slots, hyper("adam", 1), True)
    calls = [count_calls(monkeypatch, batch, name) for name in ("eight_bit_batch_task", "fp32_batch_task")]
    q, other = fresh("adam", 500, kind, torch.float32)
    jobs = [Job("adam", x, gradient(x.numel(), torch.float32, 1), with_draws("adam", s, Draw(5)), hyper("adam", 1), True) for x, s in ((p, slots), (q, other))]
    with pytest.raises(ValueError, match="quantized block-wise"):
        cpu.update_many(jobs)
    assert not any(calls)


# ---- bit for bit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rule", STOCHASTIC_RULES)
def test_every_rule_and_dtype_is_bit_identical_to_the_reference(rule, dtype, skip):
    """From zero states at first index 0, from random ones at a shard's first index and at one
    whose indices wrap past 2**32."""
    for n in SIZES:
        check(rule, dtype, n, skip)
        check(rule, dtype, n, skip, start=randomized, first=77_777 if n < 4097 else WRAPS, seed=n)


def test_the_draw_decides_the_codes():
    """The check can fail: the same steps with the draw and without (to nearest), or with another
    seed, leave other codes in the never-negative state."""
    n = 4097
    results = []
    for draws in (drawn(1), drawn(2), None):
        p, slots = randomized("adam", n, torch.float32, 3)
        results.append(slots)
        for g, hp in steps_of("adam", n, torch.float32, 3):
            two_threads("adam", p, g, slots if draws is None else with_draws("adam", slots, draws(hp)), hp, True)
    (_, v1), (_, v2), (_, v0) = results
    assert (v1.values != v0.values).sum() > n // 10 and (v1.values != v2.values).sum() > n // 10


@pytest.mark.parametrize("rule,dtype", [("adam", torch.bfloat16), ("lamb", torch.float32), ("rmsprop", torch.float16)])
def test_a_large_tensor_on_many_tasks(rule, dtype):
    """Past a million elements: eight tasks on two threads, each drawing its own elements' bits."""
    check(rule, dtype, (1 << 20) + 4099, True, start=randomized, first=3, steps=2)


# Adam: every weight format of both 16-bit dtypes; every other rule: one in turn
FORMATS_16 = [(dtype, case) for dtype in (torch.bfloat16, torch.float16) for case in WEIGHT_CASES]
WEIGHT_CROSS = [("adam", dtype, case) for dtype, case in FORMATS_16]
WEIGHT_CROSS += [(rule, *FORMATS_16[r % len(FORMATS_16)]) for r, rule in enumerate(STOCHASTIC_RULES) if rule != "adam"]


@pytest.mark.parametrize("rule,dtype,case", WEIGHT_CROSS, ids=[f"{r}-{str(d)[6:]}-{c.name}" for r, d, c in WEIGHT_CROSS])
def test_the_weight_formats_are_bit_identical_too(rule, dtype, case):
    for n in SIZES:
        check(rule, dtype, n, True, start=randomized, weights=case, first=n)


PATH_CASES = [("adam", torch.bfloat16, WEIGHT_CASES[2]), ("rmsprop", torch.float32, None), ("lamb", torch.float16, WEIGHT_CASES[0])]


@pytest.mark.parametrize("rule,dtype,case", PATH_CASES, ids=[f"{r}-{str(d)[6:]}" for r, d, _ in PATH_CASES])
@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"], indirect=True)
def test_every_path_is_bit_identical_too(rule, dtype, case, path):
    for n in (255, 4097):
        check(rule, dtype, n, True, start=randomized, weights=case, first=WRAPS)
        check(rule, dtype, n, False, weights=case)


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("rule", ["adam", "ademamix", "adagrad"])
def test_numeric_edges_are_bit_identical_too(rule, skip):
    """Huge gradients make Inf and NaN states (propagated where skipping is off: NaN scales, u
    NaN or Inf), subnormal and zero gradients, all-zero blocks; NaN and zero scales to start with."""
    n = 1000
    p, slots = randomized(rule, n, torch.float32, 3)
    slots[-1].absmax[1] = math.nan
    steps = [(edge_gradient(n, s), hyper(rule, s)) for s in range(1, 5)]
    assert_backend_matches_reference(two_threads, rule, p, slots, steps, skip, redraw=redrawn(rule, 9, 11))
    if not skip:
        assert slots[-1].absmax.isnan().any()


# ---- batched ------------------------------------------------------------------------------------------


def test_batched_rows_draw_with_their_own_keys_and_first_indices(monkeypatch):
    """Small jobs of several rules and dtypes in one update_many, most with draws of their own key
    and first index (one near 2**32), some without (another batch), several parts per tensor:
    each bit for bit as the reference, step by step."""
    monkeypatch.setattr(batch, "PART", 1 << 11)
    cases = [(rule, n, dtype) for rule in ("adam", "rmsprop", "ademamix") for n in (1, 257, 3000, 9000)
             for dtype in (torch.float32, torch.bfloat16)]  # fmt: skip
    jobs = [randomized(rule, n, dtype, seed) for seed, (rule, n, dtype) in enumerate(cases)]
    theirs = [copy_state(p, slots) for p, slots in jobs]
    firsts = [WRAPS if seed == 5 else seed * 1000 for seed in range(len(cases))]
    calls = count_calls(monkeypatch, batch, "eight_bit_batch_task")
    for number in range(1, 4):
        grads = [gradient(n, dtype, number) for _, n, dtype in cases]
        states = [slots if seed % 4 == 3 else with_draws(rule, slots, Draw(step_key(seed, number), firsts[seed]))
                  for seed, ((rule, _, _), (_, slots)) in enumerate(zip(cases, jobs))]  # fmt: skip
        twins = [[dataclasses.replace(t, draw=s.draw) for s, t in zip(ours, slots_ref)] for ours, (_, slots_ref) in zip(states, theirs)]
        with torch_threads(2):
            got = cpu.update_many([Job(rule, p, g, s, hyper(rule, number), True) for (rule, _, _), (p, _), g, s in zip(cases, jobs, grads, states)])
        for (rule, _, _), (p, slots), (p_ref, _), ref_slots, g, result in zip(cases, jobs, theirs, twins, grads, got):
            expected = reference.update(rule, p_ref, g, ref_slots, hyper(rule, number), True)
            assert int(result.skipped_blocks) == expected.skipped_blocks
            assert_same_state(p, slots, p_ref, ref_slots, f"step {number}, {rule} of {p.numel()}:")
    # the batch tasks' map tables (arguments 11 to 13) end in whether each state rounds stochastically
    rounding = [tuple(tables[2] for tables in call[11:14]) for call in calls]
    assert any(any(r) for r in rounding) and any(not any(r) for r in rounding), "batches with draws and without"


# ---- the quantizer itself ---------------------------------------------------------------------------


@njit(_nrt=False, error_model="numpy")  # (as the kernels: their inlined helpers take arrays without reference counts)
def stochastic_codes(values, inv, stochastic, key, first, codes, path):
    """``requantize``'s stochastic rounding, block by block: the floor codes, then the draw."""
    for lo in range(0, values.size, BLOCK):
        hi = min(values.size, lo + BLOCK)
        quantize(values[lo:hi], inv, False, stochastic.floors, codes[lo:hi], path)
        round_up_by_draw(values[lo:hi], inv, stochastic, key, first + lo, codes[lo:hi], path)


def odd_maps():
    """Sorted maps beside the standard ones: runs of equal codes, codes one float apart (their
    midpoints round to one of them), infinite ends, -0.0 and 0.0."""
    equal = torch.cat([torch.linspace(-1, 0, 100), torch.zeros(56), torch.linspace(0, 1, 100)])
    ulp = torch.linspace(-1, 1, 256)
    for i in range(129, 140):
        ulp[i] = torch.nextafter(ulp[i - 1], torch.tensor(2.0))
    infinite = torch.cat([torch.full((1,), -math.inf), torch.linspace(-1, 1, 253), torch.full((2,), math.inf)])
    zeros = torch.cat([torch.full((3,), -0.0), torch.zeros(1), torch.linspace(1e-3, 1, 252)])
    return {"equal neighbours": equal, "one float apart": ulp, "infinite ends": infinite, "signed zeros": zeros}


MAPS = {"signed": signed_map(), "unsigned": unsigned_map(), **odd_maps()}


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"], indirect=True)
def test_the_stochastic_quantizer_is_the_reference_on_every_path(name, path):
    """Every code and its float neighbours, every midpoint, both zeros, subnormals, the extremes,
    Inf and NaN, at several scales and first indices: ``quantize_stochastic``'s codes, element for
    element (whole blocks and a partial one)."""
    code = MAPS[name]
    stochastic = stochastic_tables_for(code)
    below, above = torch.nextafter(code, torch.tensor(-math.inf)), torch.nextafter(code, torch.tensor(math.inf))
    mids = (code[1:] + code[:-1]) / 2
    tiny = torch.finfo(torch.float32).smallest_normal
    specials = torch.tensor([0.0, -0.0, tiny * 2.0**-5, -tiny * 2.0**-5, 3.0e38, -3.0e38, math.inf, -math.inf, math.nan, 2.0])
    u = torch.cat([code, below, above, mids.nan_to_num(), specials, torch.rand(200) * 2 - 1])
    u = u[torch.randperm(u.numel(), generator=torch.Generator().manual_seed(0))]
    for scale, first in ((1.0, 0), (2.0, 5), (0.0, WRAPS), (0.37, 123)):
        inv = np.float32(1.0) / np.float32(scale) if scale else np.float32(0.0)
        key = lowbias32(int(scale * 100) + first)
        codes = np.zeros(u.numel(), np.uint8)
        stochastic_codes(u.numpy(), inv, stochastic, np.int64(key), np.int64(first), codes, paths.current())
        absmax = torch.tensor([scale], dtype=torch.float32)
        expected = quantize_stochastic(u, absmax, code, u.numel(), Draw(key, first))
        assert torch.equal(torch.from_numpy(codes), expected), f"scale {scale}"
        if name == "unsigned" and scale:
            assert not torch.equal(expected, quantize_with_absmax(u, absmax, code, u.numel())), "some codes rounded up and down"


def test_a_map_with_minus_infinity_past_its_first_code_draws_in_the_reference():
    """-inf after the first code has no float below it (``tables``): no floor tables, so a draw on
    such a map is the reference's, and the step is the reference's; rounded to nearest, the kernels'."""
    code = torch.cat([torch.full((2,), -math.inf), torch.linspace(-1, 1, 254)])
    assert stochastic_tables_for(code) is None and tables_for(code) is not None
    n = 600
    p, slots = fresh("adam", n, BLOCKWISE, torch.float32)
    slots[1] = dataclasses.replace(slots[1], code=code)
    assert layout.plan("adam", p, slots) == layout.Layout.BLOCK
    assert layout.plan("adam", p, with_draws("adam", slots, Draw(3))) is None
    assert_backend_matches_reference(two_threads, "adam", p, slots, steps_of("adam", n, torch.float32, 3), True, redraw=redrawn("adam", 4))
