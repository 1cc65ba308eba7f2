"""The optimizer classes on the Triton backend against the same classes on the reference, bit for
bit, under Triton's interpreter (``TRITON_INTERPRET=1``, see ``support.interpreter``): the
backend registered for CPU tensors here, with the optimizers' own state layouts (AdEMAMix's
stacked momenta, the whole-tensor scales) and their batching of small tensors.
"""

from __future__ import annotations

import pytest
import torch
from support import INTERPRETER_MARKS, INTERPRETING, assert_same, count_calls

import qoptim
from qoptim import kernels

pytestmark = INTERPRETER_MARKS
pytest.importorskip("triton")

from qoptim.kernels import triton as tk  # noqa: E402  (after the skip: triton is optional)
from qoptim.kernels.triton import batch  # noqa: E402

assert tk.INTERPRETED or not INTERPRETING, "triton was imported before TRITON_INTERPRET was set"

STEPS = 5

# Each family's 8-bit optimizer class (the weights 8-bit, the biases below min_8bit_size 32-bit);
# the whole-tensor layout on some.
OPTIMIZER_RUNS = {
    "AdamW8bit": dict(block_wise=False),
    "AdEMAMix8bit": dict(weight_decay=0.01),
    "Lion8bit": dict(lr=1e-4, weight_decay=0.01),
    "SGD8bit": dict(lr=1e-2, momentum=0.9, nesterov=True),
    "LARS8bit": dict(lr=1e-1, momentum=0.9, weight_decay=1e-4),
    "RMSprop8bit": dict(block_wise=False),
    "Adagrad8bit": dict(lr=1e-2),
    "LAMB8bit": dict(weight_decay=0.01),
}


@pytest.fixture
def triton_for_cpu_tensors():
    """The Triton backend registered for CPU tensors (the interpreter runs it on them), then the
    CPU backend again."""
    kernels.register("cpu", "qoptim.kernels.triton")
    try:
        yield
    finally:
        kernels.register("cpu", "qoptim.kernels.cpu")


def train(name: str, settings: dict, backend: str, monkeypatch) -> torch.nn.Module:
    monkeypatch.setenv("QOPTIM_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = getattr(qoptim.optim, name)(model.parameters(), **{"lr": 1e-3, "min_8bit_size": 1000, **settings})
    x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("name", OPTIMIZER_RUNS)
def test_optimizers_train_through_the_kernels_as_through_the_reference(triton_for_cpu_tensors, monkeypatch, name):
    """LAMB and LARS run on the kernels' own trust ratio here: its float32 factor rounds as the
    reference's does (but for a ratio within ~1e-15 of a rounding boundary, which these runs do
    not meet). The three tensors with 32-bit states (below min_8bit_size) go in one batched
    launch, but for LAMB's and LARS's."""
    single, batched = count_calls(monkeypatch, tk, "update"), count_calls(monkeypatch, batch, "run")
    ours = train(name, OPTIMIZER_RUNS[name], "auto", monkeypatch)
    theirs = train(name, OPTIMIZER_RUNS[name], "reference", monkeypatch)
    batched_jobs = [len(call[0]) for call in batched]
    assert len(single) + sum(batched_jobs) == 4 * STEPS  # every parameter, every step, through the kernels
    assert batched_jobs == ([] if name in ("LAMB8bit", "LARS8bit") else [3] * STEPS)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert_same(a.detach(), b.detach())
