"""8-bit block-wise states rounded stochastically (a slot's draw) in the Triton kernels against the
reference, bit for bit, under Triton's interpreter (``TRITON_INTERPRET=1``, see ``support.interpreter``).

``CASES`` declares what is run and ``test_case_matches_reference`` is the one runner: every rule
with a never-negative state that the 8-bit kernel takes (Adam / AdamW, AdEMAMix, RMSprop, Adagrad,
LAMB) with a draw on it, as the optimizers give one, a new key every step (``optim.weights.step_draw``:
``master.step_key`` of a seed and the step); every parameter dtype; odd sizes; zero and random
starting states (every code, some zero scales); first indices of 0, wrapping around 2**32 and
past it (an element's draw reads the low 32 bits of its index); NaN / Inf gradients skipped per
block or propagated; draws on the signed states too; the weight formats (the weight's draw the
states' where it rounds stochastically, as the optimizers make it). Then the batched path, the
quantizer alone on every 8-bit map, what ``supports`` leaves to the reference (a draw on a
whole-tensor or fp32 state, two draws), and that the draw does change codes (so that the runner
can fail).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import pytest
import torch
from support import (INTERPRETER_MARKS, INTERPRETING, PARAM_DTYPES, RULES, assert_backend_matches_reference, assert_same,
                     assert_same_state, copy_state, count_calls, fresh, gradient, hyper, with_draws)  # fmt: skip
from support.weights import SEED, WEIGHT_CASES, WeightCase

from qoptim.kernels import reference, rules
from qoptim.kernels.types import BLOCK, Hyper, Job, StateSlot
from qoptim.quant.blockwise import quantize_stochastic
from qoptim.quant.formats import FORMATS, state_map
from qoptim.quant.maps import midpoints
from qoptim.quant.master import Draw, lowbias32, step_key

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

import triton  # noqa: E402  (after the skip: triton is optional)
import triton.language as tl  # noqa: E402

from qoptim.kernels import triton as tk  # noqa: E402
from support.triton_oracle import oracle  # noqa: E402,F401  (the fixture)
from qoptim.kernels.triton import batch, launch  # noqa: E402
from qoptim.kernels.triton.draws import state_random_bits  # noqa: E402
from qoptim.kernels.triton.states import round_stochastically  # noqa: E402

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

BLOCKWISE = "blockwise"
# the rules whose never-negative state the 8-bit kernel rounds stochastically, as the optimizers draw it
UNSIGNED_RULES = tuple(rule for rule in RULES if not all(rules.RULES[rule].signed))
NEAR_WRAP = (1 << 32) - 100  # a first index from which the elements' indices wrap around 2**32
PAST_WRAP = 5 * (1 << 32) + 12_345  # a first index past 2**32: only its low 32 bits count
# a partial block, one short of a block, one past it, many blocks: the number of steps of each
# (NaN / Inf gradients on steps 2, 3 and 5, support.cases.gradient; two blocks of NaN on step 5)
SIZE_STEPS = {1: 3, 255: 3, 257: 4, 4097: 5}
STARTED_SIZE_STEPS = {257: 3, 4097: 5}


def started(rule: str, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[StateSlot]]:
    """A parameter with random 8-bit block-wise states: every code of each map (4097 elements),
    random scales and every third block's scale 0 (its codes decode to 0)."""
    p, slots = fresh(rule, n, BLOCKWISE, dtype)
    gen = torch.Generator().manual_seed(n)
    for slot in slots:
        slot.values.random_(0, 256, generator=gen)
        slot.absmax.uniform_(0.001, 0.01, generator=gen)
        slot.absmax[::3] = 0.0
    return p, slots


STARTS = {"fresh": lambda rule, n, dtype: fresh(rule, n, BLOCKWISE, dtype), "started": started}


class Case(NamedTuple):
    """One declared run: ``rule`` on ``dtype`` parameters of each size of ``sizes`` (its number of
    steps), its states from ``start``, a draw per step from index ``first`` on the never-negative
    states (``every_state``: on all of them), with ``weights``' format (16-bit dtypes)."""

    name: str
    rule: str
    dtype: torch.dtype
    start: str = "fresh"
    first: int = 0
    sizes: dict[int, int] = SIZE_STEPS
    skip_nonfinite: bool = True
    every_state: bool = False
    weights: WeightCase | None = None

    def redraw(self, slots: list[StateSlot], hp: Hyper) -> list[StateSlot]:
        """``slots`` with the draw of ``hp.step``: the key the optimizers derive from a
        parameter's seed and the step (with the weight's first index, the same draw as its)."""
        first = self.weights.first_index if self.weights is not None and self.weights.stochastic else self.first
        return with_draws(self.rule, slots, Draw(step_key(SEED, hp.step), first), self.every_state)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


