"""The quantizer rule of never-negative states (issue #16): a positive value never rounds to
code 0 (``quant.blockwise.raise_positive_from_zero``), in the CPU kernel bit for bit as in the
reference, on every path, for odd sizes, with tiny positive values, exact zeros and subnormals."""

import pytest
import torch
from support import exact_sqrt
from support.cpu_states import assert_same, copy_state, torch_threads
from support.cpu_states import make_rule_state as make_state

from qoptim.kernels import Hyper, cpu, reference
from qoptim.kernels.rules import RULES

SIZES = [1, 255, 257, 4097]
# rules with a never-negative state and no trust ratio (LAMB shares these tasks: test_rules.py)
UNSIGNED_RULES = ["adam", "ademamix", "rmsprop", "adagrad"]


def hyper(rule, step):
    common = dict(lr=1e-3, eps=1e-8, weight_decay=0.0, step=step, decoupled=True)
    if rule == "rmsprop":
        return Hyper(beta1=0.0, beta2=0.0, smoothing=0.99, **common)
    if rule == "adagrad":
        return Hyper(beta1=0.0, beta2=0.0, **common)
    return Hyper(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, **common)


def gradient(n, step):
    """Per block one large value; tiny positive and negative ones whose squares round to codes
    below the unsigned map's smallest (1e-4 .. 1e-9 of it), exact zeros, subnormals (squares 0),
    on places that move with the step."""
    gen = torch.Generator().manual_seed(step)
    tiny = torch.logspace(-4, -9, 6)[torch.randint(0, 6, (n,), generator=gen)]
    g = tiny * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    kind = torch.randint(0, 8, (n,), generator=gen)
    g[kind == 0] = 0.0
    g[kind == 1] = 1e-40  # subnormal
    g[kind == 2] = -3e-39
    g[::256] = 1.0
    if step % 2 == 0:
        g[kind == 3] = 0.0  # a unit gone dead after a step with a gradient
    return g


@pytest.mark.parametrize("layout", ["block", "whole"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rule", UNSIGNED_RULES)
def test_positive_values_never_round_to_zero_bit_for_bit(rule, n, layout, path):
    p_ref, slots_ref = make_state(rule, n, torch.float32, layout)
    p, slots = copy_state(p_ref, slots_ref)
    unsigned = [i for i, signed in enumerate(RULES[rule].signed) if not signed]
    raised = 0
    with exact_sqrt():
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
