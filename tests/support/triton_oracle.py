"""The Triton backend's tests against the reference: the ``oracle`` fixture (the reference's trust
ratio in the kernels' steps, so that their steps are checked bit for bit given the ratio). Imports
the Triton backend: import it as ``support.triton_oracle`` after skipping without triton."""

from __future__ import annotations

import pytest
import torch

from qoptim.kernels import reference
from qoptim.kernels import triton as tk


def reference_trust_ratio(step: tk.Step) -> tk.TrustRatio:
    """``Step.trust_ratio`` as the reference computes it, of the master where there is one."""
    ratio = reference.trust_ratio(step.rule, step.p, step.g, step.slots, step.hp, step.skip_nonfinite, step.weights)
    factor = step.hp.lr * ratio if step.rule == "lamb" else ratio
    return tk.TrustRatio(torch.tensor([ratio], dtype=torch.float64), torch.tensor([factor], dtype=torch.float32))


@pytest.fixture
def oracle(monkeypatch):
    """The reference's trust ratio in the kernels' steps."""
    monkeypatch.setattr(tk.Step, "trust_ratio", reference_trust_ratio)
