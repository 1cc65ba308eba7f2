"""One optimizer step over a whole model's parameters: many tensors, most of them small.

    python benchmarks/step_many.py                       # a 12-layer transformer at width 256 (~10M params)
    python benchmarks/step_many.py --width 768 --layers 12   # GPT-2 small's shapes (~124M params)

Where ``step_cpu.py`` times the kernel on one large tensor, this times what a training loop
sees: the kernel plus the per-tensor cost of the Python around it. qoptim's AdamW8bit runs
twice: as it does (small tensors of a step batched into one kernel call) and one tensor at a
time (the path paged optimizers take), against torch's AdamW (fused and foreach) and, when
importable, bitsandbytes' AdamW8bit. Per row: median ms per warm step, microseconds per
tensor beyond the time the same elements take in one tensor (fused kernel time at this size
is subtracted), and the ratio to torch's fused AdamW.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def transformer_shapes(width: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """GPT-2 style: embeddings, and per layer two norms, qkv, projection and a 4x MLP, with biases."""
    shapes = [(vocab, width), (1024, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def contestants() -> dict[str, callable]:
    import qoptim

    def one_at_a_time(params):
        # on a CPU the paged optimizer is AdamW8bit taking one tensor per kernel call (no batching)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return qoptim.optim.PagedAdamW8bit(params, lr=1e-3)

    found = {
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "qoptim AdamW8bit": lambda ps: qoptim.optim.AdamW8bit(ps, lr=1e-3),
        "qoptim AdamW8bit, 1 tensor/call": one_at_a_time,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes

        found["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=1e-3)
    except Exception:  # not installed, or no usable backend here
        pass
    return found


def time_steps(make, shapes, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    opt = make(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    for _ in range(3):  # warm up: state allocation, kernel compilation
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    shapes = transformer_shapes(args.width, args.layers, args.vocab)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads\n")
    rows = {name: time_steps(make, shapes, args.steps) for name, make in contestants().items()}
    single = {name: time_steps(make, [(n,)], max(3, args.steps // 4)) for name, make in contestants().items()}
    fused = rows["torch AdamW fused"]
    print(f"{'optimizer':<34} {'ms/step':>9} {'1 tensor ms':>12} {'us/tensor':>10} {'vs fused':>9}")
    for name, seconds in rows.items():
        per_tensor = (seconds - single[name]) / len(shapes) * 1e6
        print(f"{name:<34} {seconds * 1e3:>9.2f} {single[name] * 1e3:>12.2f} {per_tensor:>10.1f} {seconds / fused:>8.2f}x")


if __name__ == "__main__":
    main()
