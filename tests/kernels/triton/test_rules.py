"""The Triton (CUDA) kernels against the reference, run by Triton's interpreter on CPU tensors.

The interpreter must be chosen before ``triton`` is first imported in a process (``triton.jit``
decides then, for Triton's own library functions too), and a process that runs real GPU
kernels cannot also interpret. So this file has two faces:

  * in a normal pytest run (``TRITON_INTERPRET`` unset) it holds ``test_interpreted``, which
    runs this same file again in child pytest processes with ``TRITON_INTERPRET=1``, in groups
    that xdist can spread over workers; and it compiles the kernels for sm_90 (no GPU needed)
    and checks their PTX;
  * in such a child it holds the real cases.

What must agree, step by step (each step starts both sides from the reference's state): every
bit of the parameters, of the 8-bit codes and block scales, and of the fp32 states, for every
rule, layout and parameter dtype. The reference gets a correctly rounded square root here (as
in test_cpu_kernel_families.py): torch's fp32 ``sqrt`` on the CPU (vectorized, Sleef) is not
correctly rounded for ~15% of inputs, while the kernels' ``sqrt_rn`` is (as numpy under the
interpreter, and CUDA, are). Without the patch parameters differ by an ulp of the update here
and there.

The one thing not bit for bit is the trust ratio of LAMB and LARS, whose float64 sums the kernel
adds in another order than the reference: it is checked on its own to a relative 1e-12, and the
steps of those rules are checked bit for bit given the reference's ratio.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import exact_sqrt

from qoptim.kernels import rules as rule_table
from qoptim.kernels.types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot
from qoptim.quant.maps import signed_map, unsigned_map

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

RULES = ("adam", "ademamix", "lion", "momentum", "lars", "rmsprop", "adagrad", "lamb")
TRUST_RULES = ("lamb", "lars")
LAYOUTS = ("blockwise", "whole_tensor", "fp32")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (1, 255, 257, 4099)  # odd sizes: a partial block, one past a block, many blocks and a partial one
STEPS = 5

# Non-negative states take the unsigned map, as the optimizer classes do.
UNSIGNED = {"adam": (1,), "rmsprop": (0,), "adagrad": (0,), "ademamix": (2,), "lamb": (1,)}

# -k expressions of the child runs: about a third of the work each
GROUPS = {"blockwise": "blockwise", "whole_tensor": "whole_tensor", "rest": "not blockwise and not whole_tensor"}

if INTERPRETING:
    pytest.importorskip("triton")
    from qoptim.kernels import reference
    from qoptim.kernels import triton as tk

    assert tk.INTERPRETED, "triton was imported before TRITON_INTERPRET was set"
    pytestmark = [  # numpy, inside the interpreter, on NaN / Inf lanes: expected
        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    ]


def run_interpreted(test_file: str, expression: str | None = None) -> None:
    """The cases of ``test_file`` (those ``-k expression`` picks) in a child pytest process that
    interprets Triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'qoptim[cuda]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", test_file]
    command += ["-k", expression] if expression else []
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-2000:]
    assert " passed" in child.stdout


@pytest.mark.parametrize("group", GROUPS)
def interpreted(group):
    """This file's cases in a child pytest process that interprets Triton."""
    run_interpreted(__file__, GROUPS[group])


# ---- the cases ------------------------------------------------------------------------


def fresh(rule: str, n: int, layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[StateSlot]]:
    """A parameter and zero states of ``rule`` in ``layout``."""
    p = (torch.randn(n) * 0.1).to(dtype)
    count = rule_table.RULES[rule].states
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n)) for _ in range(count)]
    blocksize, scales = (BLOCK, math.ceil(n / BLOCK)) if layout == "blockwise" else (WHOLE_TENSOR, 1)
    slots = []
    for i in range(count):
        code = unsigned_map() if i in UNSIGNED.get(rule, ()) else signed_map()
        zero = int(torch.searchsorted(code, torch.tensor(0.0)))  # the code of 0.0
        slots.append(StateSlot(torch.full((n,), zero, dtype=torch.uint8), code, torch.zeros(scales), blocksize))
    return p, slots


def copy(p: torch.Tensor, slots: list[StateSlot]) -> tuple[torch.Tensor, list[StateSlot]]:
    cloned = [StateSlot(s.values.clone(), s.code, None if s.absmax is None else s.absmax.clone(), s.blocksize) for s in slots]
    return p.clone(), cloned


