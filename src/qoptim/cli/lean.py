"""Lean training set-ups (issue #17) and the bytes a training run holds.

A set-up is what decides a run's memory: the weights' dtype, the optimizer, its master weight
(``master_weight_bits``), its weight rounding and gradient release. One table of them serves
`qoptim demo` (its ``lean`` row, and any set-up by name), `qoptim memory`'s whole-training table
(the bytes they need, by qoptim's layout rules) and benchmarks/lean.py (one process per set-up,
the bytes counted from live tensors).

``live_bytes`` counts what a run holds: the parameters, their ``.grad`` and every tensor in the
optimizer's state (a tensor shared by several parameters, like the 8-bit states' qmaps, once).
``Tracker`` keeps the peak of that count at the points where it peaks: after backward and after
``step()``, and under gradient release inside backward, where the gradients are freed as they are
applied (each parameter's count is taken before release's own hook, with its gradient and the
queued ones still alive). It also times the optimizer's share of backward under release.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import optim
from ..optim.release import release_gradients
from ..optim.state import MASTER_CORRECTION


@dataclass(frozen=True)
class Setup:
    name: str  # as typed on the command line and shown in tables
    description: str
    weights: str = "bfloat16"  # the parameters' dtype
    optimizer: str = "adamw8bit"  # torch_adamw, or a qoptim optimizer's name in lower case
    master_weight_bits: int | None = None
    weight_rounding: str = "nearest"
    state_rounding: str | None = None  # how v rounds to its codes (None: the states' format's way)
    min_8bit_size: int | None = None  # None: the optimizer's default (4096: smaller tensors keep 32-bit states)
    # None: no gradient release. Otherwise qoptim.release_gradients' bucket_bytes; 0 updates and frees
    # each gradient as soon as it is complete (the least gradient memory: one tensor's at a time).
    release_bucket_bytes: int | None = None

    @property
    def release(self) -> bool:
        return self.release_bucket_bytes is not None

    @property
    def state_bits(self) -> int:
        """The bits of its optimizer's states: 32 (torch AdamW, a 32-bit class), 8 or 4."""
        return getattr(optimizer_classes().get(self.optimizer), "fixed_bits", None) or 32

    def options(self) -> dict[str, Any]:
        """The optimizer's keyword arguments for the master weight and roundings (only those that
        differ from the defaults, so that a set-up without them builds any optimizer)."""
        options: dict[str, Any] = {}
        if self.master_weight_bits is not None:
            options["master_weight_bits"] = self.master_weight_bits
        if self.weight_rounding != "nearest":
            options["weight_rounding"] = self.weight_rounding
        if self.state_rounding is not None:
            options["state_rounding"] = self.state_rounding
        if self.min_8bit_size is not None:
            options["min_8bit_size"] = self.min_8bit_size
        return options


def optimizer_classes() -> dict[str, type]:
    """qoptim's optimizer classes (bitsandbytes' names and its own 4-bit ones) by lower-case name."""
    names = (*optim.__all__, *optim.QOPTIM_NAMES)
    return {n.lower(): getattr(optim, n) for n in names if n[0].isupper() and "Optimizer" not in n and n != "GlobalOptimManager"}


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in (
        Setup("fp32-torch-adamw", "fp32 weights, torch AdamW (the baseline)", "float32", "torch_adamw"),
        Setup("fp32-adamw8bit", "fp32 weights, AdamW8bit", "float32"),
        Setup("fp32-adamw4bit", "fp32 weights, AdamW4bit (its states alone against fp32 AdamW)", "float32", "adamw4bit"),
        Setup("bf16-adamw8bit", "bf16 weights, AdamW8bit, no master weight"),
        Setup("bf16-master24", "bf16 weights, AdamW8bit, 24-bit master (int8 correction)", master_weight_bits=24),
        Setup("bf16-master32", "bf16 weights, AdamW8bit, 32-bit master (int16 correction)", master_weight_bits=32),
        Setup("bf16-stochastic", "bf16 weights, AdamW8bit, stochastic rounding", weight_rounding="stochastic"),
        Setup("bf16-master24-release", "bf16 weights, AdamW8bit, 24-bit master, gradient release",
              master_weight_bits=24, release_bucket_bytes=0),  # fmt: skip
        Setup("fp32-adamw8bit-v-stochastic", "fp32 weights, AdamW8bit, v rounded stochastically", "float32",
              state_rounding="stochastic"),  # fmt: skip
        Setup("bf16-master32-v-stochastic", "bf16 weights, AdamW8bit with v rounded stochastically, 32-bit master",
              master_weight_bits=32, state_rounding="stochastic"),  # fmt: skip
        Setup("bf16-master24-release-v-stochastic", "bf16 weights, AdamW8bit with v rounded stochastically, 24-bit master, "
              "gradient release", master_weight_bits=24, release_bucket_bytes=0, state_rounding="stochastic"),  # fmt: skip
        Setup("bf16-master24-release-v-stochastic-all8", "bf16 weights, AdamW8bit with v rounded stochastically and every "
              "tensor's states in 8 bits (min_8bit_size=0), 24-bit master, gradient release", master_weight_bits=24,
              release_bucket_bytes=0, state_rounding="stochastic", min_8bit_size=0),  # fmt: skip
        Setup("bf16-4bit-master24-release", "bf16 weights, AdamW4bit, 24-bit master, gradient release", optimizer="adamw4bit",
              master_weight_bits=24, release_bucket_bytes=0),  # fmt: skip
        Setup("bf16-4bit-master24-release-v-nearest", "bf16 weights, AdamW4bit with v rounded to nearest, 24-bit master, "
              "gradient release", optimizer="adamw4bit", master_weight_bits=24, release_bucket_bytes=0, state_rounding="nearest"),  # fmt: skip
    )
}
# the demo's short names of the leanest set-ups with 8-bit and with 4-bit states
LEAN = Setup("lean", "bf16 weights, AdamW8bit, 24-bit master, gradient release", master_weight_bits=24, release_bucket_bytes=0)
LEAN4 = Setup("lean4", "bf16 weights, AdamW4bit, 24-bit master, gradient release", optimizer="adamw4bit", master_weight_bits=24,
              release_bucket_bytes=0)  # fmt: skip
