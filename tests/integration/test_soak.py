"""A short soak: memory stays flat and the loss keeps going down (benchmarks/soak.py runs 10,000 steps)."""

import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_short_soak_keeps_memory_flat_and_loss_decreasing():
    done = subprocess.run([sys.executable, str(SOAK), "--steps", "300", "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RSS growth after warm-up" in done.stdout