def gradient(n: int, dtype: torch.dtype, step: int) -> torch.Tensor:
    """Small random values; on steps 2, 3 and 5 a NaN, an Inf or a -Inf, and on step 5 also a NaN
    three blocks further, at places that move from step to step."""
    g = torch.randn(n) * 0.01
    if step in (2, 3, 5):
        g[(step * 37) % n] = (math.nan, math.inf, -math.inf)[step % 3]
    if step == 5:
        g[(step * 37 + 3 * BLOCK) % n] = math.nan
    return g.to(dtype)


def hyper(rule: str, step: int) -> Hyper:
    """Each rule's hyperparameters for a step, with its options switched on and off from step to
    step: no weight decay on step 4, percentile clipping's gradient scale on step 3."""
    common = dict(step=step, eps=1e-8, weight_decay=0.0 if step == 4 else 0.05, decoupled=True,
                  gnorm_scale=0.37 if step == 3 else 1.0)  # fmt: skip
    if rule == "adam":  # AdamW on odd steps, Adam's L2 decay on even ones
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, **{**common, "decoupled": step % 2 == 1})
    if rule == "ademamix":  # beta3 and alpha as if scheduled
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999 - 0.01 / step, alpha=min(5.0, 1.5 * step), **common)
    if rule == "lion":
        return Hyper(lr=1e-4, beta1=0.9, beta2=0.99, **common)
    if rule == "momentum":  # SGD: dampening on odd steps (the first step must ignore it), Nesterov on even ones
        return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, momentum=0.9, nesterov=step % 2 == 0, dampening=0.1 if step % 2 else 0.0, **common)
    if rule == "lars":  # dampening, and a trust coefficient
        return Hyper(lr=1e-1, beta1=0.0, beta2=0.0, momentum=0.9, dampening=0.1, nesterov=step == 5, trust_coefficient=0.02, **common)
    if rule == "rmsprop":
        return Hyper(lr=1e-3, beta1=0.0, beta2=0.0, smoothing=0.99, **common)
    if rule == "adagrad":
        return Hyper(lr=1e-2, beta1=0.0, beta2=0.0, lr_decay=0.01, **common)
    if rule == "lamb":  # decoupled decay on odd steps; no bias correction on step 2; a cap that binds on 3 and 5
        caps = {3: 0.05, 4: 10.0, 5: 0.05}
        return Hyper(lr=1e-3, beta1=0.9, beta2=0.999, bias_correction=step != 2, max_unorm=caps.get(step, 0.0),
                     **{**common, "decoupled": step % 2 == 1})  # fmt: skip
    raise ValueError(rule)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Bit for bit (so -0.0 is not 0.0), except that any NaN equals any NaN."""
    if not ours.is_floating_point():
        assert torch.equal(ours, theirs)
        return
    nan = ours.isnan()
    assert torch.equal(nan, theirs.isnan())
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[ours.element_size()]
    ours, theirs = ours[~nan], theirs[~nan]
    different = ours.view(bits) != theirs.view(bits)
    assert not bool(different.any()), f"{int(different.sum())} differ, e.g. {ours[different][:3]} vs {theirs[different][:3]}"


def reference_trust_ratio(step: tk._Step) -> tk.TrustRatio:
    """``_Step.trust_ratio`` as the reference computes it (to check the steps bit for bit given the ratio)."""
    ratio = reference._trust_ratio(step.rule, step.p, step.g, step.slots, step.hp, step.skip_nonfinite)
    factor = step.hp.lr * ratio if step.rule == "lamb" else ratio
    return tk.TrustRatio(torch.tensor([ratio], dtype=torch.float64), torch.tensor([factor], dtype=torch.float32))


def check_steps(rule: str, n: int, layout: str, dtype: torch.dtype, skip_nonfinite: bool) -> None:
    """STEPS steps of the kernel and of the reference, each from the reference's state."""
    p_ref, slots_ref = fresh(rule, n, layout, dtype)
    for step in range(1, STEPS + 1):
        g, hp = gradient(n, dtype, step), hyper(rule, step)
        p, slots = copy(p_ref, slots_ref)
        skipped = tk.update(rule, p, g, slots, hp, skip_nonfinite).skipped_blocks
        expected = reference.update(rule, p_ref, g, slots_ref, hp, skip_nonfinite).skipped_blocks
        assert int(skipped) == expected, f"step {step}"
        assert_same(p, p_ref)
        for ours, theirs in zip(slots, slots_ref):
            assert_same(ours.values, theirs.values)
            if ours.quantized:
                assert_same(ours.absmax, theirs.absmax)
        if skip_nonfinite and step == 5 and n > 4 * BLOCK:
            assert expected == 2


