"""The optimizer step as a training loop sees it (issue #19): timed inside a real loop, right after
backward, for torch's AdamW (fused and foreach) and qoptim's AdamW8bit and AdamW4bit side by side
in one process, alternating, on the same model shapes, data and seed.

    python benchmarks/train_loop.py                         # the demo's GPT and a GPT-2-small-shaped one, fp32 and bf16
    python benchmarks/train_loop.py --models demo --dtypes bfloat16 --rounds 3
    python benchmarks/train_loop.py --models demo --rounds 1 --steps 2   # a smoke run

Why in a loop: after forward and backward torch's OpenMP threads keep spinning on the cores for a
while, and a step that runs threads of its own then competes with them; a step timed back to back
(``step_cpu.py``, ``step_many.py``) never sees that. Per model, dtype and optimizer: the median ms of
``step()`` and of forward + backward, each optimizer's step as a ratio to torch's fused step
measured in the same rounds. The header names the CPU, its threads and the kernel path qoptim's
CPU backend takes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import qoptim
from qoptim.cli import demo, machine
from qoptim.kernels.cpu import launch, paths

# name -> (width, layers, context, batch): the demo's GPT, and GPT-2 small's width and depth on the
# demo's 128-character vocabulary (85M parameters: its embeddings are small, its blocks GPT-2's)
MODELS = {"demo": (128, 2, 64, 16), "gpt2-small": (768, 12, 64, 4)}
OPTIMIZERS = {
    "torch AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    "torch AdamW foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
    "qoptim AdamW8bit": lambda params: qoptim.optim.AdamW8bit(params, lr=1e-3),
    "qoptim AdamW4bit": lambda params: qoptim.optim.AdamW4bit(params, lr=1e-3),
    # the same step on worker threads of qoptim's own instead of torch's OpenMP team (kernels/cpu/team.py)
    "AdamW8bit own threads": lambda params: OwnThreads(qoptim.optim.AdamW8bit(params, lr=1e-3)),
}
BASELINE = "torch AdamW fused"


class OwnThreads:
    """An optimizer whose step runs its parallel tasks on qoptim's worker threads (``launch.TEAM`` unset)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        team, launch.TEAM = launch.TEAM, None
        try:
            self.optimizer.step()
        finally:
            launch.TEAM = team

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


@dataclass
class Contestant:
    """One optimizer's model (the same initial weights for all) and its timings."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | OwnThreads
    step_ms: list[float] = field(default_factory=list)
    forward_backward_ms: list[float] = field(default_factory=list)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, keep: bool) -> None:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(x).float().view(-1, demo.VOCAB), y.view(-1))
        loss.backward()
        backward_done = time.perf_counter()
        self.optimizer.step()  # right after backward: torch's threads may still spin
        done = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if keep:
            self.forward_backward_ms.append((backward_done - start) * 1e3)
            self.step_ms.append((done - backward_done) * 1e3)


def contestants(model_name: str, dtype: torch.dtype, names: list[str], seed: int) -> list[Contestant]:
    width, layers, context, _ = MODELS[model_name]
    torch.manual_seed(seed)
    template = demo.TinyGPT(width, layers, context).to(dtype)
    made = []
    for name in names:
        model = demo.TinyGPT(width, layers, context).to(dtype)
        model.load_state_dict(template.state_dict())
        made.append(Contestant(name, model, OPTIMIZERS[name](model.parameters())))
    return made


def measure(model_name: str, dtype: torch.dtype, names: list[str], args) -> list[Contestant]:
    """Rounds over the optimizers, ``args.steps`` training steps each; the first round warms up."""
    runs = contestants(model_name, dtype, names, args.seed)
    *_, batch = MODELS[model_name]
    context = MODELS[model_name][2]
    batches = demo.batches(demo.load_corpus(), batch, context, torch.Generator().manual_seed(args.seed))
    for round_ in range(args.rounds + 1):
        for run in runs:
            for _ in range(args.steps if round_ else 2):
                x, y = next(batches)
                run.train_step(x, y, keep=round_ > 0)
    return runs


def table(model_name: str, dtype: torch.dtype, runs: list[Contestant]) -> str:
    params = sum(p.numel() for p in runs[0].model.parameters())
    tensors = len(list(runs[0].model.parameters()))
    step = {r.name: statistics.median(r.step_ms) for r in runs}
    base = step.get(BASELINE)
    lines = [f"{model_name}: {params:,} parameters in {tensors} tensors, {str(dtype).removeprefix('torch.')} weights",
             f"  {'optimizer':<22} {'step ms':>8} {'vs fused':>9} {'fwd+bwd ms':>11}"]  # fmt: skip
    for r in runs:
        ratio = f"{step[r.name] / base:.2f}x" if base else "-"
        lines.append(f"  {r.name:<22} {step[r.name]:>8.2f} {ratio:>9} {statistics.median(r.forward_backward_ms):>11.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds over the optimizers (one untimed round first)")
    parser.add_argument("--steps", type=int, default=5, help="training steps of one optimizer per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [m for m in models if m not in MODELS] + [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)}")
    machine.default_threads()
    print(f"{machine.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"qoptim CPU kernel path: {type(paths.current()).__name__}; parallel tasks on "
          f"{'the OpenMP team of torch' if launch.TEAM else 'worker threads of qoptim'}; {args.rounds} rounds of {args.steps} steps, alternating\n")  # fmt: skip
    for model_name in models:
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name.strip())
            print(table(model_name, dtype, measure(model_name, dtype, names, args)), flush=True)
            print()


if __name__ == "__main__":
    main()
