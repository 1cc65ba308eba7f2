"""The `qoptim` command end to end (python -m qoptim): demo, memory and the errors a user can make."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qoptim.cli.demo import TinyGPT
from qoptim.cli.memory import QMAP_BYTES, estimate


def qoptim(*args, timeout=600):  # the demo trains four rows; a busy machine is slow
    return subprocess.run([sys.executable, "-m", "qoptim", *args], capture_output=True, text=True, timeout=timeout)


def _table(stdout: str, header: str = "optimizer") -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("-"):  # the rule under the header
            continue
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_demo_prints_a_consistent_table_and_draws_the_plot(tmp_path):
    result = qoptim("demo", "--steps", "25", "--out", str(tmp_path))  # the default rows
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert set(rows) == {"torch_adamw", "adamw8bit", "pagedadamw8bit", "lean", "lean4"}
    mib = {name: float(cells[0]) for name, cells in rows.items()}  # "0.87 MiB" -> cells[0] == "0.87"
    state = {name: float(cells[2]) for name, cells in rows.items()}  # state bytes per parameter
    train = {name: float(cells[4]) for name, cells in rows.items()}  # peak training bytes per parameter
    assert state["torch_adamw"] == pytest.approx(8.0)
    for name in ("adamw8bit", "pagedadamw8bit"):
        assert 0.24 < mib[name] / mib["torch_adamw"] < 0.30  # ~2.03-2.1 of 8 bytes per parameter
        assert train[name] == pytest.approx(8 + state[name], abs=0.011)  # fp32 weights and gradients
    assert train["torch_adamw"] == pytest.approx(16.0)
    # lean: bf16 weights, a state with the int8 correction, and one tensor's bf16 gradient at a time
    model = TinyGPT(128, 2, 64)
    largest = 2 * max(p.numel() for p in model.parameters()) / sum(p.numel() for p in model.parameters())
    assert state["lean"] == pytest.approx(state["adamw8bit"] + 1, abs=0.011)
    assert train["lean"] == pytest.approx(2 + state["lean"] + largest, abs=0.011)
    assert "lean: bf16 weights, AdamW8bit, 24-bit master, gradient release" in result.stdout
    # lean4: the same with 4-bit states, about 1 byte per parameter less (small tensors keep fp32 states)
    assert 0.85 < state["lean"] - state["lean4"] < 1.0
    assert train["lean4"] == pytest.approx(2 + state["lean4"] + largest, abs=0.011)
    for cells in rows.values():
        train_loss, val_loss = float(cells[-2]), float(cells[-1])
        assert train_loss < 4.0 and val_loss < 4.0  # from ~4.9 (uniform over 128 characters)
    png = tmp_path / "loss_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--optimizers", "sgd9000"], "unknown optimizer sgd9000"),
        (["demo", "--device", "tpu"], "unknown device 'tpu'"),
        (["demo", "--device", "cuda:0"], "CUDA is not available"),
        (["demo", "--steps", "0"], "expected a positive integer, got 0"),
        (["memory", "does-not-exist.json"], "cannot read the model config"),
        (["memory", "seven billion"], "MODEL_SPEC must be"),
    ],
)
def test_user_errors_give_one_clear_line(args, message):
    if "cuda:0" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    result = qoptim(*args, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_memory_of_a_parameter_count():
    result = qoptim("memory", "7B", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "7B: 7,000,000,000 parameters" in result.stdout
    assert "52.15 GiB" in result.stdout  # fp32 Adam: 8 bytes x 7e9
    whole = _table(result.stdout, header="set-up")
    assert whole["fp32-torch-adamw"][:5] == ["4.00", "4.00", "0.00", "8.00", "16.00"]
    assert whole["bf16-master24"][:5] == ["2.00", "2.00", "1.00", "2.03", "7.03"]
    assert whole["bf16-master24-release"][:5] == ["2.00", "0.00", "1.00", "2.03", "5.03"]  # the 5.1 B/param
    assert whole["bf16-4bit-master24-release"][:5] == ["2.00", "0.00", "1.00", "1.06", "4.06"]  # issue #18's 4.2 B/param
    fp32, eight, paged, four = estimate([7_000_000_000])
    assert four.state_bytes == 7_000_000_000 + 8 * -(-7_000_000_000 // 128) + 2 * 16 * 4  # both codes in a byte, scales per 128
    assert eight.state_bytes == 2 * 7_000_000_000 + 8 * -(-7_000_000_000 // 256) + 2 * QMAP_BYTES
    # paged: only the block scales and the two qmaps must stay on the GPU
    assert paged.state_bytes == eight.state_bytes and paged.resident_bytes == 8 * -(-7_000_000_000 // 256) + 2 * QMAP_BYTES


def test_the_console_script_is_cli_main(capsys):
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    module, _, name = pyproject["project"]["scripts"]["qoptim"].partition(":")
    assert getattr(importlib.import_module(module), name)(["memory", "7B"]) == 0
    assert "7B: 7,000,000,000 parameters" in capsys.readouterr().out