@pytest.fixture
def oracle(monkeypatch):
    """The reference with an exact sqrt, and its trust ratio in the kernels' steps."""
    monkeypatch.setattr(tk._Step, "trust_ratio", reference_trust_ratio)
    with exact_sqrt():
        yield


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES)
def every_rule_matches_reference(oracle, rule, layout, dtype):
    """Skipping blocks with NaN / Inf gradients: same skipped-block count and bits, every step."""
    for n in SIZES:
        check_steps(rule, n, layout, dtype, skip_nonfinite=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES)
def nonfinite_gradients_propagate_as_in_reference(oracle, rule, layout):
    """Without skipping, NaN and Inf flow into parameters, states and scales as in the reference."""
    check_steps(rule, 1000, layout, torch.float32, skip_nonfinite=False)


@pytest.mark.parametrize("skip_nonfinite", [True, False], ids=["skip", "propagate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", TRUST_RULES)
def trust_ratio_matches_reference(rule, layout, skip_nonfinite):
    """The device-side ratio to a relative 1e-12 (its float64 sums add in another order), its
    float32 factor to an ulp; over a run with the kernels' own ratio, in bf16."""
    with exact_sqrt():
        for n in (1, 257, 4099):
            p, slots = fresh(rule, n, layout, torch.bfloat16)
            for step in range(1, STEPS + 1):
                g, hp = gradient(n, torch.bfloat16, step), hyper(rule, step)
                expected = reference._trust_ratio(rule, p, g, slots, hp, skip_nonfinite)
                got = tk.trust_ratio(rule, p, g, slots, hp, skip_nonfinite)
                assert got.ratio.dtype == torch.float64 and got.factor.dtype == torch.float32
                assert float(got.ratio) == pytest.approx(expected, rel=1e-12, abs=0), f"n {n}, step {step}"
                factor = hp.lr * expected if rule == "lamb" else expected
                assert float(got.factor) == pytest.approx(factor, rel=2**-23, abs=0)
                tk.update(rule, p, g, slots, hp, skip_nonfinite)


def lamb_cap_binds():
    """A ratio above max_unorm is cut to it (the test above would pass with no cap at all if
    the cap never bound)."""
    p, slots = fresh("lamb", 300, "fp32", torch.float32)
    g = torch.randn(300) * 0.01
    uncapped = float(tk.trust_ratio("lamb", p, g, slots, hyper("lamb", 1)).ratio)
    assert uncapped > 0.05
    capped = hyper("lamb", 1)._replace(max_unorm=0.05)
    assert float(tk.trust_ratio("lamb", p, g, slots, capped).ratio) == 0.05


@pytest.mark.parametrize("rule", ["adam", "lion", "ademamix"])
def skipped_block_keeps_its_bytes(rule):
    n = 4 * BLOCK
    p, slots = fresh(rule, n, "blockwise", torch.float32)
    tk.update(rule, p, torch.randn(n) * 0.01, slots, hyper(rule, 1))  # non-trivial states
    before_p, before = copy(p, slots)
    g = torch.randn(n) * 0.01
    g[BLOCK + 5] = math.inf
    assert tk.update(rule, p, g, slots, hyper(rule, 2)).skipped_blocks == 1
    kept = slice(BLOCK, 2 * BLOCK)
    assert torch.equal(p[kept], before_p[kept]) and not torch.equal(p[:BLOCK], before_p[:BLOCK])
    for s, b in zip(slots, before):
        assert torch.equal(s.values[kept], b.values[kept]) and s.absmax[1] == b.absmax[1]


def supports_every_rule_in_one_layout():
    p = torch.zeros(300)
    blockwise = StateSlot(torch.zeros(300, dtype=torch.uint8), signed_map(), torch.zeros(2))
    for rule in RULES:
        count = rule_table.RULES[rule].states
        assert tk.supports(rule, p, [blockwise] * count)
        assert tk.supports(rule, p.bfloat16(), [StateSlot(torch.zeros(300))] * count)
        assert not tk.supports(rule, p, [blockwise] * (count + 1))  # a state too many
    assert not tk.supports("no-such-rule", p, [blockwise])
    assert not tk.supports("adam", p.double(), [blockwise] * 2)
    assert not tk.supports("adam", p, [blockwise, StateSlot(torch.zeros(300))])  # mixed layouts
    blocks_of_128 = StateSlot(torch.zeros(300, dtype=torch.uint8), signed_map(), torch.zeros(3), 128)
    assert not tk.supports("adam", p, [blocks_of_128] * 2)
    with pytest.raises(ValueError):
        tk.trust_ratio("adam", p, p, [blockwise] * 2, hyper("adam", 1))


def search_table_is_built_once_per_map():
    from qoptim.kernels.triton_block import search_table

    code = signed_map().clone()
    table = search_table(code)
    assert search_table(code) is table
    assert torch.equal(table[:255], (code[:-1] + code[1:]) * 0.5) and table[255] == math.inf
    code[0] = -0.99  # changed in place: a new table
    rebuilt = search_table(code)
    assert rebuilt is not table and rebuilt[0] == (code[0] + code[1]) * 0.5


# Each family's 8-bit optimizer class (the weights 8-bit, the biases below min_8bit_size 32-bit);
# the whole-tensor layout on some.
OPTIMIZER_RUNS = {
    "AdamW8bit": dict(block_wise=False),
    "AdEMAMix8bit": dict(weight_decay=0.01),
    "Lion8bit": dict(lr=1e-4, weight_decay=0.01),
    "SGD8bit": dict(lr=1e-2, momentum=0.9, nesterov=True),
    "LARS8bit": dict(lr=1e-1, momentum=0.9, weight_decay=1e-4),
    "RMSprop8bit": dict(block_wise=False),
    "Adagrad8bit": dict(lr=1e-2),
    "LAMB8bit": dict(weight_decay=0.01),
}


def count_calls(monkeypatch, module, name: str) -> list[tuple]:
    """The arguments of every call of ``module.name`` from now on (which still does its work)."""
    plain, calls = getattr(module, name), []

    def counted(*args):
        calls.append(args)
        return plain(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


def _train(name: str, settings: dict, backend: str, monkeypatch) -> torch.nn.Module:
    import qoptim

    monkeypatch.setenv("QOPTIM_BACKEND", backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = getattr(qoptim.optim, name)(model.parameters(), **{"lr": 1e-3, "min_8bit_size": 1000, **settings})
    x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
    for _ in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("name", OPTIMIZER_RUNS)
def optimizers_train_through_the_kernels_as_through_the_reference(monkeypatch, name):
    """The optimizer classes on the Triton backend (registered for CPU tensors here), with their
    own state layouts (AdEMAMix's stacked momenta, the whole-tensor scales), bit for bit. LAMB and
    LARS run on the kernels' own trust ratio here: its float32 factor rounds as the reference's
    does (but for a ratio within ~1e-15 of a rounding boundary, which these runs do not meet).
    The three tensors with 32-bit states (below min_8bit_size) go in one batched launch, but
    for LAMB's and LARS's."""
    from qoptim import kernels
    from qoptim.kernels import triton_batch

    monkeypatch.setitem(kernels._FUSED, "cpu", "qoptim.kernels.triton")
    monkeypatch.delitem(kernels._loaded, "cpu", raising=False)
    single, batched = count_calls(monkeypatch, tk, "update"), count_calls(monkeypatch, triton_batch, "run")
    with exact_sqrt():
        ours = _train(name, OPTIMIZER_RUNS[name], "auto", monkeypatch)
        theirs = _train(name, OPTIMIZER_RUNS[name], "reference", monkeypatch)
    batched_jobs = [len(call[0]) for call in batched]
    assert len(single) + sum(batched_jobs) == 4 * STEPS  # every parameter, every step, through the kernels
    assert batched_jobs == ([] if name in ("LAMB8bit", "LARS8bit") else [3] * STEPS)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert_same(a.detach(), b.detach())


# ---- compiled (not interpreted): the GPU code itself, built for sm_90 without a GPU -----------


def _block_kernel_signature(kernel, layout: int, param_dtype: str, constants: dict) -> dict:
    signature = {name: "fp32" for name in kernel.arg_names}  # the scalars
    signature.update(p_ptr=f"*{param_dtype}", g_ptr=f"*{param_dtype}", skipped_ptr="*i64", n="i32", n_blocks="i32")
    signature.update(table_ptr="*i64", owner_ptr="*i64")
    for i in range(3):
        signature[f"s{i}_ptr"] = "*fp32" if layout == 0 else "*u8"
        signature.update({f"{a}{i}_ptr": "*fp32" for a in ("code", "mids", "absmax")})
    signature.update(new_scales_ptr="*fp32", peaks_ptr="*fp32", sums_ptr="*fp64", trust_ptr="*fp32")
    signature.update({name: "constexpr" for name in constants})
    return signature


# (rule, layout, param dtype, pass, batched): every rule's step, the measuring passes, batches
COMPILED = [(rule, 1, "bf16", 0, False) for rule in RULES] + [("adam", 0, "fp32", 0, False), ("ademamix", 2, "fp16", 0, False),
            ("ademamix", 2, "fp32", 1, False), ("lars", 2, "fp16", 2, False), ("lamb", 0, "fp32", 2, False),
            ("adam", 1, "bf16", 0, True), ("ademamix", 0, "fp16", 0, True), ("lion", 1, "fp32", 0, True)]  # fmt: skip


@pytest.mark.parametrize("rule, layout, param_dtype, pass_, batched", COMPILED)
def compiles_for_sm90_with_exact_float_ops(rule, layout, param_dtype, pass_, batched):
    """The kernels lower to PTX and a cubin (Triton bundles ptxas), and the PTX keeps torch's
    float semantics: no contracted multiply-adds, no approximate division or square root. A
    batch reads its pointers from the table and counts skipped blocks per tensor in int64."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qoptim.kernels.triton_block import block_kernel
    from qoptim.kernels.triton_rules import FAMILIES

    family = FAMILIES[rule]
    constants = dict(RULE=family.rule, N_STATES=family.states, LAYOUT=layout, PASS=pass_, DECAY=1 + (pass_ == 2),
                     TRUST=family.trust, NESTEROV=True, FIRST_STEP=False, SCALE_GRAD=True, SKIP=True,
                     PARAM_BF16=param_dtype == "bf16", ROWS=4, BLOCK_SIZE=BLOCK, BATCHED=batched)  # fmt: skip
    source = ASTSource(block_kernel, _block_kernel_signature(block_kernel, layout, param_dtype, constants), constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert "fma.rn" not in ptx and ".approx" not in ptx and len(kernel.asm["cubin"]) > 0
    if pass_ == 0 and layout != 0:  # the quantizer's reciprocal of the scale
        assert "div.rn.f32" in ptx
    if pass_ == 0 and rule in ("adam", "ademamix", "rmsprop", "adagrad", "lamb"):
        assert "sqrt.rn.f32" in ptx
    if pass_ == 0:
        assert "atom.global.gpu.acq_rel.add.u64" in ptx or "red.global.gpu.add.u64" in ptx  # the int64 skip counter


@pytest.mark.parametrize("rule", TRUST_RULES)
def ratio_kernel_compiles_with_exact_float64_ops(rule):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qoptim.kernels.triton_rules import FAMILIES
    from qoptim.kernels.triton_trust import _ratio_kernel

    signature = dict(
        sums_ptr="*fp64",
        ratio_ptr="*fp64",
        factor_ptr="*fp32",
        lr="fp64",
        weight_decay="fp64",
        max_unorm="fp64",
        RULE="constexpr",
    )
    source = ASTSource(_ratio_kernel, signature, constexprs={"RULE": FAMILIES[rule].rule})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": 1}).asm["ptx"]
    assert "sqrt.rn.f64" in ptx and "div.rn.f64" in ptx and "cvt.rn.f32.f64" in ptx
    assert "fma" not in ptx and ".approx" not in ptx


# Which face this file shows to pytest (see the module docstring).
if INTERPRETING:
    test_every_rule_matches_reference = every_rule_matches_reference
    test_nonfinite_gradients_propagate_as_in_reference = nonfinite_gradients_propagate_as_in_reference
    test_trust_ratio_matches_reference = trust_ratio_matches_reference
    test_lamb_cap_binds = lamb_cap_binds
    test_skipped_block_keeps_its_bytes = skipped_block_keeps_its_bytes
    test_supports_every_rule_in_one_layout = supports_every_rule_in_one_layout
    test_search_table_is_built_once_per_map = search_table_is_built_once_per_map
    test_optimizers_train_through_the_kernels_as_through_the_reference = (
        optimizers_train_through_the_kernels_as_through_the_reference
    )
else:
    test_interpreted = interpreted
    test_compiles_for_sm90_with_exact_float_ops = compiles_for_sm90_with_exact_float_ops
    test_ratio_kernel_compiles_with_exact_float64_ops = ratio_kernel_compiles_with_exact_float64_ops
