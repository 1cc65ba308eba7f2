"""Which 4-bit format for Adam's two states (issue #18)? Candidate formats trained side by side.

Each candidate is a declaration: how the first moment m and the second moment v are stored (a map
of 16 codes, block-wise or rank-1 scales, how a value rounds to a code). One AdamW in plain torch
(``StudyAdamW``: dequantize, update in fp32, step the parameter with the unquantized moments,
requantize, as every 8-bit optimizer here does) runs each of them; fp32 AdamW and qoptim's
AdamW8bit and AdamW4bit run as the references. Two tasks, fp32 weights so that only the states differ:

* ``gpt``: the character GPT of benchmarks/lean.py (qoptim.cli.demo.train), smaller by default;
* ``mlp``: a 3-layer MLP learning the labels of a random teacher network from fresh samples each step.

    python benchmarks/state_formats.py --task gpt
    python benchmarks/state_formats.py --task mlp --seeds 0,1,2
    python benchmarks/state_formats.py --task gpt --table   # the saved results
    python benchmarks/state_formats.py --task gpt --lr 1e-3 --results benchmarks/results/state_formats_lr1e-3

Randomness (stochastic rounding, dithers) comes from torch generators here; the formats only
study quality. Results are JSON in benchmarks/results/state_formats/.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qoptim import optim as qoptim_optim
from qoptim.cli import demo, machine
from qoptim.quant.maps import create_dynamic_map, signed_map, unsigned_map

RESULTS = Path(__file__).parent / "results" / "state_formats"
BLOCK = 128
LEVELS = 16

# ---- maps ------------------------------------------------------------------------------------

DYNAMIC4 = create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)  # torchao's / lpmm's m map
LINEAR4 = torch.linspace(0, 1, LEVELS + 1)[1:]  # zero-free {1/16 .. 1}: lpmm's and torchao's v map
SIGNED8, UNSIGNED8 = signed_map(), unsigned_map()  # bitsandbytes' 8-bit maps (blocks of 256)


# ---- rounding a scaled value u (|u| <= 1) to one of a sorted map's codes ----------------------


def nearest(u: torch.Tensor, code: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mids = (code[:-1] + code[1:]) / 2
    return code[torch.bucketize(u, mids)]


def stochastic(u: torch.Tensor, code: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Up to the next code with probability (u - lo) / (hi - lo): unbiased between codes."""
    lo = (torch.bucketize(u, code, right=True) - 1).clamp(0, len(code) - 2)
    low, high = code[lo], code[lo + 1]
    up = torch.rand(u.shape, generator=gen) < ((u - low) / (high - low)).clamp(0, 1)
    return torch.where(up, high, low)


def dithered_linear(u: torch.Tensor, signed: bool, gen: torch.Generator) -> torch.Tensor:
    """Subtractive dither on a uniform grid of 16 levels: q = round(t + d), value t' = q - d, with
    d uniform in [-0.5, 0.5) replayed when decoding (here: kept). The error is uniform and
    independent of the value. Unsigned: t = 16u - 1 on levels 0..15 (never 0 after decoding:
    u' >= 1/32). Signed: t = 7u on levels -7..7 (u' in [-15/14, 15/14])."""
    d = torch.rand(u.shape, generator=gen) - 0.5
    if signed:
        q = torch.round(7 * u + d).clamp(-7, 7)
        return (q - d) / 7
    q = torch.round(16 * u - 1 + d).clamp(0, 15)
    return (q - d + 1) / 16


def dithered_sqrt(u: torch.Tensor, signed: bool, gen: torch.Generator) -> torch.Tensor:
    """Subtractive dither in a companded domain: sign(u) sqrt|u| dithered on the uniform grid."""
    root = dithered_linear(u.sign() * u.abs().sqrt(), signed, gen)
    return root.sign() * root.square()


@dataclass(frozen=True)
class StateCodec:
    """How one moment is stored: its map, how values round to it, its scales."""

    name: str
    quantize: Callable  # (u, gen) -> the decoded value of u's code
    scales: str = "block"  # "block": absmax per ``block`` elements; "rank1": min of row and column absmax (2-D)
    root: bool = False  # store sqrt(v) (companding of the second moment), squared again on decoding
    block: int = BLOCK


def _mapped(code: torch.Tensor, rounding) -> Callable:
    return lambda u, gen: rounding(u, code, gen)


def _off_zero(code: torch.Tensor, rounding) -> Callable:
    """``rounding`` to an unsigned map with a zero code, a positive value never to 0 but to the
    smallest positive code (qoptim's rule for 8-bit second moments, ``quant.blockwise``)."""
    def rounded(u, gen):
        value = rounding(u, code, gen)
        return torch.where((u > 0) & (value == 0), code[1], value)

    return rounded


