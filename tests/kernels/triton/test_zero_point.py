"""The quantizer rule of never-negative states (issue #16) in the Triton kernel, under the
interpreter: a positive value never rounds to code 0 (``quant.blockwise.raise_positive_from_zero``),
bit for bit as the reference, for odd sizes, with tiny positive values, exact zeros and
subnormals, in both 8-bit layouts; and the fix of issue #16 item 2 (a 2e19 gradient spike)."""

from __future__ import annotations

import pytest
import torch
from support import INTERPRETER_MARKS, INTERPRETING, assert_backend_matches_reference, fresh
from support.zero_point import UNSIGNED_RULES, gradient, hyper


pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

SIZES = (1, 255, 257, 4097)
@pytest.mark.parametrize("layout", ["blockwise", "whole_tensor"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rule", UNSIGNED_RULES)
def test_positive_values_never_round_to_zero_bit_for_bit(rule, n, layout):
    p, slots = fresh(rule, n, layout, torch.float32)
    assert_backend_matches_reference(tk.update, rule, p, slots, ((gradient(n, s), hyper(rule, s)) for s in range(1, 4)), True)
    if n > 1:
        assert any(bool((slot.values == 1).any()) for slot in slots[-1:]), "no state at the smallest code"


@pytest.mark.parametrize("rule", ("adam", "ademamix", "rmsprop"))
def test_a_finite_spike_stays_finite_bit_for_bit(rule):
    p, slots = fresh(rule, 1000, "blockwise", torch.float32)
    assert_backend_matches_reference(tk.update, rule, p, slots, ((gradient(1000, s, 2e19), hyper(rule, s)) for s in (1, 2)), True)
    assert not torch.isnan(p).any()
