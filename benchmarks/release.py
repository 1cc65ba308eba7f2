"""Gradient release (qoptim.release_gradients) against the normal step, on step_many.py's model shapes.

    python benchmarks/release.py                       # a 12-layer transformer at width 256 (~10M params)
    python benchmarks/release.py --width 768 --layers 12   # GPT-2 small's shapes (~124M params)

Each iteration is a backward that gives every parameter a gradient (of ``sum(p.sum())``), then
``step()`` and ``zero_grad()``; under release the update runs inside backward, as gradients
complete. What is timed is the optimizer's share of an iteration: step() and zero_grad(), plus,
under release, the time in its hooks and end-of-backward flush (backward's own work is not
counted). Per row: ms of that share (the fastest iteration of each kind, the kinds taking turns:
the least disturbed by other work on the machine), microseconds per tensor beyond the normal step of the
same elements in one tensor (what the many small tensors cost), the ratio to the normal step, and
the peak of the bytes held in ``.grad`` during backward (counted by a post-accumulate-grad hook in
a separate, untimed iteration), against all gradients' bytes.
"""

from __future__ import annotations

import argparse
import time

import torch
from step_many import transformer_shapes

import qoptim

CLOCK = time.perf_counter  # --clock cpu: the process's CPU time (every thread), less disturbed by a busy machine


def setup(shapes) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]


def backward(params) -> None:
    sum(p.sum() for p in params).mul(1e-3).backward()


class Run:
    """One kind of iteration on its own parameters: ``mode`` is "normal" or "release:<bucket bytes>".
    It times the optimizer's share directly: step() and zero_grad(), and under release the time
    spent in its hooks (between a timing hook registered before them and one after) and in its
    end-of-backward flush, so that backward's own work is not counted."""

    def __init__(self, shapes, mode: str):
        self.params, self.mode = setup(shapes), mode
        self.opt = qoptim.optim.AdamW8bit(self.params, lr=1e-3)
        self.inside = 0.0  # seconds in release's hooks and flushes during this iteration
        if mode.startswith("release:"):
            for p in self.params:
                p.register_post_accumulate_grad_hook(self.hook_starts)
            handle = qoptim.release_gradients(self.opt, bucket_bytes=int(mode.split(":")[1]))
            for p in self.params:
                p.register_post_accumulate_grad_hook(self.hook_ends)
            flush = handle.end_of_backward  # queued by the first hook of a backward: looked up then
            handle.end_of_backward = lambda: self.timed(flush)
        self.times: list[float] = []

    def hook_starts(self, _) -> None:
        self.started = CLOCK()

    def hook_ends(self, _) -> None:
        self.inside += CLOCK() - self.started

    def timed(self, call) -> None:
        start = CLOCK()
        call()
        self.inside += CLOCK() - start

    def iteration(self) -> None:
        self.inside = 0.0
        backward(self.params)
        start = CLOCK()
        self.opt.step()
        self.opt.zero_grad()
        self.times.append(CLOCK() - start + self.inside)


def fastest_ms(runs: dict[str, Run], steps: int) -> dict[str, float]:
    """Each run's fastest iteration, the runs taking turns (what disturbs one disturbs all alike);
    3 warm-up iterations first (state allocation, kernel compilation)."""
    for i in range(steps + 3):
        for run in runs.values():
            run.iteration()
    return {name: min(run.times[3:]) * 1e3 for name, run in runs.items()}


def grad_peak(shapes, bucket_bytes: int | None) -> int:
    params = setup(shapes)
    peak = [0]

    def count(_):
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    opt = qoptim.optim.AdamW8bit(params, lr=1e-3)
    if bucket_bytes is not None:
        qoptim.release_gradients(opt, bucket_bytes=bucket_bytes)
    backward(params)
    opt.step()
    return peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall-clock time (default) or the process's CPU time")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = transformer_shapes(args.width, args.layers, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes)
    total = 4 * n
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, gradients {total / 2**20:.1f} MiB, "
          f"{args.clock} time\n")
    modes = {
        "normal step()": ("normal", None),
        "release, 16 MiB bucket": (f"release:{16 << 20}", 16 << 20),
        "release, 1 MiB bucket": (f"release:{1 << 20}", 1 << 20),
        "release, 1 tensor/call": ("release:0", 0),
    }
    one = fastest_ms({"one": Run([(n,)], "normal")}, max(3, args.steps // 2))["one"]
    rows = fastest_ms({name: Run(shapes, mode) for name, (mode, _) in modes.items()}, args.steps)
    print(f"the normal step of the same elements in one tensor: {one:.2f} ms\n")
    print(f"{'':<24} {'opt ms':>8} {'us/tensor':>10} {'vs normal':>10} {'.grad peak MiB':>15} {'of all':>7}")
    for name, ms in rows.items():
        peak = grad_peak(shapes, modes[name][1])
        per_tensor = (ms - one) / len(shapes) * 1e3
        print(f"{name:<24} {ms:>8.2f} {per_tensor:>10.1f} {ms / rows['normal step()']:>9.2f}x {peak / 2**20:>15.2f} {peak / total:>6.0%}")


if __name__ == "__main__":
    main()
