"""4-bit optimizer states (issue #18) in the Triton kernels against the reference, bit for bit,
under Triton's interpreter (``TRITON_INTERPRET=1``, see ``support.interpreter``): every rule of
``FOUR_BIT_RULES`` (two states' codes sharing one byte per element, 16-code maps, a scale per
128 elements), every parameter dtype, odd sizes, NaN / Inf gradients skipped per 256-block or
propagated, the weight formats, the batched path, states rounded stochastically (a slot's draw),
and the layouts and draws ``supports`` refuses (8-bit states' draws: ``test_stochastic_8bit``).

As in ``test_rules.py``, LAMB's and LARS's steps are checked given the reference's trust ratio
(``test_trust_ratio_matches_reference`` checks the kernel's own to a relative 1e-12).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from support import (FOUR_BIT, FOUR_BIT_RULES, INTERPRETER_MARKS, INTERPRETING, PARAM_DTYPES, TRUST_RULES,
                     assert_backend_matches_reference, assert_same, assert_same_state, copy_state, count_calls, dtype_id,
                     fresh, gradient, hyper, with_draws)  # fmt: skip
from support.weights import HALF_DTYPES, WEIGHT_CASES

from qoptim.kernels import reference, rules
from qoptim.kernels.types import BLOCK, Job, StateSlot
from qoptim.quant.formats import FORMATS, state_map
from qoptim.quant.maps import midpoints
from qoptim.quant.master import Draw, lowbias32

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

import triton  # noqa: E402  (after the skip: triton is optional)
import triton.language as tl  # noqa: E402

from qoptim.kernels import triton as tk  # noqa: E402
from support.triton_oracle import oracle  # noqa: E402,F401  (the fixture)
from qoptim.kernels.triton import batch, launch  # noqa: E402
from qoptim.kernels.triton.states import round_to_code  # noqa: E402

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

# a partial 128-block, one short of a 256-block, one past it, many blocks and a partial 128-block:
# the number of steps of each (NaN / Inf gradients on steps 2, 3 and 5, support.cases.gradient)
SIZE_STEPS = {1: 3, 255: 3, 257: 4, 4097: 5}
HALF = FORMATS[4].blocksize
BATCHED_RULES = tuple(rule for rule in FOUR_BIT_RULES if not rules.RULES[rule].trust)
ONE_STATE_RULES = tuple(rule for rule in FOUR_BIT_RULES if rules.RULES[rule].states == 1)
KEY = 0x9E3779B9  # a draw's key past 2**31 (the kernel takes it as a uint32)
NEAR_WRAP = (1 << 32) - 100  # a draw's first index from which the elements' indices wrap around 2**32


def started(rule: str, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[StateSlot]]:
    """A parameter with random 4-bit states: random bytes (both halves, also where a rule keeps
    one state) and scales, so that every code of both maps is read."""
    p, slots = fresh(rule, n, FOUR_BIT, dtype)
    slots[0].values.random_(0, 256, generator=torch.Generator().manual_seed(n))
    for slot in slots:
        slot.absmax.uniform_(0.001, 0.01)
    return p, slots


def check_steps(p, slots, rule: str, steps: int, skip_nonfinite: bool = True, weights=None) -> list[int]:
    run = ((gradient(p.numel(), p.dtype, step), hyper(rule, step)) for step in range(1, steps + 1))
    return assert_backend_matches_reference(tk.update, rule, p, slots, run, skip_nonfinite, weights)


def drawn(rule: str, p, slots, first: int = 0, signed_too: bool = False, key: int = KEY):
    """``p`` and its states, a draw of ``key`` from index ``first`` on the never-negative ones (as
    the optimizers round a 4-bit second moment; ``signed_too``: on every state)."""
    return p, with_draws(rule, slots, Draw(key, first), signed_too)


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_every_rule_matches_reference(oracle, rule, dtype):
    """From zero states, as an optimizer starts: same skipped-block count and bits, every step."""
    for n, steps in SIZE_STEPS.items():
        skipped = check_steps(*fresh(rule, n, FOUR_BIT, dtype), rule, steps)
        if n > 4 * BLOCK:
            assert skipped[4] == 2  # step 5: two 256-blocks with a NaN


@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_nonfinite_gradients_propagate_as_in_reference(oracle, rule):
    """Without skipping, NaN and Inf flow into states (a NaN scale: code 15) as in the reference."""
    p, slots = fresh(rule, 1000, FOUR_BIT, torch.float32)
    check_steps(p, slots, rule, 5, skip_nonfinite=False)
    assert bool(slots[0].absmax.isnan().any())


@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_started_states_match_reference(oracle, rule):
    """From random codes and scales; a rule of one state keeps the high half of every byte."""
    p, slots = started(rule, 1000, torch.float32)
    high = slots[0].values >> 4
    check_steps(p, slots, rule, 3)
    if rule in ONE_STATE_RULES:
        assert torch.equal(slots[0].values >> 4, high)


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[case.name for case in WEIGHT_CASES])
@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_weight_formats_match_reference(oracle, rule, case):
    """Master corrections and stochastic rounding, the 16-bit dtype alternating over the cases."""
    dtype = HALF_DTYPES[(FOUR_BIT_RULES.index(rule) + WEIGHT_CASES.index(case)) % 2]
    for n, steps in ((257, 3), (4097, 5)):
        p, slots = fresh(rule, n, FOUR_BIT, dtype)
        check_steps(p, slots, rule, steps, weights=case)


@pytest.mark.parametrize("rule", ["adam", "lion"])
def test_a_skipped_block_keeps_both_codes_and_its_two_scales(rule):
    n = 4 * BLOCK
    p, slots = started(rule, n, torch.float32)
    before_p, before = copy_state(p, slots)
    g = torch.randn(n) * 0.01
    g[BLOCK + 5] = math.inf
    assert tk.update(rule, p, g, slots, hyper(rule, 2)).skipped_blocks == 1
    kept, moved = slice(BLOCK, 2 * BLOCK), slice(0, BLOCK)
    assert torch.equal(p[kept], before_p[kept]) and not torch.equal(p[moved], before_p[moved])
    assert torch.equal(slots[0].values[kept], before[0].values[kept])  # the byte: both halves
    assert not torch.equal(slots[0].values[moved], before[0].values[moved])
    for slot, old in zip(slots, before):
        assert torch.equal(slot.absmax[2:4], old.absmax[2:4]) and not torch.equal(slot.absmax[:2], old.absmax[:2])


@pytest.mark.parametrize("rule", TRUST_RULES)
def test_trust_ratio_matches_reference(rule):
    """The norms pass reads the 4-bit states (LAMB's moments): the ratio to a relative 1e-12."""
    p, slots = started(rule, 4099, torch.bfloat16)
    for step in range(1, 4):
        g, hp = gradient(p.numel(), p.dtype, step), hyper(rule, step)
        expected = reference.trust_ratio(rule, p, g, slots, hp, True)
        assert float(tk.trust_ratio(rule, p, g, slots, hp, True).ratio) == pytest.approx(expected, rel=1e-12, abs=0)
        tk.update(rule, p, g, slots, hp, True)


# ---- the quantizer ----------------------------------------------------------------------------


@triton.jit
def _codes_kernel(x_ptr, inv_ptr, mids_ptr, out_ptr, n, BITS: tl.constexpr, SIZE: tl.constexpr):
    offs = tl.arange(0, SIZE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    inv = tl.load(inv_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, round_to_code(x, inv, mids_ptr, BITS), mask=mask)


def edge_values(code: torch.Tensor) -> torch.Tensor:
    """The midpoints and the floats next to them, the codes, zeros, NaN, infinities, subnormals."""
    mids = midpoints(code)
    specials = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45, 2.0, -2.0, 1e30])
    return torch.cat([mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(-math.inf)), code, specials])