CASES = [
    # from zero states, as an optimizer starts: Adam / AdamW in every dtype, the others in one each
    *(Case(f"adam-{_dtype_name(dtype)}", "adam", dtype) for dtype in PARAM_DTYPES),
    *(Case(f"{rule}-{_dtype_name(PARAM_DTYPES[i % 3])}", rule, PARAM_DTYPES[i % 3]) for i, rule in enumerate(UNSIGNED_RULES[1:], 1)),
    # random states (every code, zero scales), the indices wrapping around 2**32 or past it
    *(Case(f"{rule}-started-{'wrap' if i % 2 else 'past'}", rule, PARAM_DTYPES[i % len(PARAM_DTYPES)], "started",
           NEAR_WRAP if i % 2 else PAST_WRAP, STARTED_SIZE_STEPS) for i, rule in enumerate(UNSIGNED_RULES)),  # fmt: skip
    # NaN / Inf gradients skipped or propagated (a NaN scale: code 255), a draw on every state
    # (the kernel rounds any block-wise state that has one: the signed ones of Lion and SGD too)
    *(Case(f"{rule}-every-state-{'skip' if skip else 'propagate'}", rule, torch.float32, "started", NEAR_WRAP + 500,
           {1000: 5}, skip, every_state=True)
      for rule in ("adam", "ademamix", "lion", "momentum", "rmsprop") for skip in (True, False)),  # fmt: skip
    # the weight formats on 16-bit parameters, both dtypes over the cases
    *(Case(f"{rule}-{weights.name}", rule, (torch.bfloat16, torch.float16)[(i + j) % 2], first=257, weights=weights,
           sizes={257: 3, 4097: 5}) for i, rule in enumerate(("adam", "rmsprop")) for j, weights in enumerate(WEIGHT_CASES)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_matches_reference(oracle, case: Case):
    """The kernel (not the reference: ``supports``) takes the case's states with their draw, and
    gives the reference's skipped-block counts and bits after every step."""
    for n, steps in case.sizes.items():
        p, slots = STARTS[case.start](case.rule, n, case.dtype)
        assert tk.supports(case.rule, p, case.redraw(slots, hyper(case.rule, 1)))
        run = [(gradient(n, case.dtype, step), hyper(case.rule, step)) for step in range(1, steps + 1)]
        skipped = assert_backend_matches_reference(tk.update, case.rule, p, slots, run, case.skip_nonfinite, case.weights,
                                                   case.redraw)  # fmt: skip
        if steps >= 5 and n > 4 * BLOCK:
            assert skipped[4] == (2 if case.skip_nonfinite else 0)  # step 5: two blocks with a NaN
        if not case.skip_nonfinite:
            assert any(bool(slot.absmax.isnan().any()) for slot in slots)


def test_the_draw_changes_the_codes_of_its_state_only():
    """Adam's second moment takes other codes than rounded to nearest (so the runner could tell
    the two apart), its scales and the first moment's codes and the parameter the same."""
    p, slots = started("adam", 4097, torch.float32)
    p_drawn, slots_drawn = copy_state(p, slots)
    slots_drawn = with_draws("adam", slots_drawn, Draw(step_key(SEED, 1), PAST_WRAP))
    g, hp = gradient(4097, torch.float32, 1), hyper("adam", 1)
    tk.update("adam", p, g, slots, hp)
    tk.update("adam", p_drawn, g, slots_drawn, hp)
    assert_same(p_drawn, p, "parameter")
    assert torch.equal(slots_drawn[0].values, slots[0].values) and torch.equal(slots_drawn[1].absmax, slots[1].absmax)
    assert not torch.equal(slots_drawn[1].values, slots[1].values)


# ---- the batched path -------------------------------------------------------------------------


def assert_jobs_match_reference(jobs: list[Job], twins: list[Job], results) -> None:
    """Each job's skipped-block count and bits against the reference's step on its twin (a copy
    made before the jobs ran)."""
    for ours, theirs, result in zip(jobs, twins, results, strict=True):
        expected = reference.update(*theirs)
        assert int(result.skipped_blocks) == expected.skipped_blocks
        assert_same_state(ours.p, ours.slots, theirs.p, theirs.slots, f"{ours.rule} of {ours.p.numel()}:")


def twin(j: Job) -> Job:
    p, slots = copy_state(j.p, j.slots)
    return j._replace(p=p, slots=slots)


def test_a_batch_rounds_each_jobs_states_with_its_own_draw(oracle, monkeypatch):
    """Small jobs with draws (each its own key, changing every step, and first index, one past
    2**32) and without, in ``update_many``: a launch for a rule's jobs with draws, one for those
    without (the states' roundings are a switch of the kernel), each job as the reference."""
    batches = count_calls(monkeypatch, batch, "run")
    tensors = []
    for i, (rule, n, dtype) in enumerate([("adam", n, torch.bfloat16) for n in (1, 255, 257, 1000, 3000, 40)]
                                         + [("ademamix", n, torch.float16) for n in (300, 700, 100)]):  # fmt: skip
        tensors.append((i, rule, *started(rule, n, dtype)))
    for step in range(1, 4):
        jobs = []
        for i, rule, p, slots in tensors:
            first = PAST_WRAP if i == 4 else 1000 * i
            drawn = with_draws(rule, slots, Draw(step_key(lowbias32(i), step), first)) if i % 3 else slots
            hp = hyper(rule, step)._replace(gnorm_scale=0.37 if (i + step) % 2 else 1.0)
            jobs.append(Job(rule, p, gradient(p.numel(), p.dtype, step + i), drawn, hp, True))
        twins = [twin(j) for j in jobs]
        results = tk.update_many(jobs)
        assert_jobs_match_reference(jobs, twins, results)
        # a launch each: Adam's 4 jobs with draws, its 2 without, AdEMAMix's 2 with (its one without: alone)
        assert len(batches) == 3 * step and sorted(len(call[0]) for call in batches[-3:]) == [2, 2, 4]


# ---- the quantizer ----------------------------------------------------------------------------


@triton.jit
def _stochastic_codes_kernel(u_ptr, code_ptr, steps_ptr, out_ptr, n, key, first, SIZE: tl.constexpr, BITS: tl.constexpr):
    offs = tl.arange(0, SIZE)
    mask = offs < n
    u = tl.load(u_ptr + offs, mask=mask, other=0.0)
    r = state_random_bits(key.to(tl.uint32), first.to(tl.int64) + offs).to(tl.float32)
    tl.store(out_ptr + offs, round_stochastically(u, code_ptr, steps_ptr, r, BITS), mask=mask)


def on_and_around(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.nextafter(torch.tensor(math.inf)), values.nextafter(torch.tensor(-math.inf))])


@pytest.mark.parametrize(("bits", "name"), [(bits, name) for bits in (4, 8) for name in FORMATS[bits].map_names])
def test_round_stochastically_is_quantize_stochastic(bits, name):
    """Every code of a map (4-bit and 8-bit formats) and the floats next to it, the midpoints and
    theirs, zeros, NaN, infinities, subnormals and random values, drawing indices that wrap around
    2**32: the reference's codes."""
    code = state_map(name)
    specials = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45, 2.0, -2.0, 1e30])
    u = torch.cat([on_and_around(code), on_and_around(midpoints(code)), specials,
                   torch.rand(1000, generator=torch.Generator().manual_seed(1)) * 2 - 1])  # fmt: skip
    for first in (0, NEAR_WRAP):
        key = step_key(SEED, first % 7)
        out = torch.empty(u.numel(), dtype=torch.int32)
        _stochastic_codes_kernel[(1,)](u, code, launch.steps_table(code), out, u.numel(), key, first,
                                       SIZE=triton.next_power_of_2(u.numel()), BITS=bits)  # fmt: skip
        expected = quantize_stochastic(u, torch.ones(u.numel()), code, 1, Draw(key, first))
        assert_same(out, expected.to(torch.int32), f"{name}, first index {first}")
        assert int(out[u.isnan()][0]) == code.numel() - 1


