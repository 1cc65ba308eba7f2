"""The machine a run is on: the threads it uses and the CPU's name, printed with every timing."""

from __future__ import annotations

import os
import platform
import subprocess

import torch

__all__ = ["cpu_name", "default_threads"]


def default_threads() -> None:
    """Use every core the process may run on (torch's default can be lower in containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))


def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s), to print with every timing: these machines differ."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor() or "unknown"