@pytest.mark.parametrize("name", ["dynamic4", "linear4", "dynamic", "udynamic"])
def test_round_to_code_is_torch_bucketize(name):
    """The count of midpoints strictly below u = x * inv, NaN on the last code, as torch.bucketize."""
    code = state_map(name)
    bits = int(math.log2(code.numel()))
    x = edge_values(code)
    ones = torch.ones_like(x)
    scaled = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 4
    for inv in (ones, scaled, torch.zeros_like(x)):
        out = torch.empty(x.numel(), dtype=torch.int32)
        _codes_kernel[(1,)](x, inv, launch.search_table(code), out, x.numel(), BITS=bits, SIZE=triton.next_power_of_2(x.numel()))
        assert_same(out, torch.bucketize(x * inv, midpoints(code)).to(torch.int32), f"{name}")
    assert int(out[x.isnan()][0]) == code.numel() - 1


# ---- the batched path -------------------------------------------------------------------------


def job(rule, p, slots, step, index=0, skip_nonfinite=True, **changes) -> Job:
    """A job with NaN / Inf gradients in places that depend on the step and the tensor, and
    percentile clipping's gradient scale on every other tensor."""
    g = gradient(p.numel(), p.dtype, step + index)
    hp = hyper(rule, step)._replace(gnorm_scale=0.37 if (index + step) % 2 else 1.0, **changes)
    return Job(rule, p, g, slots, hp, skip_nonfinite)


