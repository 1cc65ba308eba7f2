"""AdamW8bit's CPU step with its second moment rounded stochastically (``state_rounding="stochastic"``)
against the same step rounded to nearest (bitsandbytes' rounding): what the draw costs
(``step_cpu.py --stochastic-8bit`` runs it).

Both are qoptim.AdamW8bit steps of one parameter of the same size and dtype, timed one after the
other in each of ``rounds`` rounds, so that both see the same machine at the same moments: each
one's median over the rounds, and the ratio round by round. The CPU model heads the output (the
ratio depends on it).
"""

from __future__ import annotations

import statistics

import torch
from step_cpu import median_ms  # (benchmarks/, on the path of a script run from there)

import qoptim

ROUNDINGS = ("nearest", "stochastic")


def adamw8bit_step(rounding: str, n: int, dtype: torch.dtype):
    """A function that takes the next AdamW8bit step of an ``n``-element ``dtype`` parameter, its
    second moment rounded ``rounding``."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(n, generator=gen) * 0.1).to(dtype))
    p.grad = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    opt = qoptim.AdamW8bit([p], lr=1e-3, weight_decay=1e-2, state_rounding=rounding)
    return opt.step


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
