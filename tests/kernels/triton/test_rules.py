"""The Triton (CUDA) kernels against the reference, every rule, layout and parameter dtype, run
by Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, see ``support.interpreter``).

What must agree, step by step: every bit of the parameters, of the 8-bit codes and block scales,
and of the fp32 states (``support.oracle``). The reference's square root is correctly rounded
(``reference.sqrt``: through float64 on the CPU, where torch's fp32 ``sqrt`` is not always), as
the kernels' ``sqrt_rn`` is (as numpy under the interpreter, and CUDA, are).

The one thing not bit for bit is the trust ratio of LAMB and LARS, whose float64 sums the kernel
adds in another order than the reference: it is checked on its own (``test_trust.py``), and the
steps of those rules here are checked bit for bit given the reference's ratio.
"""

from __future__ import annotations

import math

import pytest
import torch
from support import (INTERPRETER_MARKS, INTERPRETING, LAYOUTS, PARAM_DTYPES, RULES, assert_backend_matches_reference, copy_state,
                     dtype_id, fresh, gradient, hyper)  # fmt: skip

from qoptim.kernels import rules
from qoptim.kernels.types import BLOCK, StateSlot
from qoptim.quant.maps import signed_map

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)
from support.triton_oracle import oracle  # noqa: E402,F401  (the fixture)
from qoptim.kernels.triton import launch  # noqa: E402

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

SIZES = (1, 255, 257, 4099)  # odd sizes: a partial block, one past a block, many blocks and a partial one
STEPS = 5


def check_steps(rule: str, n: int, layout: str, dtype: torch.dtype, skip_nonfinite: bool) -> None:
    """STEPS steps of the kernel and of the reference, side by side."""
    p, slots = fresh(rule, n, layout, dtype)
    steps = ((gradient(n, dtype, step), hyper(rule, step)) for step in range(1, STEPS + 1))
    skipped = assert_backend_matches_reference(tk.update, rule, p, slots, steps, skip_nonfinite)
    if skip_nonfinite and n > 4 * BLOCK:
        assert skipped[4] == 2  # step 5: two blocks with a NaN


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_matches_reference(oracle, rule, layout, dtype):
    """Skipping blocks with NaN / Inf gradients: same skipped-block count and bits, every step."""
    for n in SIZES:
        check_steps(rule, n, layout, dtype, skip_nonfinite=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES)
def test_nonfinite_gradients_propagate_as_in_reference(oracle, rule, layout):
    """Without skipping, NaN and Inf flow into parameters, states and scales as in the reference."""
    check_steps(rule, 1000, layout, torch.float32, skip_nonfinite=False)


@pytest.mark.parametrize("rule", ["adam", "lion", "ademamix"])
def test_skipped_block_keeps_its_bytes(rule):
    n = 4 * BLOCK
    p, slots = fresh(rule, n, "blockwise", torch.float32)
    tk.update(rule, p, torch.randn(n) * 0.01, slots, hyper(rule, 1))  # non-trivial states
    before_p, before = copy_state(p, slots)
    g = torch.randn(n) * 0.01
    g[BLOCK + 5] = math.inf
    assert tk.update(rule, p, g, slots, hyper(rule, 2)).skipped_blocks == 1
    kept = slice(BLOCK, 2 * BLOCK)
    assert torch.equal(p[kept], before_p[kept]) and not torch.equal(p[:BLOCK], before_p[:BLOCK])
    for s, b in zip(slots, before):
        assert torch.equal(s.values[kept], b.values[kept]) and s.absmax[1] == b.absmax[1]


def test_supports_every_rule_in_one_layout():
    p = torch.zeros(300)
    blockwise = StateSlot(torch.zeros(300, dtype=torch.uint8), signed_map(), torch.zeros(2))
    for rule in RULES:
        count = rules.RULES[rule].states
        assert tk.supports(rule, p, [blockwise] * count)
        assert tk.supports(rule, p.bfloat16(), [StateSlot(torch.zeros(300))] * count)
        assert not tk.supports(rule, p, [blockwise] * (count + 1))  # a state too many
    assert not tk.supports("no-such-rule", p, [blockwise])
    assert not tk.supports("adam", p.double(), [blockwise] * 2)
    assert not tk.supports("adam", p, [blockwise, StateSlot(torch.zeros(300))])  # mixed layouts
    blocks_of_128 = StateSlot(torch.zeros(300, dtype=torch.uint8), signed_map(), torch.zeros(3), 128)
    assert not tk.supports("adam", p, [blocks_of_128] * 2)
    with pytest.raises(ValueError):
        tk.trust_ratio("adam", p, p, [blockwise] * 2, hyper("adam", 1))


def test_search_table_is_built_once_per_map():
    code = signed_map().clone()
    table = launch.search_table(code)
    assert launch.search_table(code) is table
    assert torch.equal(table[:255], (code[:-1] + code[1:]) * 0.5) and table[255] == math.inf
    code[0] = -0.99  # changed in place: a new table
    rebuilt = launch.search_table(code)
    assert rebuilt is not table and rebuilt[0] == (code[0] + code[1]) * 0.5
