"""The reference backend's weight formats (``WeightFormat``): a step on a 16-bit parameter with a
32-bit master is a step on an fp32 parameter, bit for bit; 24 bits stay close to it; skipped
blocks keep weight and correction; stochastic rounding keys its draws on the step."""

from __future__ import annotations

import pytest
import torch

from qoptim.kernels import reference
from qoptim.kernels.types import WeightFormat
from qoptim.quant import master
from support import RULES, assert_same, copy_state, dtype_id, fresh, gradient, hyper
from support.weights import HALF_DTYPES, SEED

N = 4097


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["blockwise", "fp32"])
@pytest.mark.parametrize("rule", RULES)
def test_a_32_bit_master_steps_as_fp32(rule, layout, dtype):
    torch.manual_seed(0)
    p, slots = fresh(rule, N, layout, dtype)
    p.mul_(64)  # fp16's normal range: there its 32-bit master is fp32 itself too
    p32, slots32 = copy_state(p.float(), slots)
    correction = torch.zeros(N, dtype=torch.int16)
    for step in range(1, 8):
        g = gradient(N, dtype, step)  # NaN / Inf on some steps: skipped blocks keep everything
        hp = hyper(rule, step)
        skipped = reference.update(rule, p, g, slots, hp, True, WeightFormat(correction=correction)).skipped_blocks
        assert skipped == reference.update(rule, p32, g.float(), slots32, hp, True).skipped_blocks
        assert_same(master.decode(p, correction), p32, f"step {step}: master")
        assert_same(p, master.encode(p32, dtype, 32)[0], f"step {step}: weight")
        for i, (ours, theirs) in enumerate(zip(slots, slots32)):
            assert_same(ours.values, theirs.values, f"step {step}: state {i}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_a_24_bit_master_keeps_what_the_weight_rounds_away(dtype):
    """Updates far below the weight's spacing: rounded to nearest they vanish, the master keeps them."""
    torch.manual_seed(1)
    p, slots = fresh("adam", N, "blockwise", dtype)
    p.fill_(1.0)
    plain, plain_slots = copy_state(p, slots)
    p32, slots32 = copy_state(p.float(), slots)
    correction = torch.zeros(N, dtype=torch.int8)
    for step in range(1, 21):
        g = torch.full((N,), 0.01)
        hp = hyper("adam", step)._replace(lr=1e-4, weight_decay=0.0)
        reference.update("adam", p, g.to(dtype), slots, hp, True, WeightFormat(correction=correction))
        reference.update("adam", plain, g.to(dtype), plain_slots, hp, True)
        reference.update("adam", p32, g, slots32, hp, True)
    assert torch.equal(plain.float(), torch.ones(N))  # every update rounded away
    got = master.decode(p, correction)
    assert float((got - p32).abs().max()) <= 2.0**-14 * 2  # 24 bits: 15 fraction bits
    assert float((got - p32).abs().max()) < 0.05 * float((p32 - 1).abs().max())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_stochastic_rounding_rounds_the_fp32_result_with_the_steps_draw(dtype):
    torch.manual_seed(2)
    p, slots = fresh("adam", N, "blockwise", dtype)
    p32, slots32 = copy_state(p.float(), slots)
    for step in range(1, 4):
        g, hp = gradient(N, dtype, step), hyper("adam", step)
        draw = master.Draw(master.step_key(SEED, step), 100)
        reference.update("adam", p, g, slots, hp, True, WeightFormat(draw=draw))
        reference.update("adam", p32, g.float(), slots32, hp, True)
        assert_same(p, master.stochastic_round(p32, dtype, draw), f"step {step}")
        p32.copy_(p.float())  # the next step starts from the rounded weight, as p's does


def test_a_master_with_stochastic_rounding_is_refused():
    p = torch.zeros(10, dtype=torch.bfloat16)
    slots = fresh("adam", 10, "fp32", torch.bfloat16)[1]
    weights = WeightFormat(correction=torch.zeros(10, dtype=torch.int8), draw=master.Draw(1))
    with pytest.raises(ValueError, match="not rounded stochastically"):
        reference.update("adam", p, torch.ones(10, dtype=torch.bfloat16), slots, hyper("adam", 1), True, weights)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        reference.update("adam", p.float(), torch.ones(10), slots, hyper("adam", 1), True,
                         WeightFormat(correction=torch.zeros(10, dtype=torch.int8)))  # fmt: skip
