"""One optimizer step on one large CPU parameter: qoptim's fused kernel against its reference
backend, torch's AdamW (fused and foreach) and, when importable, bitsandbytes and torchao.

    python benchmarks/step_cpu.py                   # 1M, 16.7M, 64M elements; fp32 and bf16
    python benchmarks/step_cpu.py --quick           # 1M and 16.7M, fewer steps
    python benchmarks/step_cpu.py --sizes 16.7M --dtypes bf16
    python benchmarks/step_cpu.py --families        # every other 8-bit family vs its fp32 torch.optim
                                                    # counterpart (default 16.7M fp32)
    python benchmarks/step_cpu.py --cpu-paths       # also the CPU kernel's slower paths (AVX2 gathers,
                                                    # portable scalar loops) where the CPU has a faster one
    python benchmarks/step_cpu.py --lean            # issue #17: a bf16 parameter's 8-bit AdamW step with a
                                                    # 24- or 32-bit master or stochastic rounding, against
                                                    # the plain one (default 16.7M = 4096²)
    python benchmarks/step_cpu.py --four-bit        # issue #18: AdamW4bit's step against AdamW8bit's on the
                                                    # CPU kernel, alternating (default 16.7M, fp32 and bf16)
    python benchmarks/step_cpu.py --stochastic-8bit # the 8-bit AdamW step with v rounded stochastically against
                                                    # v to nearest, alternating (default 1M and 16.7M, fp32 and
                                                    # bf16; benchmarks/stochastic_8bit.py)

Per row: median ms of warm steps, parameters per second, the ratio to torch's fused AdamW,
bytes of optimizer state per parameter, the peak extra resident memory during a warm step
(/proc/self/statm sampled by a thread, in steps of their own), and the effective bandwidth (the bytes a step has to
move, below) against a measured copy bandwidth.

Bytes a step moves per parameter: the parameter read and written, the gradient read, and each
state read and written (8-bit states: 1 byte each way, plus one fp32 scale per 256).

After each size and dtype, the kernel and torch's fused AdamW are measured again, one after
the other, ``--rounds`` times (default 3): torch's memory-bound step speeds up and slows down
over minutes on a shared machine, so the line gives the ratio's median and every round's.

``--lean`` times the kernel's step itself (``kernels.update``, AdamW8bit's states: 8-bit in
256-blocks, the signed and unsigned maps) on a bf16 parameter in each weight format, and torch's
fused AdamW on it, one after the other in each of ``--rounds`` rounds (default 3): each format's
median over the rounds, and its ratios to the plain 8-bit step and to torch fused, round by round.

``--four-bit`` times AdamW4bit's whole optimizer step (4-bit states: both moments in one byte
per element, a scale per 128) and AdamW8bit's on the CPU kernel, one after the other in each of
``--rounds`` rounds (default 3): each one's median over the rounds, and the ratio round by round;
torchao's AdamW4bit in the same rounds where torchao is installed.

``--stochastic-8bit`` times the CPU kernel's 8-bit AdamW step with v rounded stochastically (a new
draw every step) and with v rounded to nearest, one after the other in each of ``--rounds`` rounds
(``benchmarks/stochastic_8bit.py``): each one's median and the ratio round by round, under the
CPU model ``lscpu`` names.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import threading
import time
import warnings

import numpy as np
import torch

from qoptim.cli.machine import cpu_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"1M": 1 << 20, "16.7M": 4096 * 4096, "64M": 1 << 26}
PAGE = os.sysconf("SC_PAGE_SIZE")


def parse_size(text: str) -> int:
    if text in SIZES:
        return SIZES[text]
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("kKmMgG")) * scale)


# ---- contestants: name -> (make optimizer, runs at sizes up to, extra note) --------------------


def qoptim_opt(backend: str, path: str | None = None):
    def make(params):
        import qoptim

        os.environ["QOPTIM_BACKEND"] = backend
        use_cpu_path(path)
        return qoptim.optim.Adam8bit(params, lr=1e-3)

    return make


# the CPU kernel's path forced by a contestant (paths.force, entered and left by use_cpu_path)
_FORCED: contextlib.ExitStack | None = None


def use_cpu_path(path: str | None) -> None:
    """Steps from now on take the CPU kernel's ``path`` ("avx512", "avx2", "portable"), or
    (None) the one it picks itself: the path is read on every step."""
    global _FORCED
    if _FORCED is not None:
        _FORCED.close()
        _FORCED = None
    if path is None:
        return
    from qoptim.kernels.cpu import paths

    _FORCED = contextlib.ExitStack()
    _FORCED.enter_context(paths.force({"avx512": paths.AVX512, "avx2": paths.AVX2, "portable": paths.PORTABLE}[path]))


def cpu_paths_below_the_best() -> list[str]:
    """The CPU kernel's paths slower than the one it takes on this machine."""
    from qoptim.kernels.cpu import paths

    names = {paths.AVX512: "avx512", paths.AVX2: "avx2", paths.PORTABLE: "portable"}
    order = ["avx512", "avx2", "portable"]
    return order[order.index(names[paths.current()]) + 1 :]


