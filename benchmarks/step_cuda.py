"""One optimizer step on one large CUDA parameter: qoptim's Triton kernels (paged and not) against
bitsandbytes' CUDA kernels (when importable) and torch's fused AdamW, for every optimizer family;
then a step over a whole model's many tensors, most of them small (GPT-2 small's 148).

    python benchmarks/step_cuda.py                      # 16.7M and 268M elements, fp32 and bf16, all families
    python benchmarks/step_cuda.py --sizes 16.7M --dtypes bf16 --steps 50 --families adamw lion
    python benchmarks/step_cuda.py --sizes --model gpt2-small   # only the many-tensor rows

Per row: median ms of warm steps (CUDA events around each step), the ratio to torch's fused
AdamW (the yardstick, run first for each size and dtype), and the effective HBM bandwidth: the
bytes a step has to move (below) per second. The paged rows add the overhead of paging against
the same optimizer unpaged (states resident: this is the cost of the prefetch calls and the
per-step synchronize, not of eviction).

Bytes a step moves per parameter: the parameter read and written, the gradient read, and each
state read and written (8-bit states: 1 byte each way, plus one fp32 scale per 256; 4-bit states:
half a byte each way, plus one fp32 scale per 128). LAMB and LARS read the parameter and gradient
(LAMB also the states) once more, for their trust ratio's norms: not counted, so their GB/s is
what one pass would need.

The many-tensor rows time what a training loop sees: wall-clock ms of a step between two
synchronizations, launches (host time) included. qoptim runs its 8-bit AdamW twice, as it does
(small tensors of like kind in one launch: ``qoptim.kernels.triton.batch``) and with one launch
per tensor, to show what the batching saves; "us/tensor" is the step's time beyond that of the
same elements in one tensor (fused AdamW's time for one tensor of the model's size), per tensor.

``--record FILE`` also writes every row as JSON (``scripts/gpu-check.sh`` summarizes them).
Without CUDA it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from qoptim.kernels.rules import RULES
from qoptim.quant.formats import FORMATS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = {"16.7M": 4096 * 4096, "268M": 16384 * 16384}


def parse_size(text: str) -> int:
    if text in SIZES:
        return SIZES[text]
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("kKmMgG")) * scale)


# ---- contestants: name -> (make optimizer, state bytes per parameter) ------------------------


def qoptim_opt(name: str, **settings):
    def make(params):
        import qoptim

        os.environ["QOPTIM_BACKEND"] = "auto"
        return getattr(qoptim.optim, name)(params, **{"lr": 1e-3, **settings})

    return make


def bnb_opt(name: str, **settings):
    def make(params):
        import bitsandbytes

        return getattr(bitsandbytes.optim, name)(params, **{"lr": 1e-3, **settings})

    return make


def torch_fused(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def states_8bit(rule: str) -> float:
    """Bytes per parameter of ``rule``'s states, 8-bit: a code each, and an fp32 scale per 256."""
    return RULES[rule].states * (1 + 4 / 256)


def states_4bit(rule: str) -> float:
    """Bytes per parameter of ``rule``'s states, 4-bit: half a byte each (two share a byte), and
    an fp32 scale per 128 (``quant.formats``)."""
    fmt = FORMATS[4]
    return RULES[rule].states * (fmt.bits / 8 + 4 / fmt.blocksize)


def states_32bit(rule: str) -> float:
    return RULES[rule].states * 4.0


YARDSTICK = "torch AdamW fused (fp32 states)"
MOMENTUM = dict(momentum=0.9)

