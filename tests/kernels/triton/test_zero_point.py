"""The quantizer rule of never-negative states (issue #16) in the Triton kernel, under the
interpreter: a positive value never rounds to code 0 (``quant.blockwise.raise_positive_from_zero``),
bit for bit as the reference, for odd sizes, with tiny positive values, exact zeros and
subnormals, in both 8-bit layouts; and the fix of issue #16 item 2 (a 2e19 gradient spike)."""

from __future__ import annotations

import pytest
import torch
from support import INTERPRETER_MARKS, INTERPRETING, assert_backend_matches_reference, exact_sqrt, fresh

from qoptim.kernels.types import Hyper

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

SIZES = (1, 255, 257, 4097)
UNSIGNED_RULES = ("adam", "ademamix", "rmsprop", "adagrad")  # LAMB: test_rules.py, with its trust ratio


def hyper(rule: str, step: int) -> Hyper:
    common = dict(lr=1e-3, eps=1e-8, weight_decay=0.0, step=step, decoupled=True)
    if rule == "rmsprop":
        return Hyper(beta1=0.0, beta2=0.0, smoothing=0.99, **common)
    if rule == "adagrad":
        return Hyper(beta1=0.0, beta2=0.0, **common)
    return Hyper(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, **common)


def gradient(n: int, step: int, spike: float = 1.0) -> torch.Tensor:
    """Per block one large value (``spike``); tiny ones whose squares fall below the unsigned
    map's smallest code, exact zeros, subnormals (squares 0)."""
    gen = torch.Generator().manual_seed(step)
    g = torch.logspace(-4, -9, 6)[torch.randint(0, 6, (n,), generator=gen)]
    g = g * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    kind = torch.randint(0, 8, (n,), generator=gen)
    g[kind == 0] = 0.0
    g[kind == 1] = 1e-40
    g[kind == 2] = -3e-39
    g[::256] = spike
    return g


@pytest.mark.parametrize("layout", ["blockwise", "whole_tensor"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rule", UNSIGNED_RULES)
def test_positive_values_never_round_to_zero_bit_for_bit(rule, n, layout):
    p, slots = fresh(rule, n, layout, torch.float32)
    with exact_sqrt():
        assert_backend_matches_reference(tk.update, rule, p, slots, ((gradient(n, s), hyper(rule, s)) for s in range(1, 4)), True)
    if n > 1:
        assert any(bool((slot.values == 1).any()) for slot in slots[-1:]), "no state at the smallest code"


@pytest.mark.parametrize("rule", ("adam", "ademamix", "rmsprop"))
def test_a_finite_spike_stays_finite_bit_for_bit(rule):
    p, slots = fresh(rule, 1000, "blockwise", torch.float32)
    with exact_sqrt():
        assert_backend_matches_reference(tk.update, rule, p, slots, ((gradient(1000, s, 2e19), hyper(rule, s)) for s in (1, 2)), True)
    assert not torch.isnan(p).any()