M_NEAREST = StateCodec("dyn4", _mapped(DYNAMIC4, nearest))
M_STOCHASTIC = StateCodec("dyn4-sr", _mapped(DYNAMIC4, stochastic))
M_DITHER_SQRT = StateCodec("sqrt-dither", lambda u, gen: dithered_sqrt(u, True, gen))
M_DITHER_LINEAR = StateCodec("lin-dither", lambda u, gen: dithered_linear(u, True, gen))
V_NEAREST = StateCodec("lin4", _mapped(LINEAR4, nearest))
V_STOCHASTIC = StateCodec("lin4-sr", _mapped(LINEAR4, stochastic))
V_DITHER = StateCodec("lin-dither", lambda u, gen: dithered_linear(u, False, gen))
V_RANK1 = StateCodec("lin4-rank1", _mapped(LINEAR4, nearest), scales="rank1")
V_ROOT = StateCodec("sqrt-lin4", _mapped(LINEAR4, nearest), root=True)
V_ROOT_DITHER = StateCodec("sqrt-lin-dither", lambda u, gen: dithered_linear(u, False, gen), root=True)
M8_NEAREST = StateCodec("dyn8", _mapped(SIGNED8, nearest), block=256)
V8_NEAREST = StateCodec("udyn8", _off_zero(UNSIGNED8, nearest), block=256)
V8_STOCHASTIC = StateCodec("udyn8-sr", _off_zero(UNSIGNED8, stochastic), block=256)


@dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    m: StateCodec
    v: StateCodec


CANDIDATES = {
    c.name: c
    for c in (
        Candidate("ao4-nearest", "torchao / lpmm group-128: dynamic m, zero-free linear v, nearest", M_NEAREST, V_NEAREST),
        Candidate("ao4-stochastic", "the same maps, stochastic rounding", M_STOCHASTIC, V_STOCHASTIC),
        Candidate("ao4-vsr", "the same maps, m to nearest, v stochastic", M_NEAREST, V_STOCHASTIC),
        Candidate("ao4-rank1", "lpmm: dynamic m, zero-free linear v with rank-1 scales, nearest", M_NEAREST, V_RANK1),
        Candidate("dither-linear", "subtractive dither, uniform grids for m and v", M_DITHER_LINEAR, V_DITHER),
        Candidate("dither-sqrt", "subtractive dither, m companded by sqrt, v linear", M_DITHER_SQRT, V_DITHER),
        Candidate("sqrt-v-nearest", "dynamic m, sqrt(v) on the zero-free linear map, nearest", M_NEAREST, V_ROOT),
        Candidate("sqrt-v-dither", "sqrt-companded dither for both m and sqrt(v)", M_DITHER_SQRT, V_ROOT_DITHER),
        Candidate("bnb8-nearest", "bitsandbytes' 8-bit format: dynamic maps, blocks of 256, nearest", M8_NEAREST, V8_NEAREST),
        Candidate("bnb8-vsr", "the 8-bit maps, m to nearest, v stochastic", M8_NEAREST, V8_STOCHASTIC),
    )
}
REFERENCES = ("fp32-adamw", "qoptim-adamw8bit", "qoptim-adamw4bit")  # the last: the library's 4-bit format (ao4-vsr's, keyed)


# ---- storing a moment -------------------------------------------------------------------------


def _block_scales(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, block).amax(dim=1)
    return blocks.repeat_interleave(block)[: flat.numel()].view(x.shape)


def _rank1_scales(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2:
        return _block_scales(x)
    a = x.abs().reshape(x.shape[0], -1)
    return torch.minimum(a.amax(dim=1, keepdim=True), a.amax(dim=0, keepdim=True)).view(x.shape)


def store(x: torch.Tensor, codec: StateCodec, gen: torch.Generator) -> torch.Tensor:
    """x as its codec keeps it, decoded again (what the next step reads)."""
    if codec.root:
        return store(x.sqrt(), StateCodec(codec.name, codec.quantize, codec.scales, block=codec.block), gen).square()
    scales = _rank1_scales(x) if codec.scales == "rank1" else _block_scales(x, codec.block)
    u = torch.where(scales > 0, x / scales, torch.zeros_like(x))
    return codec.quantize(u, gen) * scales


class StudyAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored in a candidate's format (tensors below ``min_size``: fp32)."""

    def __init__(self, params, candidate: Candidate, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 min_size=4096, seed=0):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.candidate, self.min_size = candidate, min_size
        self.gen = torch.Generator().manual_seed(1000 + seed)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p, dtype=torch.float32), v=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                t, g, m, v = state["step"], p.grad.float(), state["m"], state["v"]
                m.mul_(beta1).add_(g * (1 - beta1))
                v.mul_(beta2).add_((g * (1 - beta2)) * g)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p.sub_(m / denom * (group["lr"] / (1 - beta1**t)))
                if p.numel() >= self.min_size:
                    m.copy_(store(m, self.candidate.m, self.gen))
                    v.copy_(store(v, self.candidate.v, self.gen))


