"""The fused CPU kernel on every rule of kernels.rules.RULES but Adam (Lion, SGD momentum, LARS,
RMSprop, Adagrad, AdEMAMix, LAMB; Adam: test_adam.py) against the reference backend, bit for bit
over 20 steps.

As in test_adam.py the reference runs as it is: its sqrt is correctly rounded, as the kernel's
(``reference.sqrt``). Numba compiles each rule once per parameter dtype, state kind (8-bit or
fp32), driver (one task or parallel) and path, so the full dtype cross runs on a few rules only,
and the paths other than the best on fewer still, to keep a cold cache within budget.

LAMB and LARS scale their step by a layer-wise ratio of two norms, float64 sums over the
whole tensor. The kernel's sums run in another order than torch's in the reference, so the
ratios agree to ~1e-16 relative, not bit for bit: the tests check the ratio to 1e-9, then give
the reference the kernel's ratio and demand the rest of the step bit for bit.
"""

import pytest
import torch
from support.cpu_states import LAYOUTS, assert_same, copy_state, gradient, kernel_oracle, kernel_ratio, same_ratio, torch_threads
from support.cpu_states import make_rule_state as make_state

from qoptim.kernels import Hyper, cpu, reference
from qoptim.kernels import rules as rule_table
from qoptim.kernels.cpu import rules as cpu_rules

STEPS = 20
SIZES = [1, 257, 4097, 65537]  # the last one takes the parallel drivers (PARALLEL_MIN below)
RULES = [rule for rule in rule_table.RULES if rule != "adam"]  # (Adam: test_adam.py)

# each rule on fp32 parameters in every layout; bf16 / fp16 parameters on a few
CASES = [(rule, torch.float32, layout) for rule in RULES for layout in LAYOUTS]
CASES += [("lion", torch.bfloat16, "block"), ("ademamix", torch.float16, "whole"), ("lars", torch.bfloat16, "fp32")]
# the other paths (the best one takes all of the above): rules with one, two and three 8-bit states
PATH_CASES = [(rule, layout, path) for path in ("avx2", "portable") for rule, layout in [("lion", "block"), ("lamb", "whole"), ("ademamix", "block")]]

REFERENCE_RATIO = reference.trust_ratio  # before _setup stands in for it


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """Parallel drivers from 65536 elements, and the rest of ``kernel_oracle`` (the kernel's
    ratio is what the reference steps with: see the module's docstring)."""
    with kernel_oracle(monkeypatch, 1 << 16):
        yield


def hyper(rule, step):
    """Each rule's hyperparameters, with its options switched on; percentile clipping's
    gradient scale on some steps."""
    common = dict(step=step, gnorm_scale=0.37 if step % 3 == 0 else 1.0, eps=1e-8, weight_decay=0.1, decoupled=True)
    if rule == "lion":
        return Hyper(lr=1e-4, beta1=0.9, beta2=0.99, **common)
    if rule == "momentum":
        return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, momentum=0.9, nesterov=True, **common)
    if rule == "lars":  # dampening, and a trust coefficient
        return Hyper(lr=1e-1, beta1=0.0, beta2=0.0, momentum=0.9, dampening=0.1, trust_coefficient=0.02, **common)
    if rule == "rmsprop":
        return Hyper(lr=1e-3, beta1=0.0, beta2=0.0, smoothing=0.99, **common)
    if rule == "adagrad":
        return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, lr_decay=0.01, **common)
    if rule == "ademamix":  # alpha and beta3 as if scheduled
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999 - 0.01 / step, alpha=min(5.0, 0.5 * step), **common)
    if rule == "lamb":  # L2 decay on odd steps, decoupled on even ones; no bias correction on some; a norm cap
        common.update(decoupled=step % 2 == 0)
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, bias_correction=step % 5 != 0, max_unorm=0.05 if step > 10 else 0.0, **common)
    raise ValueError(rule)


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


@pytest.mark.parametrize("rule,layout,path", PATH_CASES, ids=[f"{r}-{lay}-{p}" for r, lay, p in PATH_CASES], indirect=["path"])
def test_the_other_paths_are_bit_identical_too(rule, layout, path):
    check_steps(rule, 65537, torch.float32, layout, skip=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", sorted(reference.TRUST_RATIOS))
def test_trust_ratio_is_the_references_with_any_thread_count(rule, layout, dtype):
    """The fused pass's ratio against the reference's (skipped blocks left out, a NaN and
    an Inf in the parameter too), bit for bit the same with 1, 2 or 3 tasks."""
    n = 3 * 65536 + 1000
    p, slots = make_state(rule, n, dtype, layout)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 4):
        g = gradient(n, dtype, step, gen, nonfinite=False)
        g[[5, 70_000, n - 1]] = float("nan")
        if step == 3:
            p[[5, 6]] = torch.tensor([float("inf"), float("nan")], dtype=dtype)  # in a skipped block: p * 0 is NaN
        hp = hyper(rule, step)
        for skip in (True, False):
            ours = kernel_ratio(rule, p, g, slots, hp, skip, 1)
            assert same_ratio(ours, REFERENCE_RATIO(rule, p, g, slots, hp, skip))
            assert all(kernel_ratio(rule, p, g, slots, hp, skip, tasks) == ours for tasks in (2, 3))
        cpu.update(rule, p, g, slots, hp, True)


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


def test_the_math_table_covers_every_rule():
    """One math function and marker per name of kernels.rules.MATHS; every rule finds its own."""
    assert set(cpu_rules.MARKERS) == set(rule_table.MATHS)
    for rule, spec in rule_table.RULES.items():
        assert cpu_rules.marker_of(rule).states == spec.states <= cpu_rules.KERNEL_STATES