# family -> its contestants; each family's rows: qoptim 8-bit and 32-bit (Triton), bitsandbytes 8-bit;
# AdamW also qoptim's 4-bit (bitsandbytes has no 4-bit optimizers)
FAMILIES = {
    "adamw": {
        "qoptim AdamW8bit (Triton)": (qoptim_opt("AdamW8bit"), states_8bit("adam")),
        "qoptim PagedAdamW8bit (Triton)": (qoptim_opt("PagedAdamW8bit"), states_8bit("adam")),
        "qoptim AdamW4bit (Triton)": (qoptim_opt("AdamW4bit"), states_4bit("adam")),
        "qoptim AdamW32bit (Triton)": (qoptim_opt("AdamW32bit"), states_32bit("adam")),
        "qoptim PagedAdamW32bit (Triton)": (qoptim_opt("PagedAdamW32bit"), states_32bit("adam")),
        "bitsandbytes AdamW8bit": (bnb_opt("AdamW8bit"), states_8bit("adam")),
        "bitsandbytes PagedAdamW8bit": (bnb_opt("PagedAdamW8bit"), states_8bit("adam")),
    },
    "ademamix": {
        "qoptim AdEMAMix8bit (Triton)": (qoptim_opt("AdEMAMix8bit"), states_8bit("ademamix")),
        "qoptim AdEMAMix32bit (Triton)": (qoptim_opt("AdEMAMix32bit"), states_32bit("ademamix")),
        "bitsandbytes AdEMAMix8bit": (bnb_opt("AdEMAMix8bit"), states_8bit("ademamix")),
    },
    "lion": {
        "qoptim Lion8bit (Triton)": (qoptim_opt("Lion8bit", lr=1e-4), states_8bit("lion")),
        "qoptim Lion32bit (Triton)": (qoptim_opt("Lion32bit", lr=1e-4), states_32bit("lion")),
        "bitsandbytes Lion8bit": (bnb_opt("Lion8bit", lr=1e-4), states_8bit("lion")),
    },
    "sgd": {
        "qoptim SGD8bit (Triton)": (qoptim_opt("SGD8bit", **MOMENTUM), states_8bit("momentum")),
        "qoptim SGD32bit (Triton)": (qoptim_opt("SGD32bit", **MOMENTUM), states_32bit("momentum")),
        "bitsandbytes SGD8bit": (bnb_opt("SGD8bit", **MOMENTUM), states_8bit("momentum")),
    },
    "lars": {
        "qoptim LARS8bit (Triton)": (qoptim_opt("LARS8bit", **MOMENTUM), states_8bit("lars")),
        "qoptim LARS32bit (Triton)": (qoptim_opt("LARS32bit", **MOMENTUM), states_32bit("lars")),
        "bitsandbytes LARS8bit": (bnb_opt("LARS8bit", **MOMENTUM), states_8bit("lars")),
    },
    "rmsprop": {
        "qoptim RMSprop8bit (Triton)": (qoptim_opt("RMSprop8bit"), states_8bit("rmsprop")),
        "qoptim RMSprop32bit (Triton)": (qoptim_opt("RMSprop32bit"), states_32bit("rmsprop")),
        "bitsandbytes RMSprop8bit": (bnb_opt("RMSprop8bit"), states_8bit("rmsprop")),
    },
    "adagrad": {
        "qoptim Adagrad8bit (Triton)": (qoptim_opt("Adagrad8bit"), states_8bit("adagrad")),
        "qoptim Adagrad32bit (Triton)": (qoptim_opt("Adagrad32bit"), states_32bit("adagrad")),
        "bitsandbytes Adagrad8bit": (bnb_opt("Adagrad8bit"), states_8bit("adagrad")),
    },
    "lamb": {
        "qoptim LAMB8bit (Triton)": (qoptim_opt("LAMB8bit"), states_8bit("lamb")),
        "qoptim LAMB32bit (Triton)": (qoptim_opt("LAMB32bit"), states_32bit("lamb")),
        "bitsandbytes LAMB8bit": (bnb_opt("LAMB8bit"), states_8bit("lamb")),
    },
}
UNPAGED_TWIN = {"qoptim PagedAdamW8bit (Triton)": "qoptim AdamW8bit (Triton)",
                "qoptim PagedAdamW32bit (Triton)": "qoptim AdamW32bit (Triton)",
                "bitsandbytes PagedAdamW8bit": "bitsandbytes AdamW8bit"}  # fmt: skip


def bytes_per_step(n: int, dtype: torch.dtype, state_bytes: float) -> float:
    """Param read + write, grad read, states read + write (state_bytes per parameter, each way)."""
    size = torch.empty((), dtype=dtype).element_size()
    return n * (3 * size + 2 * state_bytes)


def gpu_ms(step) -> float:
    """ms of ``step`` on the GPU's clock (CUDA events around it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def wall_ms(step) -> float:
    """Wall-clock ms of ``step`` from an idle GPU until the GPU is done: launches included."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def time_steps(make, shapes: list[tuple[int, ...]], dtype: torch.dtype, steps: int, warmup: int, timer=gpu_ms) -> float | str:
    """Median ms of a warm step over parameters of ``shapes``, or why the contestant could not run
    (not installed, out of memory)."""
    params = opt = None
    try:
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.1) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        opt = make(params)
        for _ in range(warmup):  # compile kernels, allocate states
            opt.step()
        return statistics.median(timer(opt.step) for _ in range(steps))
    except ImportError as e:
        return f"not installed ({e.name})"
    except torch.OutOfMemoryError:
        return "out of memory"
    except RuntimeError as e:  # e.g. a CPU-only bitsandbytes build
        return f"failed: {str(e).splitlines()[0][:60]}"
    finally:
        opt = params = None  # noqa: F841  release before the next contestant
        gc.collect()
        torch.cuda.empty_cache()


def record(records: list[dict], name: str, shape: str, dtype_name: str, ms: float | str, fused: float | None) -> None:
    """One row for ``--record``: ms per step and the ratio to the yardstick, or why it did not run."""
    measured = isinstance(ms, float)
    ratio = ms / fused if measured and fused else None
    records.append(dict(optimizer=name, shape=shape, dtype=dtype_name, ms=ms if measured else None, vs_fused=ratio,
                        note=None if measured else ms))  # fmt: skip