# ---- what supports() leaves to the reference -------------------------------------------------


@pytest.mark.parametrize("layout", ["whole_tensor", "fp32"])
def test_a_draw_on_a_state_not_blockwise_is_the_references(layout):
    """A draw on a whole-tensor (one-scale) or fp32 state: no kernel; the reference refuses it."""
    p, slots = fresh("adam", 300, layout, torch.float32)
    slots = with_draws("adam", slots, Draw(step_key(SEED, 1)))
    g, hp = torch.randn(300) * 0.01, hyper("adam", 1)
    assert not tk.supports("adam", p, slots)
    with pytest.raises(ValueError, match="no kernel"):
        tk.update("adam", p, g, slots, hp)
    with pytest.raises(ValueError, match="block-wise"):
        tk.update_many([Job("adam", p, g, slots, hp, True)])


def test_two_draws_are_the_references(oracle):
    """States with draws of their own: the reference's step, in ``update_many`` too."""
    p, slots = started("adam", 300, torch.float32)
    slots = [dataclasses.replace(slot, draw=Draw(step_key(SEED, 1), i)) for i, slot in enumerate(slots)]
    assert not tk.supports("adam", p, slots)
    job = Job("adam", p, gradient(300, torch.float32, 1), slots, hyper("adam", 1), True)
    twins = [twin(job)]
    assert_jobs_match_reference([job], twins, tk.update_many([job]))