SHORT_NAMES = {LEAN.name: LEAN, LEAN4.name: LEAN4}


def setup_of(name: str, dtype: str) -> Setup:
    """The set-up a demo row or benchmark configuration names: ``lean``, ``lean4``, one of SETUPS,
    or a plain optimizer name trained on ``dtype`` weights."""
    return SHORT_NAMES.get(name) or SETUPS.get(name) or Setup(name, f"{name} on {dtype} weights", dtype, name)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The GPT and training the lean benchmarks run (``benchmarks/lean.py``, ``lean_speed.py``):
    21.4M parameters in 12 layers (a GPT-2-like depth: the largest tensor, whose gradient gradient
    release holds, is 2.8% of them); 512 tokens a step, ~0.8 s on 2 cores of this project's machines."""
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)


# ---- live bytes ----------------------------------------------------------------------------


@dataclass
class TrainingBytes:
    weights: int = 0
    grads: int = 0
    master: int = 0  # master corrections
    states: int = 0  # every other optimizer state tensor

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.master + self.states

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _pieces(t: torch.Tensor):
    """The plain tensors holding ``t``'s data (a tensor subclass, like torchao's quantized states,
    through what it flattens to)."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _pieces(getattr(t, name))
    else:
        yield t


def live_bytes(params, optimizer: torch.optim.Optimizer) -> TrainingBytes:
    """Bytes held now by ``params``, their gradients and ``optimizer``'s state; storage shared by
    several tensors counted once."""
    seen: set[tuple[int, int]] = set()
    counted = TrainingBytes()

    def add(kind: str, tensor: torch.Tensor) -> None:
        for t in _pieces(tensor):
            size = t.numel() * t.element_size()
            key = (t.data_ptr(), size)
            if size and key not in seen:
                seen.add(key)
                setattr(counted, kind, getattr(counted, kind) + size)

    for p in params:
        add("weights", p)
        if p.grad is not None:
            add("grads", p.grad)
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                add("master" if key == MASTER_CORRECTION else "states", value)
    return counted


class Tracker:
    """Gradient release for a set-up that asks for it, the peak of ``live_bytes`` while
    ``sampling`` is on, and ``inside``: seconds the optimizer spent inside the last backward
    (release's hooks and its end-of-backward flush; 0 without release)."""

    def __init__(self, setup: Setup, params, optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = list(params), optimizer
        self.peak = TrainingBytes()
        self.sampling = False
        self.inside = 0.0
        self.started = 0.0
        self.hooks: list[Any] = []
        self.handle = None
        if setup.release:
            # Hooks run in the order registered: ours before release's (the gradient is still there:
            # the count's peak) and after it (the time between is release's).
            self.hooks += [p.register_post_accumulate_grad_hook(self.before_release) for p in self.params]
            self.handle = release_gradients(optimizer, bucket_bytes=setup.release_bucket_bytes)
            self.hooks += [p.register_post_accumulate_grad_hook(self.after_release) for p in self.params]
            flush = self.handle.end_of_backward  # queued by release's first hook of each backward: looked up then
            self.handle.end_of_backward = lambda: self.timed(flush)

    def sample(self) -> None:
        if self.sampling:
            now = live_bytes(self.params, self.optimizer)
            if now.total > self.peak.total:
                self.peak = now

    def before_release(self, _) -> None:
        self.sample()
        self.started = time.perf_counter()

    def after_release(self, _) -> None:
        self.inside += time.perf_counter() - self.started

    def timed(self, call) -> None:
        start = time.perf_counter()
        call()
        self.inside += time.perf_counter() - start

    def close(self) -> None:
        """Remove the hooks and gradient release (the hooks hold this tracker, and so the optimizer)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


__all__ = ["LEAN", "LEAN4", "SETUPS", "SHORT_NAMES", "Setup", "Tracker", "TrainingBytes", "add_model_arguments", "live_bytes", "optimizer_classes", "setup_of"]