def torch_opt(**kwargs):
    return lambda params: torch.optim.AdamW(params, lr=1e-3, **kwargs)


def bnb_opt(params):
    import bitsandbytes

    return bitsandbytes.optim.Adam8bit(params, lr=1e-3)


def torchao_opt(params):
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, lr=1e-3)


def torchao_opt4(params):
    from torchao.optim import AdamW4bit

    return AdamW4bit(params, lr=1e-3)


KERNEL, FUSED = "qoptim Adam8bit (cpu kernel)", "torch AdamW fused"
CONTESTANTS = [
    # name, maker, largest size it runs at (slow ones are skipped above), importable module
    (KERNEL, qoptim_opt("auto"), None, None),
    ("qoptim Adam8bit (reference)", qoptim_opt("reference"), SIZES["16.7M"], None),
    (FUSED, torch_opt(fused=True), None, None),
    ("torch AdamW foreach", torch_opt(foreach=True), None, None),
    ("bitsandbytes Adam8bit", bnb_opt, None, "bitsandbytes"),
    ("torchao AdamW8bit", torchao_opt, None, "torchao"),
]


def family_opt(name: str, **kwargs):
    def make(params):
        import qoptim

        os.environ["QOPTIM_BACKEND"] = "auto"
        return getattr(qoptim.optim, name)(params, **kwargs)

    return make


def torch_baseline(cls: str, **kwargs):
    return lambda params: getattr(torch.optim, cls)(params, **kwargs)


# --families: each 8-bit family on the CPU kernel, then its nearest fp32 torch.optim counterpart
# (torch has no Lion, AdEMAMix, LAMB or LARS: AdamW stands in for the first three, SGD with
# momentum for LARS). The ratio column is against the counterpart.
FAMILIES = [
    ("qoptim Lion8bit", family_opt("Lion8bit", lr=1e-4, weight_decay=0.1), "torch AdamW (for Lion)", torch_baseline("AdamW", lr=1e-3)),
    ("qoptim AdEMAMix8bit", family_opt("AdEMAMix8bit", lr=1e-3), "torch AdamW (for AdEMAMix)", torch_baseline("AdamW", lr=1e-3)),
    ("qoptim LAMB8bit", family_opt("LAMB8bit", lr=1e-3), "torch AdamW (for LAMB)", torch_baseline("AdamW", lr=1e-3)),
    ("qoptim SGD8bit", family_opt("SGD8bit", lr=1e-2, momentum=0.9), "torch SGD", torch_baseline("SGD", lr=1e-2, momentum=0.9)),
    ("qoptim LARS8bit", family_opt("LARS8bit", lr=1e-2, momentum=0.9), "torch SGD (for LARS)", torch_baseline("SGD", lr=1e-2, momentum=0.9)),
    ("qoptim RMSprop8bit", family_opt("RMSprop8bit", lr=1e-3), "torch RMSprop", torch_baseline("RMSprop", lr=1e-3)),
    ("qoptim Adagrad8bit", family_opt("Adagrad8bit", lr=1e-2), "torch Adagrad", torch_baseline("Adagrad", lr=1e-2)),
]


def importable(module: str | None) -> bool:
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except Exception:
        return False


# ---- measuring -----------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Largest resident set size seen while the block runs, sampled every 0.2 ms."""

    def __enter__(self):
        self.peak = self.start = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def copy_bandwidth() -> float:
    """Bytes per second (read + write) of the fastest of: torch's copy of a 256 MB array, and
    (with numba) a parallel copy and a parallel in-place scale of one; median of a few each."""
    a = torch.empty(1 << 26, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    ops = [lambda: b.copy_(a)]
    try:
        import numba

        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        copy, scale = _numba_streams()
        an, bn = a.numpy(), b.numpy()
        ops += [lambda: copy(an, bn), lambda: scale(an, np.float32(1.0))]  # a factor LLVM cannot see, or it drops the loop
    except ImportError:
        pass
    best = 0.0
    for op in ops:
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * a.numel() * 4 / statistics.median(times[2:]))
    return best


