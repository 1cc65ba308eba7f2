"""`qoptim demo`: train one small character-level GPT with several optimizers on the same data
and seed, and show what 8-bit states save and what they cost. A row names an optimizer (trained on
the ``--dtype`` weights) or a set-up of lean.py (its own weights, master weight, rounding and
gradient release), ``lean`` among them.

The corpus: source files of Python's own standard library, read from the running interpreter
(nothing is downloaded). Each optimizer trains in a fresh child process: its peak memory is its own.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue as queue_module
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import lean

CORPUS_FILES = ["textwrap.py", "string.py", "difflib.py", "argparse.py", "functools.py", "dataclasses.py", "inspect.py"]
VOCAB = 128  # ASCII; other bytes become "?"


@dataclass
class RunConfig:
    optimizer: str
    steps: int = 300
    device: str = "cpu"
    dtype: str = "float32"
    lr: float = 3e-3
    batch: int = 16
    context: int = 64
    width: int = 128
    layers: int = 2
    seed: int = 0
    evals: int = 10
    schedule: str = "constant"  # the lr over the run: constant, or cosine (SCHEDULES)
    val_batches: int = 8  # batches of the validation text each validation loss averages


@dataclass
class RunResult:
    optimizer: str
    params: int
    state_bytes: int  # optimizer state after training (master corrections included)
    peak_bytes: int
    peak_kind: str
    ms_per_step: float
    optimizer_ms_per_step: float
    train_losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_bytes: int = 0  # peak of weights + gradients + master corrections + states, counted from live tensors
    train_parts: dict[str, int] = field(default_factory=dict)  # that peak's parts (lean.TrainingBytes)

    @property
    def bytes_per_param(self) -> float:
        return self.state_bytes / self.params

    @property
    def train_bytes_per_param(self) -> float:
        return self.train_bytes / self.params


# ---- data and model ------------------------------------------------------------------------


def load_corpus() -> torch.Tensor:
    """The embedded training text as a tensor of ASCII codes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((stdlib / name).read_bytes() for name in CORPUS_FILES if (stdlib / name).exists())
    if len(text) < 10_000:
        raise RuntimeError(f"the embedded corpus (Python's standard library sources in {stdlib}) could not be read")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    return torch.where(data < VOCAB, data, ord("?"))


class TinyGPT(nn.Module):
    """A small decoder-only transformer over characters."""

    def __init__(self, width: int, layers: int, context: int, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(n, device=idx.device))
        mask = self.causal[:n, :n].to(x.dtype)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def batches(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
        x = torch.stack([data[s : s + context] for s in starts])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
        yield x, y


# ---- optimizers ----------------------------------------------------------------------------


def optimizer_names() -> list[str]:
    """What a row may name: an optimizer, then lean.py's set-ups."""
    return plain_optimizer_names() + [*lean.SHORT_NAMES, *lean.SETUPS]


def plain_optimizer_names() -> list[str]:
    return ["torch_adamw"] + sorted(lean.optimizer_classes())


def make_optimizer(name: str, params, lr: float, **options) -> torch.optim.Optimizer:
    """Optimizer ``name`` with the demo's settings; ``options`` (a set-up's master weight and
    rounding) go to a qoptim optimizer."""
    if name == "torch_adamw" and not options:
        return torch.optim.AdamW(params, lr=lr)
    if name == "torch_adamw":
        raise ValueError(f"torch AdamW takes none of {sorted(options)}")
    if name not in plain_optimizer_names():
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(plain_optimizer_names())}")
    return lean.optimizer_classes()[name](params, **demo_settings(name, lr), **options)


def demo_settings(name: str, lr: float) -> dict:
    """Settings that make each family train this model sensibly at the demo's learning rate."""
    if name.startswith(("sgd", "lars")):
        return {"lr": 30 * lr, "momentum": 0.9}  # momentum SGD needs a larger step than Adam
    if "lion" in name:
        return {"lr": lr / 10}  # Lion's sign update is larger per element than Adam's
    return {"lr": lr}


# ---- one run -------------------------------------------------------------------------------


SAMPLED_STEPS = 3  # live bytes are counted on the first steps (states are made at the first) and the last


