"""ms per training step of the lean set-ups (``qoptim.cli.lean``), timed the way training runs them
(forward, backward, ``step()``; under gradient release the update runs inside backward) and
alternately in one process, so that their ratios see the same machine at the same moments.
``benchmarks/lean.py`` trains each set-up in a process of its own, hours apart on a shared
machine: its losses and bytes compare, its times less so.

    python benchmarks/lean_speed.py                      # lean.py's 21.4M GPT, its set-ups, 5 rounds of 10 steps
    python benchmarks/lean_speed.py --configs fp32-adamw8bit,bf16-master24 --rounds 3
    python benchmarks/lean_speed.py --width 64 --layers 1 --rounds 1 --steps 2   # a smoke run

Per set-up: the median ms of a whole step and of the optimizer's part (``step()``, plus under
release its work inside backward), and both as ratios to the first set-up's and to
``bf16-adamw8bit``'s (the plain 8-bit step on bf16 weights: the lean step's reference).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qoptim.cli import demo, lean, machine

DEFAULT = ",".join(lean.SETUPS)  # every set-up of qoptim.cli.lean
PLAIN_8BIT = "bf16-adamw8bit"


class Run:
    """One set-up's model, optimizer and the times of its steps."""

    def __init__(self, name: str, args):
        self.name, self.setup = name, lean.setup_of(name, "float32")
        torch.manual_seed(args.seed)
        self.model = demo.TinyGPT(args.width, args.layers, args.context).to(dtype=getattr(torch, self.setup.weights))
        self.opt = demo.make_optimizer(self.setup.optimizer, self.model.parameters(), args.lr, **self.setup.options())
        self.tracker = lean.Tracker(self.setup, self.model.parameters(), self.opt)  # release, and its time inside backward
        self.step_ms: list[float] = []
        self.opt_ms: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn, keep: bool) -> None:
        self.tracker.inside = 0.0
        start = time.perf_counter()
        loss = loss_fn(self.model(x).float().view(-1, demo.VOCAB), y.view(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        self.opt.step()
        end = time.perf_counter()
        if keep:
            self.step_ms.append((end - start) * 1e3)
            self.opt_ms.append((end - backward_done + self.tracker.inside) * 1e3)


def table(runs: list[Run]) -> str:
    medians = {r.name: (statistics.median(r.step_ms), statistics.median(r.opt_ms)) for r in runs}
    first = medians[runs[0].name]
    plain = medians.get(PLAIN_8BIT)
    header = ["set-up", "ms/step", f"vs {runs[0].name}", f"vs {PLAIN_8BIT}", "opt ms", f"opt vs {PLAIN_8BIT}"]
    rows = [header]
    for r in runs:
        step, opt = medians[r.name]
        rows.append([r.name, f"{step:.1f}", f"{step / first[0]:.2f}x", f"{step / plain[0]:.2f}x" if plain else "-", f"{opt:.2f}",
                     f"{opt / plain[1]:.2f}x" if plain else "-"])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT, help="comma-separated set-ups of qoptim.cli.lean (the first is the baseline)")
    lean.add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over every set-up")
    parser.add_argument("--steps", type=int, default=10, help="steps of one set-up in a round (timed; one untimed warm-up round first)")
    args = parser.parse_args()
    machine.default_threads()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in lean.SETUPS and n not in lean.SHORT_NAMES]
    if unknown or not names:
        raise SystemExit(f"unknown set-up {', '.join(unknown) or '(none given)'}; choose from {', '.join(lean.SETUPS)}")
    runs = [Run(name, args) for name in names]
    data = demo.load_corpus()
    batches = demo.batches(data, args.batch, args.context, torch.Generator().manual_seed(args.seed))
    loss_fn = nn.CrossEntropyLoss()
    for round_ in range(args.rounds + 1):  # round 0 warms up: compilation, first allocations, states
        for run in runs:
            for _ in range(args.steps if round_ else 2):
                x, y = next(batches)
                run.step(x, y, loss_fn, keep=round_ > 0)
    for run in runs:
        run.tracker.close()
    params = sum(p.numel() for p in runs[0].model.parameters())
    print(f"GPT of {params:,} parameters (width {args.width}, {args.layers} layers, context {args.context}, batch {args.batch}); "
          f"{args.rounds} rounds of {args.steps} steps per set-up, alternating; {machine.cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print(table(runs))


if __name__ == "__main__":
    main()