def _numba_streams():
    import numba

    @numba.njit(parallel=True)
    def copy(a, b):
        for i in numba.prange(a.size):
            b[i] = a[i]

    @numba.njit(parallel=True)
    def scale(a, factor):
        for i in numba.prange(a.size):
            a[i] = a[i] * factor

    return copy, scale


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if hasattr(value, "__tensor_flatten__"):  # torchao's quantized state tensors: count what they hold
                names, _ = value.__tensor_flatten__()
                total += sum(getattr(value, n).numel() * getattr(value, n).element_size() for n in names)
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def moved_bytes(n: int, dtype: torch.dtype, state_per_param: float) -> float:
    """Bytes a step must move: parameter in and out, gradient in, each state in and out."""
    return n * (3 * torch.finfo(dtype).bits / 8 + 2 * state_per_param)


def measure(make, n: int, dtype: torch.dtype, steps: int, budget_s: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter((torch.randn(n, generator=gen) * 0.1).to(dtype))
    param.grad = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    opt = make([param])
    t0 = time.perf_counter()
    opt.step()  # creates the state, compiles what needs compiling
    first = time.perf_counter() - t0
    opt.step()
    times, peak = [], 0
    deadline = time.perf_counter() + budget_s
    while len(times) < steps and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    for _ in range(2):  # memory apart: the sampling thread takes CPU and the GIL, ~10% of a step that uses all cores
        with PeakRss() as rss:
            opt.step()
        peak = max(peak, rss.extra)
    result = dict(ms=statistics.median(times) * 1e3, first_s=first, state=state_bytes(opt) / n, peak=peak, steps=len(times))
    del opt, param
    gc.collect()
    return result


# ---- --lean: the weight formats of issue #17 ---------------------------------------------------

LEAN_FORMATS = ("plain (nearest)", "master 24", "master 32", "stochastic")


def lean_step(form: str, n: int, dtype: torch.dtype):
    """One AdamW8bit step at a time of an ``n``-element ``dtype`` parameter in weight format
    ``form`` (``LEAN_FORMATS``), through the kernel seam: a function that takes the next step."""
    from qoptim import kernels
    from qoptim.quant import master
    from qoptim.quant.maps import signed_map, unsigned_map

    os.environ["QOPTIM_BACKEND"] = "auto"
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    g = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    blocks = -(-n // kernels.BLOCK)
    slots = [kernels.StateSlot(torch.zeros(n, dtype=torch.uint8), code, torch.zeros(blocks)) for code in (signed_map(), unsigned_map())]
    bits = {"master 24": 24, "master 32": 32}.get(form)
    correction = master.encode(p.float(), dtype, bits)[1] if bits else None
    count = [0]

    def step() -> None:
        count[0] += 1
        hp = kernels.Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=count[0], decoupled=True)
        draw = master.Draw(master.step_key(1234, count[0])) if form == "stochastic" else None
        kernels.update("adam", p, g, slots, hp, True, kernels.WeightFormat(correction, draw))

    return step


def fused_adamw_step(n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter((torch.randn(n, generator=gen) * 0.1).to(dtype))
    param.grad = (torch.randn(n, generator=gen) * 0.01).to(dtype)
    return torch.optim.AdamW([param], lr=1e-3, fused=True).step


def median_ms(step, steps: int) -> float:
    step()  # (the first step creates states and compiles)
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def lean(n: int, dtype: torch.dtype, steps: int, rounds: int) -> None:
    """Each weight format's step and torch fused AdamW's, measured one after the other in each round."""
    contestants = {form: lean_step(form, n, dtype) for form in LEAN_FORMATS}
    contestants[FUSED] = fused_adamw_step(n, dtype)
    ms = {name: [] for name in contestants}
    for _ in range(max(1, rounds)):
        for name, step in contestants.items():
            ms[name].append(median_ms(step, steps))
    plain = ms[LEAN_FORMATS[0]]
    print(f"{'size':>6} {'dtype':>5}  {'AdamW8bit step, weights':<24} {'ms/step':>8} {'vs plain 8-bit (rounds)':>34} {'vs torch fused':>15}")
    for name, times in ms.items():
        to_plain = [t / b for t, b in zip(times, plain)]
        to_fused = [t / f for t, f in zip(times, ms[FUSED])]
        rounds_text = ", ".join(f"{r:.2f}" for r in to_plain)
        print(f"{fmt_size(n):>6} {str(dtype)[6:]:>5}  {name:<24} {statistics.median(times):>8.2f} "
              f"{statistics.median(to_plain):>7.2f}x ({rounds_text}) {statistics.median(to_fused):>14.2f}x", flush=True)  # fmt: skip
    os.environ.pop("QOPTIM_BACKEND", None)


# ---- --four-bit: issue #18 ------------------------------------------------------------------------


def four_bit(n: int, dtype: torch.dtype, steps: int, rounds: int) -> None:
    """AdamW4bit's and AdamW8bit's steps on the CPU kernel, measured one after the other in each round."""
    contestants = {"qoptim AdamW8bit (cpu kernel)": family_opt("AdamW8bit", lr=1e-3), "qoptim AdamW4bit (cpu kernel)": family_opt("AdamW4bit", lr=1e-3)}
    if importable("torchao"):  # torchao's 4-bit AdamW (torch.compile'd per parameter), beside ours
        contestants["torchao AdamW4bit"] = torchao_opt4
    ms = {name: [] for name in contestants}
    state = {}
    for _ in range(max(1, rounds)):
        for name, make in contestants.items():
            r = measure(make, n, dtype, steps, budget_s=5.0)
            ms[name].append(r["ms"])
            state[name] = r["state"]
    eight, four = ms["qoptim AdamW8bit (cpu kernel)"], ms["qoptim AdamW4bit (cpu kernel)"]
    for name, times in ms.items():
        rounds_text = ", ".join(f"{t:.2f}" for t in times)
        print(f"{fmt_size(n):>6} {str(dtype)[6:]:>5}  {name:<30} median {statistics.median(times):>8.2f} ms ({rounds_text}), "
              f"state {state[name]:.2f} B/param", flush=True)  # fmt: skip
    ratios = [f / e for f, e in zip(four, eight)]
    print(f"{fmt_size(n):>6} {str(dtype)[6:]:>5}  4-bit / 8-bit step: median {statistics.median(ratios):.2f}x "
          f"({', '.join(f'{r:.2f}x' for r in ratios)})", flush=True)  # fmt: skip
    os.environ.pop("QOPTIM_BACKEND", None)


# ---- the table -------------------------------------------------------------------------------


def alternating_ratio(n: int, dtype: torch.dtype, steps: int, rounds: int) -> str:
    """The kernel's time over torch fused's, measured one after the other ``rounds`` times:
    on a shared machine torch's memory-bound step speeds up and slows down over minutes (the
    compute-bound 8-bit step much less), so one pair of measurements can mislead."""
    makers = dict((name, make) for name, make, _, _ in CONTESTANTS)
    ratios = []
    for _ in range(rounds):
        ours = measure(makers[KERNEL], n, dtype, steps, budget_s=5.0)["ms"]
        fused = measure(makers[FUSED], n, dtype, steps, budget_s=5.0)["ms"]
        ratios.append(ours / fused)
    spread = ", ".join(f"{r:.2f}x" for r in ratios)
    return f"{fmt_size(n):>6} {str(dtype)[6:]:>5}  kernel / torch fused over {rounds} alternating rounds: median {statistics.median(ratios):.2f}x ({spread})"


def fmt_size(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def row(n: int, dtype: torch.dtype, name: str, r: dict | str, fused_ms: float | None, bandwidth: float) -> str:
    label = f"{fmt_size(n):>6} {str(dtype)[6:]:>5}  {name:<30}"
    if isinstance(r, str):
        return f"{label} {r}"
    ratio = f"{r['ms'] / fused_ms:.2f}x" if fused_ms else "-"
    gbs = moved_bytes(n, dtype, r["state"]) / (r["ms"] / 1e3) / 1e9
    return (
        f"{label} {r['ms']:>9.2f} {n / r['ms'] / 1e3:>9.0f} {ratio:>8} {r['state']:>9.2f} {r['peak'] / 2**20:>8.1f} "
        f"{gbs:>6.1f} {100 * gbs * 1e9 / bandwidth:>5.0f}% {r['first_s']:>10.2f}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated, e.g. 1M,16.7M,64M or 1000000")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated from fp32, bf16")
    parser.add_argument("--quick", action="store_true", help="1M and 16.7M only, fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="warm steps to time (default 10, quick 5)")
    parser.add_argument("--skip", default="", help="comma-separated substrings of contestants to leave out")
    parser.add_argument("--families", action="store_true", help="the other 8-bit families against their fp32 torch.optim counterparts")
    parser.add_argument("--cpu-paths", action="store_true", help="also the CPU kernel's slower paths (AVX2 gathers, portable loops)")
    parser.add_argument("--lean", action="store_true", help="a bf16 parameter's 8-bit step in each weight format of issue #17 (master 24 / 32, stochastic)")
    parser.add_argument("--four-bit", action="store_true", help="AdamW4bit's step against AdamW8bit's on the CPU kernel (issue #18)")
    parser.add_argument("--stochastic-8bit", action="store_true", help="the 8-bit AdamW step with v rounded stochastically against v to nearest")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the fused kernel against torch fused, measured alternately, for the ratio's spread (default 3; 0: none)")
    args = parser.parse_args(argv)
    if args.families:
        args.sizes = args.sizes or "16.7M"
        args.dtypes = args.dtypes if "--dtypes" in (argv or sys.argv) else "fp32"
    sizes = [parse_size(s) for s in (args.sizes or ("1M,16.7M" if args.quick else "1M,16.7M,64M")).split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    steps = args.steps or (5 if args.quick else 10)
    skip = [s.strip().lower() for s in args.skip.split(",") if s.strip()]
    warnings.filterwarnings("ignore")

    if args.lean:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for n in [parse_size(s) for s in (args.sizes or "16.7M").split(",")]:
            lean(n, DTYPES[args.dtypes] if "--dtypes" in (argv or sys.argv) else torch.bfloat16, steps, args.rounds)
        return
    if args.stochastic_8bit:
        import stochastic_8bit  # (benchmarks/, on the path of a script run from there)

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_name()}")
        for text in (args.sizes or "1M,16.7M").split(","):
            for dtype in dtypes:
                stochastic_8bit.compare(parse_size(text), dtype, steps, args.rounds, fmt_size(parse_size(text)))
        return
    if args.four_bit:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for n in [parse_size(s) for s in (args.sizes or "16.7M").split(",")]:
            for dtype in dtypes:
                four_bit(n, dtype, steps, args.rounds)
        return
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    header = f"{'size':>6} {'dtype':>5}  {'optimizer':<30} {'ms/step':>9} {'Mparam/s':>9} {'vs fused' if not args.families else 'vs fp32':>8} {'state B/p':>9} {'peak MB':>8} {'GB/s':>6} {'% copy':>6} {'1st step s':>10}"
    print(header)
    print("-" * len(header))
    if args.families:
        for n in sizes:
            for dtype in dtypes:
                for ours, make, theirs, baseline in FAMILIES:
                    if any(s in ours.lower() for s in skip):
                        continue
                    base = measure(baseline, n, dtype, steps, budget_s=5.0)
                    r = measure(make, n, dtype, steps, budget_s=5.0)
                    print(row(n, dtype, ours, r, base["ms"], bandwidth), flush=True)
                    print(row(n, dtype, theirs, base, base["ms"], bandwidth), flush=True)
        os.environ.pop("QOPTIM_BACKEND", None)
        return
    contestants = list(CONTESTANTS)
    if args.cpu_paths:
        contestants[1:1] = [(f"qoptim Adam8bit (cpu {path})", qoptim_opt("auto", path), None, None) for path in cpu_paths_below_the_best()]
    for n in sizes:
        for dtype in dtypes:
            rows = []
            for name, make, largest, module in contestants:
                if any(s in name.lower() for s in skip) or (largest is not None and n > largest) or not importable(module):
                    continue
                try:
                    rows.append((name, measure(make, n, dtype, steps, budget_s=1.0 if "reference" in name or module else 5.0)))
                except Exception as e:  # an optional library that cannot run here
                    rows.append((name, f"skipped: {type(e).__name__}: {str(e)[:60]}"))
            fused_ms = next((r["ms"] for name, r in rows if "fused" in name and isinstance(r, dict)), None)
            for name, r in rows:
                print(row(n, dtype, name, r, fused_ms, bandwidth), flush=True)
            measured = {name for name, r in rows if isinstance(r, dict)}
            if args.rounds > 0 and {KERNEL, FUSED} <= measured:
                print(alternating_ratio(n, dtype, steps, args.rounds), flush=True)
    os.environ.pop("QOPTIM_BACKEND", None)


if __name__ == "__main__":
    sys.exit(main())