def twin(j: Job) -> Job:
    p, slots = copy_state(j.p, j.slots)
    return j._replace(p=p, slots=slots)


def assert_same_as_reference(jobs: list[Job], twins: list[Job], results) -> None:
    for ours, theirs, result in zip(jobs, twins, results, strict=True):
        expected = reference.update(*theirs)
        assert int(result.skipped_blocks) == expected.skipped_blocks
        assert_same_state(ours.p, ours.slots, theirs.p, theirs.slots, f"{ours.rule} of {ours.p.numel()}:")


@pytest.mark.parametrize("rule", BATCHED_RULES)
def test_a_batch_matches_reference(oracle, monkeypatch, rule):
    """Tensors of several sizes in one launch (the dtype changes over the rules), with per-tensor
    gradient scales and skipped blocks, each state with a map of its own (read from its table row)."""
    batches = count_calls(monkeypatch, batch, "run")
    dtype = PARAM_DTYPES[BATCHED_RULES.index(rule) % len(PARAM_DTYPES)]
    tensors = [started(rule, n, dtype) for n in (1, 255, 257, 1000, 3000)]
    for _, slots in tensors:
        for slot in slots:
            slot.code = slot.code.clone()
    for step in range(1, 4):
        jobs = [job(rule, p, slots, step, i) for i, (p, slots) in enumerate(tensors)]
        twins = [twin(j) for j in jobs]
        assert_same_as_reference(jobs, twins, tk.update_many(jobs))
        assert len(batches) == step and len(batches[-1][0]) == len(tensors)  # all of them in one launch


def apart(slots: list[StateSlot]) -> list[StateSlot]:
    """The states with bytes of their own each (not the layout of the kernel: it refuses them)."""
    return [dataclasses.replace(slot, values=slot.values.clone()) for slot in slots]


def test_mixed_jobs_split_into_batches(oracle, monkeypatch):
    """4-bit jobs of two rules batch by rule; 8-bit ones apart from them; a trust ratio or a size
    over the limit takes launches of its own; states the kernel cannot read go to the reference."""
    monkeypatch.setattr(batch, "BATCH_LIMIT", 2048)
    batches = count_calls(monkeypatch, batch, "run")
    eight_p, eight_slots = fresh("adam", 300, "blockwise", torch.float32)
    mixed_p, mixed_slots = started("adam", 300, torch.float32)
    mixed_slots[1] = eight_slots[1]  # one 4-bit state, one 8-bit: no kernel
    apart_p, apart_slots = started("adam", 300, torch.float32)
    jobs = [
        job("adam", *started("adam", 700, torch.bfloat16), 2, 1),
        job("adam", *fresh("adam", 500, "blockwise", torch.bfloat16), 2, 0),  # 8-bit: another batch
        job("lion", *started("lion", 257, torch.float16), 2, 0, skip_nonfinite=False),
        job("adam", *started("adam", 40, torch.bfloat16), 2, 2),
        job("lamb", *started("lamb", 600, torch.float32), 2),  # trust ratio: launches of its own
        job("adam", *fresh("adam", 200, "blockwise", torch.bfloat16), 2, 3),
        job("adam", *started("adam", 3000, torch.bfloat16), 2, 2),  # over the (lowered) batch limit
        job("adam", mixed_p, mixed_slots, 2),  # no kernel: the reference
        job("adam", apart_p, apart(apart_slots), 2),  # no kernel: the reference
        job("lion", *started("lion", 1000, torch.float16), 2, 1, skip_nonfinite=False),
    ]
    twins = [twin(j) for j in jobs]
    assert_same_as_reference(jobs, twins, tk.update_many(jobs))
    assert sorted(len(call[0]) for call in batches) == [2, 2, 2]
    assert {j.rule for call in batches for j in call[0] if j.slots[0].bits == 4} == {"adam", "lion"}


