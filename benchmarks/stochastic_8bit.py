"""The CPU kernel's 8-bit AdamW step with its second moment rounded stochastically, against the same
step rounded to nearest: what the draw costs (``step_cpu.py --stochastic-8bit`` runs it).

Both steps go through the kernel seam (``kernels.update``) on AdamW8bit's states (8-bit in
256-blocks, the signed map for m and the unsigned one for v), on the same parameter size and
dtype; the stochastic one gives v a draw with a new key every step, as the optimizers do
(``optim.weights.step_draw``). They are timed one after the other in each of ``rounds`` rounds, so
that both see the same machine at the same moments: each one's median over the rounds, and the
ratio round by round. The CPU model (``lscpu``) heads the output: the ratio depends on it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import torch

ROUNDINGS = ("nearest", "stochastic")


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (or the platform's processor where it has none)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        import platform

        return platform.processor() or "unknown"


def adamw8bit_step(rounding: str, n: int, dtype: torch.dtype):
    """A function that takes the next AdamW8bit step of an ``n``-element ``dtype`` parameter, its
    second moment rounded to nearest or (``"stochastic"``) with a draw of the step's key."""
    from qoptim import kernels
    from qoptim.kernels.cpu import layout
    from qoptim.quant import master
    from qoptim.quant.maps import signed_map, unsigned_map

    os.environ["QOPTIM_BACKEND"] = "auto"
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    g = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    blocks = -(-n // kernels.BLOCK)
    m, v = (kernels.StateSlot(torch.zeros(n, dtype=torch.uint8), code, torch.zeros(blocks)) for code in (signed_map(), unsigned_map()))
    count = [0]

    def v_at(step: int) -> kernels.StateSlot:
        return v if rounding == "nearest" else kernels.StateSlot(v.values, v.code, v.absmax, draw=master.Draw(master.step_key(1234, step)))

    assert layout.plan("adam", p, [m, v_at(1)]) == layout.Layout.BLOCK, "the CPU kernel takes the step, not the reference"

    def step() -> None:
        count[0] += 1
        hp = kernels.Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=count[0], decoupled=True)
        kernels.update("adam", p, g, [m, v_at(count[0])], hp, True)

    return step


def median_ms(step, steps: int) -> float:
    step()  # (the first step compiles)
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compare(n: int, dtype: torch.dtype, steps: int, rounds: int, size_text: str) -> None:
    """Both roundings' steps, one after the other in each round; a line each and the ratio."""
    contestants = {rounding: adamw8bit_step(rounding, n, dtype) for rounding in ROUNDINGS}
    ms = {name: [] for name in contestants}
    for _ in range(max(1, rounds)):
        for name, step in contestants.items():
            ms[name].append(median_ms(step, steps))
    label = f"{size_text:>6} {str(dtype)[6:]:>8}"
    for name, times in ms.items():
        print(f"{label}  AdamW8bit, v {name:<12} median {statistics.median(times):>8.2f} ms ({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    ratios = [s / e for s, e in zip(ms[ROUNDINGS[1]], ms[ROUNDINGS[0]])]
    print(f"{label}  stochastic / nearest: median {statistics.median(ratios):.3f}x ({', '.join(f'{r:.3f}x' for r in ratios)})", flush=True)
    os.environ.pop("QOPTIM_BACKEND", None)