def run(sizes: list[int], dtypes: list[str], families: list[str], steps: int, warmup: int, records: list[dict]) -> None:
    header = f"{'optimizer':34} {'size':>6} {'dtype':>5} {'ms/step':>9} {'vs fused':>9} {'GB/s':>8} {'paging':>9}"
    print(header)
    print("-" * len(header))
    contestants = {YARDSTICK: (torch_fused, states_32bit("adam"))}
    for family in families:
        contestants.update(FAMILIES[family])
    for n in sizes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            results: dict[str, float] = {}
            for name, (make, state_bytes) in contestants.items():
                ms = time_steps(make, [(n,)], dtype, steps, warmup)
                if isinstance(ms, float):
                    results[name] = ms
                print(row(name, n, dtype_name, ms, results, state_bytes, dtype), flush=True)
                record(records, name, f"{n / 1e6:.1f}M", dtype_name, ms, results.get(YARDSTICK))
            print()


def row(name, n, dtype_name, ms, results, state_bytes, dtype) -> str:
    label = f"{name:34} {n / 1e6:5.1f}M {dtype_name:>5}"
    if isinstance(ms, str):
        return f"{label} {'n/a':>9}  {ms}"
    fused = results.get(YARDSTICK)
    ratio = f"{ms / fused:8.2f}x" if fused else f"{'':>9}"
    bandwidth = bytes_per_step(n, dtype, state_bytes) / (ms * 1e-3) / 1e9
    twin = results.get(UNPAGED_TWIN.get(name, ""))
    overhead = f"{(ms / twin - 1) * 100:+8.1f}%" if twin else f"{'':>9}"
    return f"{label} {ms:9.3f} {ratio} {bandwidth:8.0f} {overhead}"


# ---- a whole model: many tensors, most of them small ----------------------------------------


def gpt2_shapes(width: int = 768, layers: int = 12, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """GPT-2's parameters: embeddings, and per layer two norms, qkv, projection and a 4x MLP, with biases."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


MODELS = {"gpt2-small": gpt2_shapes()}


def one_launch_per_tensor(make):
    """The optimizer ``make`` builds, updating its tensors one launch each (no batching)."""

    def make_unbatched(params):
        opt = make(params)
        opt.batch_updates = False
        return opt

    return make_unbatched


MANY_CONTESTANTS = {
    YARDSTICK: torch_fused,
    "qoptim AdamW8bit (Triton)": qoptim_opt("AdamW8bit"),
    "qoptim AdamW8bit, 1 launch/tensor": one_launch_per_tensor(qoptim_opt("AdamW8bit")),
    "qoptim AdamW4bit (Triton)": qoptim_opt("AdamW4bit"),
    "qoptim AdamW32bit (Triton)": qoptim_opt("AdamW32bit"),
    "bitsandbytes AdamW8bit": bnb_opt("AdamW8bit"),
}


def run_model(model: str, dtypes: list[str], steps: int, warmup: int, records: list[dict]) -> None:
    shapes = MODELS[model]
    n = sum(torch.Size(s).numel() for s in shapes)
    header = f"{'optimizer':34} {'model':>10} {'dtype':>5} {'ms/step':>9} {'vs fused':>9} {'us/tensor':>10}"
    print(f"{model}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters")
    print(header)
    print("-" * len(header))
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        one_tensor = time_steps(torch_fused, [(n,)], dtype, steps, warmup, wall_ms)
        fused = None
        for name, make in MANY_CONTESTANTS.items():
            ms = time_steps(make, shapes, dtype, steps, warmup, wall_ms)
            label = f"{name:34} {model:>10} {dtype_name:>5}"
            record(records, name, model, dtype_name, ms, fused or (ms if isinstance(ms, float) else None))
            if isinstance(ms, str):
                print(f"{label} {'n/a':>9}  {ms}", flush=True)
                continue
            fused = fused or ms  # the yardstick runs first
            per_tensor = (ms - one_tensor) / len(shapes) * 1e3 if isinstance(one_tensor, float) else float("nan")
            print(f"{label} {ms:9.3f} {ms / fused:8.2f}x {per_tensor:10.1f}", flush=True)
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="elements: 16.7M, 268M, or e.g. 50M; none: skip")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--model", nargs="*", default=list(MODELS), choices=list(MODELS), help="many-tensor rows; none: skip")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--record", metavar="FILE", help="also write every row to FILE as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_cuda.py: no CUDA device here; nothing to measure.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    records: list[dict] = []
    try:
        if args.sizes:
            run([parse_size(s) for s in args.sizes], args.dtypes, args.families, args.steps, args.warmup, records)
        for model in args.model:
            run_model(model, args.dtypes, args.steps, args.warmup, records)
    finally:  # the rows so far, even if a later one fails or time runs out
        if args.record:
            with open(args.record, "w") as out:
                json.dump(dict(device=torch.cuda.get_device_name(), rows=records), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