# ---- stochastic rounding (a slot's draw: ``quant.blockwise.quantize_stochastic``) ----------------


@pytest.mark.parametrize("rule", FOUR_BIT_RULES)
def test_stochastic_states_match_reference(oracle, rule):
    """A draw on the never-negative state (none in Lion's, SGD's, LARS's), from zero states (first
    index 0) and random ones (the indices wrapping around 2**32), the dtype changing over the rules."""
    dtype = PARAM_DTYPES[FOUR_BIT_RULES.index(rule) % len(PARAM_DTYPES)]
    for n, steps in SIZE_STEPS.items():
        check_steps(*drawn(rule, *fresh(rule, n, FOUR_BIT, dtype)), rule, steps)
        check_steps(*drawn(rule, *started(rule, n, dtype), first=NEAR_WRAP), rule, steps)


@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("rule", ["adam", "lion", "rmsprop"])
def test_draws_on_every_state_with_nonfinite_gradients(oracle, rule, skip_nonfinite):
    """A draw on the signed states too (the kernel rounds any 4-bit state that has one), a first
    index past 2**32; NaN / Inf gradients skipped per 256-block or propagated (a NaN scale: code 15)."""
    p, slots = drawn(rule, *started(rule, 1000, torch.float32), first=NEAR_WRAP + 500, signed_too=True)
    skipped = check_steps(p, slots, rule, 5, skip_nonfinite)
    assert skipped[4] == (2 if skip_nonfinite else 0) and bool(slots[0].absmax.isnan().any()) != skip_nonfinite


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[case.name for case in WEIGHT_CASES])
@pytest.mark.parametrize("rule", ["adam", "rmsprop"])
def test_stochastic_states_with_weight_formats_match_reference(oracle, rule, case):
    """16-bit parameters with a master correction, or rounded stochastically with the states'
    draw the weight's, as the optimizers make them (each step's key: the high 16 bits of an
    element's hash round its weight, the low 16 its second moment); both dtypes over the rules."""
    dtype = HALF_DTYPES[(("adam", "rmsprop").index(rule) + WEIGHT_CASES.index(case)) % 2]
    for n, steps in ((257, 3), (4097, 5)):
        p, slots = fresh(rule, n, FOUR_BIT, dtype)
        if not case.stochastic:
            check_steps(*drawn(rule, p, slots, first=n), rule, steps, weights=case)
            continue
        for step in range(1, steps + 1):  # a step a call, the states drawing the step's draw
            g, hp = gradient(n, dtype, step), hyper(rule, step)
            slots = with_draws(rule, slots, case.at(None, hp).draw)
            assert_backend_matches_reference(tk.update, rule, p, slots, [(g, hp)], True, case)


def test_only_the_states_with_a_draw_round_stochastically():
    """Adam's second moment takes other codes than rounded to nearest; its first moment the same."""
    p, slots = started("adam", 4097, torch.float32)
    p_drawn, slots_drawn = drawn("adam", *copy_state(p, slots))
    g, hp = gradient(4097, torch.float32, 1), hyper("adam", 1)
    tk.update("adam", p, g, slots, hp)
    tk.update("adam", p_drawn, g, slots_drawn, hp)
    nearest, stochastic = slots[0].values, slots_drawn[0].values
    assert torch.equal(nearest & 0xF, stochastic & 0xF) and not torch.equal(nearest >> 4, stochastic >> 4)


def test_a_batch_rounds_each_jobs_states_with_its_own_draw(oracle, monkeypatch):
    """Small jobs with draws (each its own key and first index, one wrapping around 2**32) and
    without, in ``update_many``: one launch for those with draws of a rule, one for those without
    (the states' roundings are a switch of the kernel), each job as the reference."""
    batches = count_calls(monkeypatch, batch, "run")
    tensors = []
    for i, (rule, n, dtype) in enumerate([("adam", n, torch.bfloat16) for n in (1, 255, 257, 1000, 3000, 40)]
                                         + [("rmsprop", n, torch.float16) for n in (300, 700, 100)]):  # fmt: skip
        p, slots = started(rule, n, dtype)
        first = NEAR_WRAP if i == 4 else 1000 * i
        tensors.append((rule, *(drawn(rule, p, slots, first, key=lowbias32(i)) if i % 3 else (p, slots))))
    for step in range(1, 4):
        jobs = [job(rule, p, slots, step, i) for i, (rule, p, slots) in enumerate(tensors)]
        twins = [twin(j) for j in jobs]
        assert_same_as_reference(jobs, twins, tk.update_many(jobs))
        # a launch each: Adam's 4 jobs with draws, its 2 without, RMSprop's 2 with (its one without: alone)
        assert len(batches) == 3 * step and sorted(len(call[0]) for call in batches[-3:]) == [2, 2, 4]