def _cosine(steps: int):
    """A factor on the lr: up linearly over the first 5% of the steps, then down to 10% along a
    cosine, so that the last losses of a run are those of a settled model, comparable between runs."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    return factor


SCHEDULES = {"constant": lambda steps: (lambda step: 1.0), "cosine": _cosine}


def train(config: RunConfig, progress: bool = True, make=make_optimizer) -> RunResult:
    """Train ``config``'s row; ``make(name, params, lr, **options)`` builds its optimizer."""
    setup = lean.setup_of(config.optimizer, config.dtype)
    device, dtype = torch.device(config.device), getattr(torch, setup.weights)
    data = load_corpus()
    split = int(0.9 * len(data))
    torch.manual_seed(config.seed)
    model = TinyGPT(config.width, config.layers, config.context).to(device=device, dtype=dtype)
    opt = make(setup.optimizer, model.parameters(), config.lr, **setup.options())
    tracker = lean.Tracker(setup, model.parameters(), opt)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULES[config.schedule](config.steps))
    train_batches = batches(data[:split], config.batch, config.context, torch.Generator().manual_seed(config.seed))
    val_batches = list(zip(range(config.val_batches), batches(data[split:], config.batch, config.context, torch.Generator().manual_seed(1))))
    loss_fn = nn.CrossEntropyLoss()

    def val_loss() -> float:
        with torch.no_grad():
            losses = [loss_fn(model(x.to(device)).float().view(-1, VOCAB), y.to(device).view(-1)).item() for _, (x, y) in val_batches]
        return sum(losses) / len(losses)

    result = RunResult(config.optimizer, sum(p.numel() for p in model.parameters()), 0, 0, "", 0.0, 0.0)
    eval_every = max(1, config.steps // config.evals)
    step_ms, opt_ms, timed = [], [], []
    bar = _progress_bar(config.steps, config.optimizer) if progress else None
    for step in range(1, config.steps + 1):
        x, y = next(train_batches)
        tracker.sampling, tracker.inside = step <= SAMPLED_STEPS or step == config.steps, 0.0
        t0 = time.perf_counter()
        loss = loss_fn(model(x.to(device)).float().view(-1, VOCAB), y.to(device).view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        tracker.sample()  # gradients complete (without release), states as the last step left them
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        tracker.sample()
        step_ms.append((t1 - t0 + t3 - t2) * 1e3)
        opt_ms.append((t3 - t2 + tracker.inside) * 1e3)  # under release the update runs inside backward
        timed.append(not tracker.sampling)  # a counted step's backward also ran the count
        schedule.step()
        result.train_losses.append(loss.item())
        if step % eval_every == 0 or step == config.steps:
            result.val_steps.append(step)
            result.val_losses.append(val_loss())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    tracker.close()
    # the first steps pay for compilation and allocation
    warm = [i for i in range(min(10, config.steps - 1), config.steps) if timed[i]] or list(range(config.steps))
    result.ms_per_step = statistics.median(step_ms[i] for i in warm)
    result.optimizer_ms_per_step = statistics.median(opt_ms[i] for i in warm)
    state = lean.live_bytes([], opt)
    result.state_bytes = state.states + state.master
    result.train_bytes, result.train_parts = tracker.peak.total, tracker.peak.as_dict()
    result.peak_bytes, result.peak_kind = _peak_memory(device)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU peak allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def _progress_bar(total: int, name: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"{name:>16}", unit="step", leave=True, dynamic_ncols=True)


def _child(config: dict, queue) -> None:
    try:
        queue.put(("ok", asdict(train(RunConfig(**config)))))
    except BaseException as e:  # report, don't hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def train_in_child(config: RunConfig) -> RunResult:
    """Run ``train`` in a fresh process (its peak memory is then its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(asdict(config), queue))
    child.start()
    status, payload = wait_for_result(child, queue)
    child.join()
    if status != "ok":
        raise RuntimeError(f"training with {config.optimizer} failed: {payload}")
    return RunResult(**payload)


def wait_for_result(child, queue) -> tuple[str, object]:
    """The child's message; a child that dies without one (killed, out of memory, a crash in
    native code) is reported instead of waited on forever."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not child.is_alive():
                try:  # it may have put its message just before exiting
                    return queue.get(timeout=1.0)
                except queue_module.Empty:
                    return "error", f"the training process exited with code {child.exitcode} without a result"


# ---- report --------------------------------------------------------------------------------


def table(results: list[RunResult]) -> str:
    baseline = results[0]
    header = ["optimizer", "state", "B/param", "vs first", "train B/param", results[0].peak_kind, "ms/step", "opt ms/step",
              "train loss", "val loss"]  # fmt: skip
    rows = [header]
    for r in results:
        final_train = sum(r.train_losses[-20:]) / len(r.train_losses[-20:])
        rows.append([
            r.optimizer, _mib(r.state_bytes), f"{r.bytes_per_param:.2f}",
            f"{r.state_bytes / baseline.state_bytes:.2f}x" if baseline.state_bytes else "-", f"{r.train_bytes_per_param:.2f}",
            _mib(r.peak_bytes), f"{r.ms_per_step:.1f}", f"{r.optimizer_ms_per_step:.2f}",
            f"{final_train:.3f}", f"{r.val_losses[-1]:.3f}",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def pyplot():
    """matplotlib's pyplot drawing to files (Agg); None (with the reason printed) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'qoptim[demo]')")
        return None
    return plt


def plot(results: list[RunResult], path: Path) -> Path | None:
    """Loss curves as a PNG; None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, gridspec_kw={"width_ratios": [2.2, 1]})
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(results):
        smooth = ema(r.train_losses, 0.9)
        style = styles[i % len(styles)]
        (line,) = ax.plot(range(1, len(smooth) + 1), smooth, style, label=f"{r.optimizer} train", linewidth=1.6)
        ax.plot(r.val_steps, r.val_losses, "o" + style, color=line.get_color(), label=f"{r.optimizer} val", markersize=4, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("Loss: same data, same seed (curves overlap when 8-bit matches fp32)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = [r.optimizer for r in results]
    bottom = [0.0] * len(results)
    # lean.TrainingBytes' parts, in colours other than the runs' (C0, C1, ...)
    for part, color in (("weights", "0.35"), ("grads", "0.65"), ("master", "tab:purple"), ("states", "tab:olive")):
        heights = [r.train_parts.get(part, 0) / r.params for r in results]
        bars.bar(names, heights, bottom=bottom, color=color, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, r in enumerate(results):
        bars.text(x, r.train_bytes_per_param, f"{r.train_bytes_per_param:.2f}", ha="center", va="bottom", fontsize=9)
    bars.set_ylabel("training state at its peak, bytes per parameter")
    bars.set_title("Weights + gradients + master + optimizer state", fontsize=9)
    bars.legend(fontsize=7)
    bars.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"TinyGPT ({results[0].params:,} parameters) on Python's standard library sources")
    return save_figure(plt, fig, path)


def save_figure(plt, fig, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` (its folder made) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def ema(values: list[float], decay: float) -> list[float]:
    out, avg = [], values[0]
    for v in values:
        avg = decay * avg + (1 - decay) * v
        out.append(avg)
    return out


def run_demo(optimizers: list[str], steps: int, device: str, dtype: str, out: Path, isolate: bool = True) -> list[RunResult]:
    results = []
    for name in optimizers:
        config = RunConfig(optimizer=name, steps=steps, device=device, dtype=dtype)
        results.append(train_in_child(config) if isolate else train(config))
    first = results[0]
    print(f"\nTinyGPT, {first.params:,} parameters, {steps} steps on {device} ({dtype}), threads={torch.get_num_threads()}\n")
    print(table(results))
    print("\nstate: optimizer state tensors; B/param: state bytes per model parameter; train B/param: the peak of weights + "
          "gradients + master + states per parameter (live tensors); ms/step: forward+backward+step (median); opt ms/step: "
          "optimizer.step() alone, and under gradient release its work inside backward")  # fmt: skip
    for name in optimizers:
        setup = lean.setup_of(name, dtype)
        if setup.optimizer != name:
            print(f"{name}: {setup.description}")
    path = plot(results, out / "loss_curves.png")
    if path is not None:
        print(f"loss curves: {path}")
    return results


__all__ = ["RunConfig", "RunResult", "train", "run_demo", "optimizer_names", "table", "plot", "load_corpus", "TinyGPT"]
