"""The quantizer rule of never-negative states (issue #16): a positive value never rounds to
code 0 (``quant.blockwise.raise_positive_from_zero``), in the CPU kernel bit for bit as in the
reference, on every path, for odd sizes, with tiny positive values, exact zeros and subnormals."""

import pytest
import torch
from support.cpu_states import assert_same, copy_state, torch_threads
from support.cpu_states import make_rule_state as make_state
from support.zero_point import UNSIGNED_RULES, gradient, hyper

from qoptim.kernels import cpu, reference
from qoptim.kernels.rules import RULES

SIZES = [1, 255, 257, 4097]
@pytest.mark.parametrize("layout", ["block", "whole"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rule", UNSIGNED_RULES)
def test_positive_values_never_round_to_zero_bit_for_bit(rule, n, layout, path):
    p_ref, slots_ref = make_state(rule, n, torch.float32, layout)
    p, slots = copy_state(p_ref, slots_ref)
    unsigned = [i for i, signed in enumerate(RULES[rule].signed) if not signed]
    raised = 0
    for step in range(1, 5):
        g = gradient(n, step)
        hp = hyper(rule, step)
        expected = reference.update(rule, p_ref, g, slots_ref, hp, True)
        with torch_threads(2):
            got = cpu.update(rule, p, g, slots, hp, True)
        assert got == expected
        assert_same(p, p_ref)
        for ours, theirs in zip(slots, slots_ref):
            assert_same(ours.values, theirs.values)
            assert_same(ours.absmax, theirs.absmax)
        raised += sum(int((slots[i].values == 1).sum()) for i in unsigned)
    if n > 1:  # (one element is its own block's largest)
        assert raised, "the gradients never brought a positive state to the smallest code"
