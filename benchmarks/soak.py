"""Soak: train a small model for many steps and watch memory and loss.

Resident memory (RSS) must stay flat after warm-up (no state, cache or history that grows
with the number of steps) and the loss must keep going down. Prints a line every --every
steps; with --check, exits non-zero when either fails.

    python benchmarks/soak.py                  # 10,000 steps of AdamW8bit
    python benchmarks/soak.py --steps 300 --check
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

import qoptim


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_task(seed: int = 0):
    """A teacher-student regression: a fixed random MLP generates the targets."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 16))
    for p in teacher.parameters():  # unit-variance targets
        p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    student = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 16))

    def batch():
        x = torch.randn(128, 64, generator=g)
        with torch.no_grad():
            return x, teacher(x)

    return student, batch


def soak(optimizer: str, steps: int, every: int, lr: float) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    model, batch = make_task()
    opt = getattr(qoptim.optim, optimizer)(model.parameters(), lr=lr)
    losses, rss, window = [], [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % every == 0:
            losses.append(sum(window) / len(window))
            rss.append(rss_mib())
            window = []
            print(f"step {step:>6}  loss {losses[-1]:.5f}  rss {rss[-1]:8.1f} MiB  {1e3 * (time.perf_counter() - start) / step:6.2f} ms/step", flush=True)
    return losses, rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="AdamW8bit")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=None, help="report interval (default: steps / 20)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--check", action="store_true", help="exit 1 unless memory stayed flat and loss went down")
    args = parser.parse_args()
    every = args.every or max(1, args.steps // 20)
    losses, rss = soak(args.optimizer, args.steps, every, args.lr)
    quarter = max(1, len(rss) // 4)  # allocator and kernel caches settle during the first quarter
    growth = max(rss[quarter:]) - rss[quarter]
    # still going down: the last quarter's mean loss is below the second quarter's, and well below the start
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    decreasing = mean(losses[-quarter:]) < mean(losses[quarter : 2 * quarter]) and losses[-1] < 0.5 * losses[0]
    print(f"\nRSS growth after warm-up: {growth:.1f} MiB; loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    if args.check and (growth > 16 or not decreasing):
        print("FAILED: " + ("memory grew; " if growth > 16 else "") + ("loss did not keep decreasing" if not decreasing else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
