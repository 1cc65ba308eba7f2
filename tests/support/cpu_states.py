"""Parameters and optimizer states for the CPU kernel's tests (tests/kernels/cpu), and checks."""

import contextlib
import math

import pytest
import torch

from qoptim.kernels import BLOCK, NEAREST, WHOLE_TENSOR, Hyper, StateSlot, cpu, reference
from qoptim.kernels.cpu import launch, layout, step
from qoptim.kernels.rules import RULES
from qoptim.quant.maps import signed_map, unsigned_map

LAYOUTS = ["block", "whole", "fp32"]


def make_state(n, dtype, layout, seed=0, code=None):
    """An Adam parameter and its two states (``code``: one map for both, else the standard ones)."""
    gen = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n)), StateSlot(torch.zeros(n))]
    blocksize, scales = (BLOCK, -(-n // BLOCK)) if layout == "block" else (WHOLE_TENSOR, 1)
    codes = (signed_map(), unsigned_map()) if code is None else (code, code)
    return p, [StateSlot(torch.zeros(n, dtype=torch.uint8), c, torch.zeros(scales), blocksize) for c in codes]


def make_rule_state(rule, n, dtype, layout):
    """A parameter and ``rule``'s states; non-negative states take the unsigned map, as the optimizer classes do."""
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    signed = RULES[rule].signed
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n)) for _ in signed]
    blocksize, scales = (BLOCK, -(-n // BLOCK)) if layout == "block" else (WHOLE_TENSOR, 1)
    return p, [StateSlot(torch.zeros(n, dtype=torch.uint8), signed_map() if s else unsigned_map(), torch.zeros(scales), blocksize) for s in signed]


def copy_state(p, slots):
    return p.clone(), [StateSlot(s.values.clone(), s.code, None if s.absmax is None else s.absmax.clone(), s.blocksize) for s in slots]


def gradient(n, dtype, step, gen, nonfinite):
    g = torch.randn(n, generator=gen) * 0.01
    if nonfinite and step in (4, 11, 17):  # a NaN, an Inf and a -Inf in one or two blocks
        g[(step * 7919) % n] = (float("nan"), float("inf"), -float("inf"))[step % 3]
    return g.to(dtype)


def adam_hyper(step, decoupled):
    # percentile clipping's gradient scale kicks in on some steps
    return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step, decoupled=decoupled,
                 gnorm_scale=0.37 if step % 3 == 0 else 1.0)  # fmt: skip


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@contextlib.contextmanager
def torch_threads(n):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kernel_ratio(rule, p, g, slots, hp, skip, tasks=1, weights=NEAREST):
    """The CPU kernel's LAMB / LARS trust ratio of ``p`` from a fused pass in ``tasks`` tasks."""
    return step.trust_ratio(rule, layout.plan(rule, p, slots), p, g, slots, hp, skip, tasks, weights)


def same_ratio(ours, theirs):
    """Trust ratios that sum in other orders (the kernel's and torch's) agree to 1e-9, NaN with NaN."""
    return ours == pytest.approx(theirs, rel=1e-9) or (math.isnan(ours) and math.isnan(theirs))


@contextlib.contextmanager
def kernel_oracle(monkeypatch, parallel_min):
    """What the CPU kernel's tests against the reference set up: parallel tasks from
    ``parallel_min`` elements, one torch thread for the reference's small ops; its LAMB / LARS
    ratio checked against the kernel's fused pass (one task: the sums do not depend on the
    split), which it then steps with."""
    monkeypatch.setattr(launch, "PARALLEL_MIN", parallel_min)
    reference_ratio = reference.trust_ratio

    def checked_ratio(rule, p, g, slots, hp, skip, weights=NEAREST):
        ours = kernel_ratio(rule, p, g, slots, hp, skip, 1, weights)
        assert same_ratio(ours, reference_ratio(rule, p, g, slots, hp, skip, weights))
        return ours

    monkeypatch.setattr(reference, "trust_ratio", checked_ratio)
    with torch_threads(1):
        yield


def two_threads(*args):
    """cpu.update with two threads (so two tasks and more where the size allows)."""
    with torch_threads(2):
        return cpu.update(*args)
