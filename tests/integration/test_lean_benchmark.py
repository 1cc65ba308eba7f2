"""Smoke runs of benchmarks/lean.py (its full run: a 21.4M-parameter GPT, 2,000 steps per set-up):
one process per set-up, a JSON per set-up, a table against the fp32 AdamW baseline and a PNG; and
of benchmarks/lean_speed.py (every set-up timed alternately in one process)."""

import json
import subprocess
import sys
from pathlib import Path

import qoptim.cli.lean
import qoptim.cli.machine

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LEAN = BENCHMARKS / "lean.py"
LEAN_SETUP = "bf16-master24-release"
TINY = ["--steps", "12", "--width", "32", "--layers", "1", "--context", "16", "--batch", "4", "--evals", "2", "--quiet"]


def lean(*args):
    return subprocess.run([sys.executable, str(LEAN), *args], capture_output=True, text=True, timeout=600)


def test_lean_benchmark_writes_a_result_per_set_up_and_compares_them(tmp_path):
    results, png = tmp_path / "results", tmp_path / "lean.png"
    where = ["--results", str(results), "--png", str(png)]
    done = lean("--configs", f"fp32-torch-adamw,{LEAN_SETUP}", *TINY, *where)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    base, lean_run = (json.loads((results / f"{name}.json").read_text()) for name in ("fp32-torch-adamw", LEAN_SETUP))
    for r in (base, lean_run):
        assert r["cpu"] and r["torch"] and r["threads"] >= 1 and r["steps"] == 12
        assert len(r["result"]["train_losses"]) == 12 and r["result"]["val_steps"][-1] == 12
    assert base["params"] == lean_run["params"]
    same = lambda run: {k: v for k, v in run.items() if k not in ("optimizer", "dtype")}  # noqa: E731
    assert same(base["run"]) == same(lean_run["run"])  # the same model, seed and data
    assert (base["run"]["dtype"], lean_run["run"]["dtype"]) == ("float32", "bfloat16")
    n = base["params"]
    assert base["result"]["train_parts"]["weights"] == 4 * n and lean_run["result"]["train_parts"]["weights"] == 2 * n
    assert lean_run["result"]["train_parts"]["master"] == n  # the int8 correction
    assert lean_run["result"]["train_parts"]["grads"] < 2 * n  # released: never every gradient at once
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = lean("--configs", "fp32-torch-adamw", *TINY, *where)  # a result already there is kept
    assert again.returncode == 0 and "exists (--force" in again.stdout
    table = lean("--table", *where)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.startswith(("fp32-", "bf16-"))}
    assert abs(float(rows["fp32-torch-adamw"][1]) - 16.0) < 0.01 and rows["fp32-torch-adamw"][6] == "1.00x"
    assert float(rows[LEAN_SETUP][1]) < 16 * 0.5


def test_seeds_run_apart_and_the_table_gives_their_mean_and_spread(tmp_path):
    where = ["--results", str(tmp_path), "--png", str(tmp_path / "lean.png")]
    done = lean("--configs", "fp32-torch-adamw", "--seeds", "0,1", *TINY, *where)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = [json.loads((tmp_path / name).read_text()) for name in ("fp32-torch-adamw.json", "fp32-torch-adamw-seed1.json")]
    assert [r["seed"] for r in runs] == [0, 1] and [r["run"]["seed"] for r in runs] == [0, 1]
    losses = [r["result"]["val_losses"][-1] for r in runs]
    assert losses[0] != losses[1]  # other initial weights and data order
    row = next(line.split() for line in lean("--table", *where).stdout.splitlines() if line.startswith("fp32-torch-adamw"))
    assert len(row) == 14  # configuration, 5 of bytes, vs base, ms/step, vs base, opt ms, seeds, val loss, spread, vs base
    seeds, mean, spread, versus = row[-4:]
    assert seeds == "2" and abs(float(mean) - sum(losses) / 2) < 1e-4 and versus == "+0.00%"
    assert spread == f"{min(losses):.4f}-{max(losses):.4f}"
    markdown = lean("--table", "--markdown", *where).stdout
    assert "| `fp32-torch-adamw` | 16.00" in markdown and f"| 2 | {sum(losses) / 2:.4f} |" in markdown


def test_an_unknown_set_up_is_refused(tmp_path):
    done = lean("--configs", "bf16-master16", "--results", str(tmp_path))
    assert done.returncode != 0 and "unknown configuration bf16-master16" in done.stderr


def test_lean_speed_times_every_set_up_in_one_table():
    tiny = ["--width", "32", "--layers", "1", "--context", "16", "--batch", "2", "--rounds", "1", "--steps", "1"]
    done = subprocess.run([sys.executable, str(BENCHMARKS / "lean_speed.py"), *tiny], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("fp32-", "bf16-"))}
    assert set(rows) == set(qoptim.cli.lean.SETUPS)
    assert rows["fp32-torch-adamw"][2] == "1.00x" and rows["bf16-adamw8bit"][3] == "1.00x"
    assert qoptim.cli.machine.cpu_name() in done.stdout  # the machine is named