# ---- tasks ------------------------------------------------------------------------------------


def make_optimizer(name: str, params, lr: float, seed: int):
    if name == "fp32-adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    if name == "qoptim-adamw8bit":
        return qoptim_optim.AdamW8bit(params, lr=lr, weight_decay=1e-2)
    if name == "qoptim-adamw4bit":
        return qoptim_optim.AdamW4bit(params, lr=lr, weight_decay=1e-2)
    return StudyAdamW(params, CANDIDATES[name], lr=lr, seed=seed)


def run_gpt(name: str, args, seed: int) -> dict:
    config = demo.RunConfig(name, steps=args.steps, lr=args.lr, width=args.width, layers=args.layers,
                            context=args.context, batch=args.batch, seed=seed, evals=10, schedule="cosine", val_batches=32)  # fmt: skip
    result = demo.train(config, progress=False, make=lambda n, params, lr, **_: make_optimizer(n, params, lr, seed))
    return dict(val_loss=result.val_losses[-1], val_steps=result.val_steps, val_losses=result.val_losses,
                params=result.params)  # fmt: skip


class Teacher:
    """A fixed random 2-layer network whose argmax labels the MLP task's inputs; every batch is
    new samples (no data is seen twice: the task measures optimization, not overfitting)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1234)
        self.w1, self.w2 = torch.randn(64, 128, generator=gen) / 8, torch.randn(128, 10, generator=gen) / 4

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 64, generator=gen)
        return x, torch.tanh(x @ self.w1).matmul(self.w2).argmax(dim=1)


def run_mlp(name: str, args, seed: int) -> dict:
    teacher = Teacher()
    x_val, y_val = teacher.sample(8192, torch.Generator().manual_seed(4321))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 10))
    opt = make_optimizer(name, model.parameters(), args.lr, seed)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, demo.SCHEDULES["cosine"](args.steps))
    gen = torch.Generator().manual_seed(seed)
    loss_fn, steps, losses = nn.CrossEntropyLoss(), [], []
    for step in range(1, args.steps + 1):
        x, y = teacher.sample(128, gen)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            with torch.no_grad():
                steps.append(step)
                losses.append(loss_fn(model(x_val), y_val).item())
    return dict(val_loss=losses[-1], val_steps=steps, val_losses=losses, params=sum(p.numel() for p in model.parameters()))


TASKS = {"gpt": run_gpt, "mlp": run_mlp}
DEFAULTS = {  # steps, lr per task
    "gpt": dict(steps=1000, lr=2e-3),
    "mlp": dict(steps=2000, lr=1e-3),
}


def table(folder: Path) -> str:
    """Each format's final validation loss against fp32 AdamW's on the same seeds (mean over them)."""
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not rows:
        return f"no results in {folder}"
    losses: dict[str, dict[int, float]] = {}
    for r in rows:
        losses.setdefault(r["name"], {})[r["seed"]] = r["val_loss"]
    base = losses.get("fp32-adamw", {})
    first = rows[0]
    lines = [f"task {first['task']}, {first['steps']} steps at lr {first['lr']} ({first['cpu']}): final validation loss, "
             "mean over the seeds it ran, and its mean ratio to fp32 AdamW's on the same seeds",
             "| format | seeds | val loss | vs fp32 AdamW |", "|---|---|---|---|"]  # fmt: skip
    for name, by_seed in sorted(losses.items(), key=lambda kv: statistics.mean(kv[1].values())):
        paired = [loss / base[seed] - 1 for seed, loss in by_seed.items() if seed in base]
        versus = f"{100 * statistics.mean(paired):+.2f}%" if paired else "-"
        lines.append(f"| {name} | {len(by_seed)} | {statistics.mean(by_seed.values()):.4f} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="gpt")
    parser.add_argument("--formats", default=",".join([*REFERENCES, *CANDIDATES]))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results (one sub-folder per task)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(args.results / args.task))
        return
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.results / args.task
    out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.formats.split(","):
            if name not in CANDIDATES and name not in REFERENCES:
                sys.exit(f"unknown format {name!r}: {', '.join([*REFERENCES, *CANDIDATES])}")
            t0 = time.perf_counter()
            result = TASKS[args.task](name, args, seed)
            result.update(name=name, seed=seed, task=args.task, steps=args.steps, lr=args.lr, cpu=machine.cpu_name(),
                          seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
            (out / f"{name}-seed{seed}.json").write_text(json.dumps(result, indent=1))
            print(f"{args.task} seed {seed} {name:18s} val loss {result['val_loss']:.4f}  ({result['seconds']} s)", flush=True)
    print(table(out))


if __name__ == "__main__":
    main()
