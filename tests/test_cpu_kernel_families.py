"""The fused CPU kernel on every rule but Adam (Lion, SGD momentum, LARS, RMSprop, Adagrad,
AdEMAMix, LAMB) against the reference backend, bit for bit over 20 steps.

As in test_cpu_kernel.py the reference gets a correctly rounded sqrt; LAMB's direction takes
it in place (``sqrt_``), so both are patched here. Numba compiles each rule once per parameter
dtype, state kind (8-bit or fp32) and driver (one task or parallel), so the full dtype cross
runs on a few rules only, to keep a cold cache within budget.
"""

import contextlib

import pytest
import torch
from test_cpu_kernel import assert_same, copy_state, torch_threads

from qoptim.kernels import BLOCK, WHOLE_TENSOR, Hyper, StateSlot, cpu, reference
from qoptim.quant.maps import signed_map, unsigned_map

STEPS = 20
SIZES = [1, 257, 4097, 65537]  # the last one takes the parallel drivers (PARALLEL_MIN below)
RULES = ["lion", "momentum", "lars", "rmsprop", "adagrad", "ademamix", "lamb"]
LAYOUTS = ["block", "whole", "fp32"]

# each rule on fp32 parameters in every layout; bf16 / fp16 parameters on a few
CASES = [(rule, torch.float32, layout) for rule in RULES for layout in LAYOUTS]
CASES += [("lion", torch.bfloat16, "block"), ("ademamix", torch.float16, "whole"), ("lars", torch.bfloat16, "fp32")]

# non-negative states take the unsigned map, as the optimizer classes do
UNSIGNED = {"rmsprop": [1], "adagrad": [1], "ademamix": [0, 0, 1], "lamb": [0, 1]}


@contextlib.contextmanager
def exact_sqrt_everywhere():
    plain, plain_ = torch.Tensor.sqrt, torch.Tensor.sqrt_
    torch.Tensor.sqrt = lambda self: plain(self.double()).to(self.dtype)
    torch.Tensor.sqrt_ = lambda self: self.copy_(plain(self.double()))
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.sqrt_ = plain, plain_


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """Parallel drivers from 65536 elements; one torch thread for the oracle's small ops, and
    for the trust-ratio pre-pass of LAMB / LARS, which the kernel takes from the reference
    (torch ops: with two threads on a busy machine they stall, and their float64 sums could
    split differently from the oracle's)."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 1 << 16)
    plain_ratio = reference._trust_ratio

    def one_thread_ratio(*args):
        with torch_threads(1):
            return plain_ratio(*args)

    monkeypatch.setattr(reference, "_trust_ratio", one_thread_ratio)
    with torch_threads(1), exact_sqrt_everywhere():
        yield


def make_state(rule, n, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    count = reference.RULES[rule][1]
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n)) for _ in range(count)]
    blocksize, scales = (BLOCK, -(-n // BLOCK)) if layout == "block" else (WHOLE_TENSOR, 1)
    unsigned = UNSIGNED.get(rule, [0] * count)
    codes = [unsigned_map() if u else signed_map() for u in unsigned]
    return p, [StateSlot(torch.zeros(n, dtype=torch.uint8), c, torch.zeros(scales), blocksize) for c in codes]


def hyper(rule, step):
    """Each rule's hyperparameters, with its options switched on; percentile clipping's
    gradient scale on some steps."""
    common = dict(step=step, gnorm_scale=0.37 if step % 3 == 0 else 1.0, eps=1e-8, weight_decay=0.1, decoupled=True)
    if rule == "lion":
        return Hyper(lr=1e-4, beta1=0.9, beta2=0.99, **common)
    if rule == "momentum":
        return Hyper(lr=1e-2, beta1=0.9, beta2=0.0, nesterov=True, **common)
    if rule == "lars":  # dampening, and a trust coefficient (max_unorm)
        return Hyper(lr=1e-1, beta1=0.9, beta2=0.0, dampening=0.1, max_unorm=0.02, **common)
    if rule == "rmsprop":
        return Hyper(lr=1e-3, beta1=0.99, beta2=0.0, **common)
    if rule == "adagrad":
        return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, lr_decay=0.01, **common)
    if rule == "ademamix":  # alpha and beta3 as if scheduled
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999 - 0.01 / step, alpha=min(5.0, 0.5 * step), **common)
    if rule == "lamb":  # L2 decay on odd steps, decoupled on even ones; no bias correction on some; a norm cap
        common.update(decoupled=step % 2 == 0)
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, bias_correction=step % 5 != 0, max_unorm=0.05 if step > 10 else 0.0, **common)
    raise ValueError(rule)


def gradient(n, dtype, step, gen, nonfinite):
    g = torch.randn(n, generator=gen) * 0.01
    if nonfinite and step in (4, 11, 17):  # a NaN, an Inf and a -Inf in one or two blocks
        g[(step * 7919) % n] = (float("nan"), float("inf"), -float("inf"))[step % 3]
    return g.to(dtype)


def check_steps(rule, n, dtype, layout, skip):
    p_ref, slots_ref = make_state(rule, n, dtype, layout)
    assert cpu.supports(rule, p_ref, slots_ref)
    p, slots = copy_state(p_ref, slots_ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        g = gradient(n, dtype, step, gen, nonfinite=True)
        hp = hyper(rule, step)
        expected = reference.update(rule, p_ref, g, slots_ref, hp, skip)
        with torch_threads(2):  # two tasks where the size allows, whatever the machine
            got = cpu.update(rule, p, g, slots, hp, skip)
        assert got == expected, f"step {step}"
        assert_same(p, p_ref)
        for ours, theirs in zip(slots, slots_ref):
            assert_same(ours.values, theirs.values)
            if ours.quantized:
                assert_same(ours.absmax, theirs.absmax)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rule,dtype,layout", CASES, ids=[f"{r}-{str(d)[6:]}-{lay}" for r, d, lay in CASES])
def test_kernel_is_bit_identical_to_the_reference(rule, dtype, layout, n):
    """Skip mode, NaN / Inf gradients on some steps: same skipped-block count, parameter
    bits, codes, scales and fp32 states every step."""
    check_steps(rule, n, dtype, layout, skip=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES)
def test_propagate_mode_is_bit_identical_too(rule, layout):
    """Without skipping, NaN and Inf flow into the states (and scales) exactly as in the reference."""
    check_steps(rule, 4097, torch.float32, layout, skip=False)


def test_every_rule_and_layout_is_covered():
    for rule in RULES + ["adam"]:
        for layout in LAYOUTS:
            p, slots = make_state(rule, 300, torch.float32, layout)
            assert cpu.supports(rule, p, slots)
            assert not cpu.supports(rule, p, slots + slots[:1])  # a state too many
    assert not cpu.supports("no-such-rule", *make_state("lion", 300, torch.float32, "block"))