# ---- what supports() refuses -------------------------------------------------------------------


def refused(rule: str, p: torch.Tensor, slots: list[StateSlot]) -> None:
    """``supports`` refuses the states; ``update`` raises and writes nothing."""
    assert not tk.supports(rule, p, slots)
    p_before, before = copy_state(p, slots)
    with pytest.raises(ValueError, match="no kernel"):
        tk.update(rule, p, torch.randn(p.numel()) * 0.01, slots, hyper(rule, 1))
    assert_same_state(p, slots, p_before, before, "refused:")


def test_supports_states_that_share_bytes_as_the_kernel_reads_them():
    p = torch.zeros(300)
    for rule in FOUR_BIT_RULES:
        assert tk.supports(rule, p.bfloat16(), fresh(rule, 300, FOUR_BIT, torch.float32)[1])
    _, slots = started("adam", 300, torch.float32)
    views = [dataclasses.replace(slot, values=slot.values.view(-1)) for slot in slots]  # views of one tensor, as optim.state's
    assert views[0].values is not views[1].values and tk.supports("adam", p, views)
    assert launch.layout_of(slots[0]) != launch.layout_of(fresh("adam", 300, "blockwise", torch.float32)[1][0])


def test_refuses_mixed_layouts_and_other_packings():
    p = torch.randn(300)
    _, slots = started("adam", 300, torch.float32)
    _, eight = fresh("adam", 300, "blockwise", torch.float32)
    _, fp32 = fresh("adam", 300, "fp32", torch.float32)
    refused("adam", p, [slots[0], eight[1]])  # 4-bit and 8-bit
    refused("adam", p, [fp32[0], slots[1]])  # fp32 and 4-bit
    refused("adam", p, apart(slots))  # each state in bytes of its own
    refused("adam", p, [dataclasses.replace(slots[0], shift=4), dataclasses.replace(slots[1], shift=0)])  # halves swapped
    refused("lion", p, [dataclasses.replace(slots[0], shift=4)])  # a rule's one state in the high half
    refused("adam", p, [dataclasses.replace(slot, blocksize=BLOCK) for slot in slots])  # 4-bit codes in blocks of 256
    three = [*slots, dataclasses.replace(slots[0], shift=8)]
    refused("ademamix", p, three)  # a byte holds two 4-bit codes
    assert not tk.supports("adam", p.double(), slots)


def test_refuses_draws_but_one_on_blockwise_states():
    """Stochastic rounding of block-wise codes only (8-bit: ``test_stochastic_8bit``), with one
    draw for a parameter's states (as the optimizers give them): a draw on whole-tensor or fp32
    states, or two draws, are the reference's."""
    p = torch.randn(300)
    for layout in ("whole_tensor", "fp32"):
        refused("adam", p, drawn("adam", *fresh("adam", 300, layout, torch.float32))[1])
    _, slots = started("adam", 300, torch.float32)
    assert tk.supports("adam", p, drawn("adam", p, slots, signed_too=True)[1])
    refused("adam", p, [dataclasses.replace(slot, draw=Draw(KEY, i)) for i, slot in enumerate(slots)])


def test_update_many_leaves_refused_states_to_the_reference(oracle):
    two_draws = [dataclasses.replace(slot, draw=Draw(KEY, i)) for i, slot in enumerate(started("adam", 300, torch.float32)[1])]
    jobs = [job("adam", torch.randn(300), apart(started("adam", 300, torch.float32)[1]), 1),
            job("adam", torch.randn(300), two_draws, 1)]  # fmt: skip
    assert not any(tk.supports(j.rule, j.p, j.slots) for j in jobs)
    twins = [twin(j) for j in jobs]
    assert_same_as_reference(jobs, twins, tk.update_many(jobs))
