"""How far each 4-bit format's Adam step drifts from fp32 Adam's along one training run (issue #18).

The lean GPT of ``benchmarks/lean.py`` trains with fp32 AdamW (torch). Beside it, for each format of
``state_formats.CANDIDATES``, a shadow pair of moments (m, v) is kept in that format and updated
with the very same gradients (decoded, updated in fp32, stored again, as the 8-bit optimizers do).
Every ``--every`` steps it prints, per format, the shadow Adam step against fp32 Adam's over the
watched tensors: the ratio of their norms (``rms``: above 1, steps too large) and their cosine.
A format whose rounding loses the small updates of a moving average (``beta2 = 0.999`` moves v by
0.1% a step, far below a 4-bit code's spacing) drifts here long before the loss shows it.

    python benchmarks/state_tracking.py                       # 1,000 steps, layers 6 and the head
    python benchmarks/state_tracking.py --formats ao4-nearest,ao4-vsr --steps 300 --every 50
    python benchmarks/state_tracking.py --table               # the saved result as a Markdown table

Results (JSON, rewritten at each report): benchmarks/results/state_tracking/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from state_formats import CANDIDATES, store
from torch import nn

from qoptim.cli import demo, machine

RESULTS = Path(__file__).parent / "results" / "state_tracking"
DEFAULT_FORMATS = "ao4-nearest,ao4-stochastic,ao4-vsr,sqrt-v-nearest"


def adam_step(m: torch.Tensor, v: torch.Tensor, step: int, betas=(0.9, 0.999), eps=1e-8) -> torch.Tensor:
    """Adam's step direction (before the learning rate) from moments m and v."""
    return m / (1 - betas[0] ** step) / ((v / (1 - betas[1] ** step)).sqrt() + eps)


def markdown(report: dict) -> str:
    """The saved report as a table: a row per reported step, rms / cos per format."""
    lines = ["| step | " + " | ".join(f"`{n}` rms / cos" for n in report["formats"]) + " |",
             "|---:|" + "---:|" * len(report["formats"])]  # fmt: skip
    for i, step in enumerate(report["steps"]):
        cells = [f"{report['rms'][n][i]:.3f} / {report['cos'][n][i]:.3f}" for n in report["formats"]]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=DEFAULT_FORMATS)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--watch", default="layers.6.,head", help="tensors whose names contain one of these (comma-separated)")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the saved result as a Markdown table")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads((args.results / "tracking.json").read_text())))
        return
    torch.set_num_threads(args.threads) if args.threads else machine.default_threads()
    formats = {name: CANDIDATES[name] for name in args.formats.split(",")}

    data = demo.load_corpus()
    torch.manual_seed(0)
    model = demo.TinyGPT(args.width, args.layers, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, demo.SCHEDULES["cosine"](2000))
    batches = demo.batches(data[: int(0.9 * len(data))], 8, 64, torch.Generator().manual_seed(0))
    keys = args.watch.split(",")
    watched = [p for n, p in model.named_parameters() if p.numel() >= 4096 and any(k in n for k in keys)]
    shadows = {name: [(torch.zeros_like(p), torch.zeros_like(p)) for p in watched] for name in formats}
    gen = torch.Generator().manual_seed(1)
    b1, b2 = 0.9, 0.999
    report = dict(formats=list(formats), watched=sum(p.numel() for p in watched), width=args.width, layers=args.layers,
                  lr=args.lr, cpu=machine.cpu_name(), steps=[], rms={n: [] for n in formats}, cos={n: [] for n in formats})  # fmt: skip
    started = time.time()
    for step in range(1, args.steps + 1):
        x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x).view(-1, demo.VOCAB), y.view(-1))
        opt.zero_grad()
        loss.backward()
        for name, fmt in formats.items():
            shadows[name] = [(store(b1 * m + (1 - b1) * p.grad, fmt.m, gen), store(b2 * v + (1 - b2) * p.grad * p.grad, fmt.v, gen))
                             for p, (m, v) in zip(watched, shadows[name])]  # fmt: skip
        opt.step()
        schedule.step()
        if step % args.every == 0:
            exact = torch.cat([adam_step(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], step).flatten() for p in watched])
            line = [f"step {step:5d} loss {loss.item():.3f}"]
            report["steps"].append(step)
            for name in formats:
                mine = torch.cat([adam_step(m, v, step).flatten() for m, v in shadows[name]])
                rms, cos = (mine.norm() / exact.norm()).item(), nn.functional.cosine_similarity(mine, exact, 0).item()
                report["rms"][name].append(round(rms, 4))
                report["cos"][name].append(round(cos, 4))
                line.append(f"{name} rms {rms:.3f} cos {cos:.3f}")
            print(" | ".join(line), flush=True)
            report["seconds"] = round(time.time() - started, 1)
            args.results.mkdir(parents=True, exist_ok=True)
            (args.results / "tracking.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
