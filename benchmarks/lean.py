"""Lean training (issues #17, #18): a GPT of 21.4M parameters trained on the demo's text with each
set-up of qoptim.cli.lean, one process per set-up, on the same seed and data order.

    python benchmarks/lean.py                      # every set-up without a result yet (2,000 steps each: hours on 2 cores)
    python benchmarks/lean.py --configs bf16-master24,bf16-master32 --force   # these again
    python benchmarks/lean.py --steps 20 --width 64 --layers 1 --results /tmp/lean   # a smoke run
    python benchmarks/lean.py --configs fp32-torch-adamw,bf16-master24 --seeds 1,2   # more seeds of these
    python benchmarks/lean.py --table              # the table and docs/lean.png from the results there

One run is one draw: bf16 rounding, 4-bit codes or another seed move the trajectory, and at 512
tokens a step the final loss of one run moves by several percent with it. ``--seeds`` runs each
set-up on several seeds (the seed sets the initial weights and the data order); the table gives
each set-up's mean final validation loss over its seeds, their spread (lowest to highest) and
the mean's ratio to the baseline's mean. Seed 0's result is ``<set-up>.json``, another seed's
``<set-up>-seed<N>.json``.

Per set-up (qoptim.cli.demo.train does the training; lean.Tracker counts): the peak bytes per
parameter of weights + gradients + master corrections + optimizer states, counted from live
tensors on the first steps and the last (after backward, after step(), and under gradient release
inside backward, where the gradients are freed as they are applied); ms per step, whole and the
optimizer's share (under release, its work inside backward); the validation loss and the loss
curve. Each result is a JSON file in --results (named after the set-up), with the CPU, torch
version and threads it ran on, so that set-ups can be run separately, over several sessions; the
table compares them with fp32 weights + torch AdamW (the baseline) and warns when they differ in
model, steps or machine. torchao's AdamW8bit and AdamW4bit with bf16_stochastic_round=True run when
torchao is installed (they are skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from qoptim.cli import demo, lean, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lean"
# torchao's optimizers on bf16 weights with its stochastic rounding (its leanest set-ups), by the class they build
TORCHAO = {
    setup.name: setup
    for setup in (
        lean.Setup("torchao-bf16-sr", "bf16 weights, torchao AdamW8bit, bf16_stochastic_round=True", optimizer="AdamW8bit"),
        lean.Setup("torchao-4bit-bf16-sr", "bf16 weights, torchao AdamW4bit, bf16_stochastic_round=True", optimizer="AdamW4bit"),
    )
}
CONFIGS = {**lean.SETUPS, **TORCHAO}
BASELINE = "fp32-torch-adamw"
SAME = ("params", "steps", "width", "layers", "context", "batch", "lr", "schedule", "val_batches", "cpu", "threads", "torch")  # a fair table's


def torchao_installed() -> bool:
    try:
        import torchao.optim  # noqa: F401
    except ImportError:
        return False
    return True


def make_torchao(name: str, params, lr: float, **options) -> torch.optim.Optimizer:
    """The torchao optimizer of set-up ``name`` (its class: torchao.optim.AdamW8bit, AdamW4bit)."""
    import torchao.optim

    return getattr(torchao.optim, TORCHAO[name].optimizer)(params, lr=lr, bf16_stochastic_round=True)


def run_config(args, name: str) -> dict:
    """Train set-up ``name`` in this process and return its result with what it ran on."""
    setup = CONFIGS[name]
    torch.set_num_threads(args.threads) if args.threads else machine.default_threads()
    config = demo.RunConfig(optimizer=name, steps=args.steps, dtype=setup.weights, lr=args.lr, batch=args.batch,
                            context=args.context, width=args.width, layers=args.layers, seed=args.seed, evals=args.evals,
                            schedule=args.schedule, val_batches=args.val_batches)  # fmt: skip
    make = make_torchao if name in TORCHAO else demo.make_optimizer
    started = time.time()
    result = demo.train(config, progress=not args.quiet, make=make)
    return {
        "config": name, "description": setup.description, "setup": asdict(setup), "run": asdict(config),
        "result": asdict(result), "params": result.params, "steps": args.steps, "width": args.width, "layers": args.layers,
        "context": args.context, "batch": args.batch, "lr": args.lr, "schedule": args.schedule, "val_batches": args.val_batches,
        "seed": args.seed,
        "cpu": machine.cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip


def run_all(args) -> int:
    names = [n.strip() for n in args.configs.split(",") if n.strip()] if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        sys.exit(f"unknown configuration {', '.join(unknown) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    skipped = [n for n in names if n in TORCHAO] if not torchao_installed() else []
    if skipped:
        print(f"torchao is not installed: {', '.join(skipped)} skipped (pip install torchao to run it)")
        names = [n for n in names if n not in skipped]
    args.results.mkdir(parents=True, exist_ok=True)
    shared = ("steps", "width", "layers", "context", "batch", "lr", "schedule", "val_batches", "evals", "threads")
    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in shared] + (["--quiet"] if args.quiet else [])
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    for name in names:
        for seed in seeds:
            path = args.results / result_name(name, seed)
            if path.exists() and not args.force:
                print(f"{name}, seed {seed}: {path} exists (--force to run it again)")
                continue
            print(f"== {name}, seed {seed}: {CONFIGS[name].description}", flush=True)
            # One process per run: its allocations, threads and compiled kernels are its own.
            cmd = [sys.executable, __file__, "--run", name, "--seed", str(seed), "--results", str(args.results), *forwarded]
            done = subprocess.run(cmd)
            if done.returncode:
                print(f"{name} failed (exit code {done.returncode})", file=sys.stderr)
                return done.returncode
    return print_table(args)


def result_name(name: str, seed: int) -> str:
    return f"{name}.json" if seed == 0 else f"{name}-seed{seed}.json"


def load(folder: Path) -> list[list[dict]]:
    """The results in ``folder``, one list (its seeds, in order) per set-up; known set-ups first."""
    found: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        found.setdefault(r["config"], []).append(r)
    runs = [found.pop(name) for name in CONFIGS if name in found] + list(found.values())
    return [sorted(seeds, key=lambda r: r.get("seed", 0)) for seeds in runs]


def final_losses(seeds: list[dict]) -> list[float]:
    return [r["result"]["val_losses"][-1] for r in seeds]


def baseline(runs: list[list[dict]]) -> tuple[dict | None, float | None]:
    """The baseline's first run's result and its mean final validation loss over its seeds (None, None: no baseline)."""
    seeds = next((seeds for seeds in runs if seeds[0]["config"] == BASELINE), None)
    return (seeds[0]["result"], statistics.mean(final_losses(seeds))) if seeds else (None, None)


def ratio(mine: float, base: float | None) -> str:
    return f"{mine / base:.2f}x" if base else "-"


def table(runs: list[list[dict]]) -> str:
    """One row per set-up: bytes and times of its first seed's run, the final validation loss as
    the mean over its seeds, their spread, and the mean against the baseline's mean."""
    base, base_loss = baseline(runs)
    header = ["configuration", "B/param", "weights", "grads", "master", "states", "vs base", "ms/step", "vs base", "opt ms",
              "seeds", "val loss", "spread", "vs base"]  # fmt: skip
    rows = [header]
    for seeds in runs:
        r = seeds[0]
        res, n = r["result"], r["params"]
        parts = [f"{res['train_parts'].get(k, 0) / n:.3f}" for k in ("weights", "grads", "master", "states")]
        losses = final_losses(seeds)
        val = statistics.mean(losses)
        rows.append([
            r["config"], f"{res['train_bytes'] / n:.3f}", *parts, ratio(res["train_bytes"], base and base["train_bytes"]),
            f"{res['ms_per_step']:.1f}", ratio(res["ms_per_step"], base and base["ms_per_step"]),
            f"{res['optimizer_ms_per_step']:.2f}", str(len(seeds)), f"{val:.4f}",
            f"{min(losses):.4f}-{max(losses):.4f}" if len(losses) > 1 else "-",
            f"{100 * (val / base_loss - 1):+.2f}%" if base else "-",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    results = [r for seeds in runs for r in seeds]
    first = results[0]
    lines.insert(0, f"GPT of {first['params']:,} parameters (width {first['width']}, {first['layers']} layers, context "
                    f"{first['context']}, batch {first['batch']}, lr {first['lr']}), {first['steps']} steps; {first['cpu']}, "
                    f"{first['threads']} threads, torch {first['torch']}\n")  # fmt: skip
    for key in SAME:
        values = {str(r[key]) for r in results}
        if len(values) > 1:
            lines.append(f"warning: the results differ in {key}: {', '.join(sorted(values))} (not comparable)")
    return "\n".join(lines)


def markdown(runs: list[list[dict]]) -> str:
    """The table's bytes and losses as Markdown (README's table)."""
    _, base_loss = baseline(runs)
    lines = ["| set-up | B/param | seeds | final val loss (mean) | seeds' spread | vs fp32 AdamW |", "|---|---:|---:|---:|---:|---:|"]
    for seeds in runs:
        r, losses = seeds[0], final_losses(seeds)
        mean = statistics.mean(losses)
        spread = f"{min(losses):.4f}–{max(losses):.4f}" if len(losses) > 1 else "–"
        versus = f"{100 * (mean / base_loss - 1):+.1f}%" if base_loss else "–"
        lines.append(f"| `{r['config']}` | {r['result']['train_bytes'] / r['params']:.3f} | {len(losses)} | {mean:.4f} | {spread} | {versus} |")
    return "\n".join(lines)


def plot(runs: list[list[dict]], path: Path) -> Path | None:
    """Each set-up's loss curves on its first seed."""
    results = [seeds[0] for seeds in runs]
    plt = demo.pyplot()
    if plt is None:
        return None
    fig, (ax, val) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    for i, r in enumerate(results):
        res = r["result"]
        smooth = demo.ema(res["train_losses"], 0.98)
        label = f"{r['config']} ({res['train_bytes'] / r['params']:.3f} B/param)"
        ax.plot(range(1, len(smooth) + 1), smooth, color=f"C{i}", linewidth=1.2, label=label)
        val.plot(res["val_steps"], res["val_losses"], "o-", color=f"C{i}", markersize=3, linewidth=1, label=r["config"])
    ax.set_title("training loss (EMA 0.98)", fontsize=9)
    val.set_title("validation loss", fontsize=9)
    for a in (ax, val):
        a.set_xlabel("step")
        a.set_ylabel("cross-entropy (nats/char)")
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    first = results[0]
    fig.suptitle(f"Lean training: GPT of {first['params']:,} parameters, {first['steps']} steps, same data and seed (each set-up's first)")
    return demo.save_figure(plt, fig, path)


def print_table(args) -> int:
    results = load(args.results)
    if not results:
        print(f"no results in {args.results}")
        return 1
    if args.markdown:
        print(markdown(results))
        return 0
    print(table(results))
    path = plot(results, args.png or (ROOT / "docs" / "lean.png" if args.results == RESULTS else args.results / "lean.png"))
    if path is not None:
        print(f"loss curves: {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="", help=f"comma-separated, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--steps", type=int, default=2000)
    lean.add_model_arguments(parser)
    parser.add_argument("--evals", type=int, default=20, help="validation losses along the run")
    parser.add_argument("--schedule", choices=sorted(demo.SCHEDULES), default="cosine",
                        help="the lr: warmup then cosine decay to 10%% (default; settled last losses), or constant")
    parser.add_argument("--val-batches", type=int, default=32, help="batches each validation loss averages")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: every core this process may use)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds to run each set-up on (default: --seed's one)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--png", type=Path, help="default: docs/lean.png for the default --results, else lean.png there")
    parser.add_argument("--force", action="store_true", help="run set-ups that have a result already")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--table", action="store_true", help="only print the table and draw the plot from the results")
    parser.add_argument("--markdown", action="store_true", help="with --table: bytes and losses as Markdown, no plot")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # the child: one set-up, in this process
    args = parser.parse_args()
    if args.table:
        return print_table(args)
    if args.run is None:
        return run_all(args)
    out = run_config(args, args.run)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / result_name(args.run, args.seed)).write_text(json.dumps(out, indent=1))
    r = out["result"]
    print(f"{args.run}: {r['train_bytes'] / r['params']:.3f} B/param, {r['ms_per_step']:.1f} ms/step, "
          f"val loss {r['val_losses'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
