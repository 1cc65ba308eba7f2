"""LAMB's and LARS's trust ratio, made on the device (``kernels.triton.trust``), against the
reference's, under Triton's interpreter (``TRITON_INTERPRET=1``, see ``support.interpreter``).

The kernel adds the float64 sums of squares in another order than the reference, so the ratio
agrees to a relative 1e-12, not bit for bit, and its float32 factor to an ulp.
"""

from __future__ import annotations

import pytest
import torch
from support import INTERPRETER_MARKS, INTERPRETING, LAYOUTS, TRUST_RULES, fresh, gradient, hyper

from qoptim.kernels import reference

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

STEPS = 5


@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", TRUST_RULES)
def test_trust_ratio_matches_reference(rule, layout, skip_nonfinite):
    """The device-side ratio to a relative 1e-12 (its float64 sums add in another order), its
    float32 factor to an ulp; over a run with the kernels' own ratio, in bf16."""
    for n in (1, 257, 4099):
        p, slots = fresh(rule, n, layout, torch.bfloat16)
        for step in range(1, STEPS + 1):
            g, hp = gradient(n, torch.bfloat16, step), hyper(rule, step)
            expected = reference.trust_ratio(rule, p, g, slots, hp, skip_nonfinite)
            got = tk.trust_ratio(rule, p, g, slots, hp, skip_nonfinite)
            assert got.ratio.dtype == torch.float64 and got.factor.dtype == torch.float32
            assert float(got.ratio) == pytest.approx(expected, rel=1e-12, abs=0), f"n {n}, step {step}"
            factor = hp.lr * expected if rule == "lamb" else expected
            assert float(got.factor) == pytest.approx(factor, rel=2**-23, abs=0)
            tk.update(rule, p, g, slots, hp, skip_nonfinite)


def test_lamb_cap_binds():
    """A ratio above max_unorm is cut to it (the test above would pass with no cap at all if
    the cap never bound)."""
    p, slots = fresh("lamb", 300, "fp32", torch.float32)
    g = torch.randn(300) * 0.01
    uncapped = float(tk.trust_ratio("lamb", p, g, slots, hyper("lamb", 1)).ratio)
    assert uncapped > 0.05
    capped = hyper("lamb", 1)._replace(max_unorm=0.05)
    assert float(tk.trust_ratio("lamb", p, g, slots, capped).ratio) == 0.05
