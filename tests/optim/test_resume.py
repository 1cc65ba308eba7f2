"""Exact resume across processes: N steps straight == k steps, torch.save, and a fresh Python
process that loads the checkpoint with weights_only=True and runs the remaining N - k steps.
Parameters and states must be bit-identical, for every family, dtype and backend."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import DTYPES

import qoptim

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported")

OPTIMIZERS = {
    "AdamW8bit": {}, "Adam8bit": {"weight_decay": 0.1, "block_wise": False}, "PagedAdamW8bit": {}, "AdamW32bit": {},
    "Lion8bit": {}, "AdEMAMix8bit": {"t_alpha": 4, "t_beta3": 4}, "RMSprop8bit": {}, "Adagrad8bit": {},
    "SGD8bit": {"lr": 0.01, "momentum": 0.9}, "LAMB8bit": {}, "LARS8bit": {"lr": 0.01, "momentum": 0.9},
    "Adam8bit-clipped": {"percentile_clipping": 80}, "AdamW4bit": {}, "Adam4bit-master": {"master_weight_bits": 24},
}  # fmt: skip
SHAPES = [(64, 81), (33,)]  # 8-bit state with a partial last block, and fp32 state
STEPS, SPLIT = 6, 3


def _case_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in SHAPES]


def _grads(dtype):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randn(s, generator=g) * 0.01).to(dtype) for s in SHAPES] for _ in range(STEPS)]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    cases, expected = {}, {}
    for opt_name, kwargs in OPTIMIZERS.items():
        cls = opt_name.split("-")[0]
        for dtype in DTYPES:
            for backend in ("reference", "auto"):
                name = f"{opt_name}-{str(dtype).removeprefix('torch.')}-{backend}"
                os.environ["QOPTIM_BACKEND"] = backend
                try:
                    grads = _grads(dtype)
                    straight = _case_params(dtype)
                    opt = getattr(qoptim.optim, cls)(straight, **kwargs)
                    _run(opt, straight, grads)
                    first = _case_params(dtype)
                    opt_first = getattr(qoptim.optim, cls)(first, **kwargs)
                    _run(opt_first, first, grads[:SPLIT])
                finally:
                    os.environ.pop("QOPTIM_BACKEND", None)
                checkpoint = {"model": [p.detach() for p in first], "optim": opt_first.state_dict(), "remaining_grads": grads[SPLIT:]}
                torch.save(checkpoint, tmp_path / f"{name}.pt")
                cases[name] = {"cls": cls, "kwargs": kwargs, "backend": backend}
                expected[name] = {"model": [p.detach().clone() for p in straight], "optim": opt.state_dict()}
    torch.save(cases, tmp_path / "cases.pt")
    worker = Path(__file__).resolve().parents[1] / "workers" / "resume_worker.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    mismatched = [name for name in cases if not _same(expected[name], results[name])]
    assert not mismatched, f"not bit-identical after resuming in a new process: {mismatched}"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
