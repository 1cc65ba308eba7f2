"""Second half of the exact-resume test, run in a fresh process: load each checkpoint the test
wrote, finish its run, and save the final parameters and optimizer states.

Launched by tests/optim/test_resume.py. Usage: python resume_worker.py DIR   (DIR holds cases.pt and one checkpoint per case)
"""

import os
import sys
from pathlib import Path

import torch

import qoptim


def finish(case: dict, checkpoint: dict) -> dict:
    os.environ["QOPTIM_BACKEND"] = case["backend"]
    params = [torch.nn.Parameter(t.clone()) for t in checkpoint["model"]]
    opt = getattr(qoptim.optim, case["cls"])(params, **case["kwargs"])
    opt.load_state_dict(checkpoint["optim"])
    for grads in checkpoint["remaining_grads"]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return {"model": [p.detach() for p in params], "optim": opt.state_dict()}


def main(folder: Path) -> None:
    cases = torch.load(folder / "cases.pt", weights_only=True)
    results = {name: finish(case, torch.load(folder / f"{name}.pt", weights_only=True)) for name, case in cases.items()}
    torch.save(results, folder / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
