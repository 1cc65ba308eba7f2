"""The Triton kernels compiled (not interpreted) for sm_90, without a GPU: they lower to PTX and a
cubin (Triton bundles ptxas), and the PTX keeps torch's float semantics. Runs in the plain pytest
pass: the interpreter must be off here (a process that interprets cannot also compile).
"""

from __future__ import annotations

import pytest
from support import INTERPRETING, RULES, TRUST_RULES

from qoptim.kernels import rules
from qoptim.kernels.types import BLOCK

pytestmark = pytest.mark.skipif(INTERPRETING, reason="compiles for the GPU: not under TRITON_INTERPRET")
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402  (after the skip: triton is optional)
from triton.compiler import ASTSource  # noqa: E402

from qoptim.kernels.triton.block import block_kernel  # noqa: E402
from qoptim.kernels.triton.launch import never_negative_mask  # noqa: E402
from qoptim.kernels.triton.rules import MATH_SWITCH  # noqa: E402
from qoptim.kernels.triton.states import BLOCKWISE_4BIT, BLOCKWISE_8BIT  # noqa: E402
from qoptim.kernels.triton.trust import ratio_kernel  # noqa: E402
from qoptim.kernels.triton.weights import MASTER_24, MASTER_32, NEAREST_WEIGHTS, STOCHASTIC_WEIGHTS  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


# The correction's pointer type of each weight format (the others get a placeholder: the parameter).
CORRECTION_TYPES = {MASTER_24.value: "*i8", MASTER_32.value: "*i16"}


def block_kernel_signature(layout: int, param_dtype: str, constants: dict, draw_key: str = "i32") -> dict:
    """``draw_key``: the launcher's type of the key, by its value: i32 below 2**31, u32 above."""
    signature = {name: "fp32" for name in block_kernel.arg_names}  # the scalars
    signature.update(p_ptr=f"*{param_dtype}", g_ptr=f"*{param_dtype}", skipped_ptr="*i64", n="i32", n_blocks="i32")
    signature.update(c_ptr=CORRECTION_TYPES.get(constants["WEIGHTS"], f"*{param_dtype}"), draw_key=draw_key, draw_first="i32")
    signature.update(state_key=draw_key, state_first="i32")
    signature.update(table_ptr="*i64", owner_ptr="*i64")
    for i in range(rules.MAX_STATES):
        signature[f"s{i}_ptr"] = "*fp32" if layout == 0 else "*u8"
        signature.update({f"{a}{i}_ptr": "*fp32" for a in ("code", "rounding", "absmax")})
    signature.update(new_scales_ptr="*fp32", peaks_ptr="*fp32", sums_ptr="*fp64", trust_ptr="*fp32")
    signature.update({name: "constexpr" for name in constants})
    return signature


# (rule, layout, param dtype, pass, batched): every rule's step, the measuring passes, batches;
# 4-bit states: two-state and one-state rules, LAMB's norms pass (it reads the moments), a batch
COMPILED = [(rule, 1, "bf16", 0, False) for rule in RULES] + [("adam", 0, "fp32", 0, False), ("ademamix", 2, "fp16", 0, False),
            ("ademamix", 2, "fp32", 1, False), ("lars", 2, "fp16", 2, False), ("lamb", 0, "fp32", 2, False),
            ("adam", 1, "bf16", 0, True), ("ademamix", 0, "fp16", 0, True), ("lion", 1, "fp32", 0, True),
            ("adam", BLOCKWISE_4BIT.value, "bf16", 0, False), ("lion", BLOCKWISE_4BIT.value, "fp16", 0, False),
            ("lamb", BLOCKWISE_4BIT.value, "fp32", 2, False), ("lamb", BLOCKWISE_4BIT.value, "fp32", 0, False),
            ("rmsprop", BLOCKWISE_4BIT.value, "bf16", 0, True)]  # fmt: skip


ROWS, NUM_WARPS = 4, 4  # launch.rows_per_program and launch.LAUNCH_OPTIONS on the GPU


def compile_block_kernel(rule, layout, param_dtype, pass_, batched, weights=NEAREST_WEIGHTS.value, draw_key="i32", stochastic=0):
    """The block kernel's sm_90 compile of these switches (``stochastic``: its ``STOCHASTIC_STATES``)."""
    spec = rules.RULES[rule]
    constants = dict(RULE=MATH_SWITCH[spec.math], N_STATES=spec.states, LAYOUT=layout, PASS=pass_,
                     NEVER_NEGATIVE=never_negative_mask(spec), STOCHASTIC_STATES=stochastic, DECAY=1 + (pass_ == 2),
                     TRUST=spec.trust, NESTEROV=True, FIRST_STEP=False, SCALE_GRAD=True, SKIP=True, WEIGHTS=weights,
                     PARAM_BF16=param_dtype == "bf16", ROWS=ROWS, BLOCK_SIZE=BLOCK, BATCHED=batched)  # fmt: skip
    source = ASTSource(block_kernel, block_kernel_signature(layout, param_dtype, constants, draw_key), constexprs=constants)
    return triton.compile(source, target=SM90, options={"enable_fp_fusion": False, "num_warps": NUM_WARPS})


def assert_exact_float_ops(ptx: str) -> None:
    """No contracted multiply-add, no approximate op, no flush of subnormals to zero."""
    assert "fma.rn" not in ptx and ".approx" not in ptx and ".ftz" not in ptx


@pytest.mark.parametrize("rule, layout, param_dtype, pass_, batched", COMPILED)
def test_compiles_for_sm90_with_exact_float_ops(rule, layout, param_dtype, pass_, batched):
    """No contracted multiply-adds, no approximate division or square root. A batch reads its
    pointers from the table and counts skipped blocks per tensor in int64."""
    kernel = compile_block_kernel(rule, layout, param_dtype, pass_, batched)
    ptx = kernel.asm["ptx"]
    assert_exact_float_ops(ptx)
    assert len(kernel.asm["cubin"]) > 0
    if pass_ == 0 and layout != 0:  # the quantizer's reciprocal of the scale
        assert "div.rn.f32" in ptx
    if pass_ == 0 and rule in ("adam", "ademamix", "rmsprop", "adagrad", "lamb"):
        assert "sqrt.rn.f32" in ptx
    if pass_ == 0:
        assert "atom.global.gpu.acq_rel.add.u64" in ptx or "red.global.gpu.add.u64" in ptx  # the int64 skip counter
    if pass_ == 0 and layout == BLOCKWISE_4BIT.value:  # the byte both states share: read once, written once
        elements_per_thread = ROWS * BLOCK // (32 * NUM_WARPS)
        assert 0 < ptx.count("ld.global.b8") <= elements_per_thread and 0 < ptx.count("st.global.b8") <= elements_per_thread


@pytest.mark.parametrize("rule", TRUST_RULES)
def test_ratio_kernel_compiles_with_exact_float64_ops(rule):
    signature = dict(
        sums_ptr="*fp64",
        ratio_ptr="*fp64",
        factor_ptr="*fp32",
        lr="fp64",
        weight_decay="fp64",
        coefficient="fp64",
        RULE="constexpr",
    )
    source = ASTSource(ratio_kernel, signature, constexprs={"RULE": MATH_SWITCH[rules.RULES[rule].math]})
    ptx = triton.compile(source, target=SM90, options={"enable_fp_fusion": False, "num_warps": 1}).asm["ptx"]
    assert "sqrt.rn.f64" in ptx and "div.rn.f64" in ptx and "cvt.rn.f32.f64" in ptx
    assert "fma" not in ptx and ".approx" not in ptx


WEIGHT_SWITCHES = {"master24": MASTER_24, "master32": MASTER_32, "stochastic": STOCHASTIC_WEIGHTS}

# (weight format, param dtype, rule, layout, pass, batched, the key's type): each format on both
# 16-bit dtypes, in a step, the measuring passes (they read the decoded master) and a batch
WEIGHTED = [(weights, dtype, "adam", 1, 0, False, "i32") for weights in WEIGHT_SWITCHES for dtype in ("bf16", "fp16")] + [
            ("stochastic", "bf16", "lion", 0, 0, False, "u32"), ("master24", "fp16", "ademamix", 2, 1, False, "i32"),
            ("master32", "bf16", "lamb", 0, 2, False, "i32"), ("master32", "fp16", "lars", 1, 2, False, "i32"),
            ("master24", "bf16", "momentum", 1, 0, True, "i32"),
            ("stochastic", "fp16", "rmsprop", 0, 0, True, "i32"),
            ("master24", "bf16", "adam", BLOCKWISE_4BIT.value, 0, False, "i32"),
            ("stochastic", "fp16", "adagrad", BLOCKWISE_4BIT.value, 0, True, "u32")]  # fmt: skip


@pytest.mark.parametrize("name, param_dtype, rule, layout, pass_, batched, draw_key", WEIGHTED)
def test_weight_formats_compile_with_exact_ops(name, param_dtype, rule, layout, pass_, batched, draw_key):
    """Decoding, encoding and stochastic rounding: exact conversions and powers of two, no
    contraction, no approximate op; the hash in 32-bit integer multiplies."""
    weights = WEIGHT_SWITCHES[name]
    kernel = compile_block_kernel(rule, layout, param_dtype, pass_, batched, weights.value, draw_key)
    ptx = kernel.asm["ptx"]
    assert_exact_float_ops(ptx)
    assert len(kernel.asm["cubin"]) > 0
    assert "ex2" not in ptx and "lg2" not in ptx  # powers of two from bits, never exp2
    if pass_ == 0 and weights == STOCHASTIC_WEIGHTS:
        assert "mul.lo.s32" in ptx or "mul.lo.u32" in ptx  # lowbias32's wrapping multiplies
    if pass_ == 0 and param_dtype == "fp16" and weights != STOCHASTIC_WEIGHTS:
        assert "cvt.rzi.s32.f32" in ptx  # the floor of rounding half away from zero (of a magnitude)
    if pass_ == 0 and weights in (MASTER_24, MASTER_32):  # the correction is written
        assert ("st.global.b8" in ptx or "st.global.u8" in ptx) if weights == MASTER_24 else ("st.global.b16" in ptx)


# (layout, rule, param dtype, weight format, batched, STOCHASTIC_STATES): block-wise states rounded
# stochastically, 4-bit and 8-bit: the second moment (with the weight's stochastic rounding too:
# both halves of one hash), every state, a one-state rule's, AdEMAMix's third state, in a batch
STOCHASTIC_STATES = [(BLOCKWISE_4BIT.value, "adam", "bf16", STOCHASTIC_WEIGHTS.value, False, 2),
                     (BLOCKWISE_4BIT.value, "adam", "fp16", MASTER_32.value, False, 3),
                     (BLOCKWISE_4BIT.value, "lion", "fp32", NEAREST_WEIGHTS.value, False, 1),
                     (BLOCKWISE_4BIT.value, "rmsprop", "bf16", STOCHASTIC_WEIGHTS.value, True, 1),
                     (BLOCKWISE_8BIT.value, "adam", "bf16", STOCHASTIC_WEIGHTS.value, False, 2),
                     (BLOCKWISE_8BIT.value, "ademamix", "fp16", MASTER_24.value, False, 4),
                     (BLOCKWISE_8BIT.value, "ademamix", "fp32", NEAREST_WEIGHTS.value, True, 7),
                     (BLOCKWISE_8BIT.value, "lamb", "bf16", MASTER_32.value, False, 2),
                     (BLOCKWISE_8BIT.value, "adagrad", "fp16", STOCHASTIC_WEIGHTS.value, True, 1)]  # fmt: skip


@pytest.mark.parametrize("layout, rule, param_dtype, weights, batched, stochastic", STOCHASTIC_STATES)
def test_stochastic_states_compile_with_exact_ops(layout, rule, param_dtype, weights, batched, stochastic):
    """The stochastic quantizer: ``(u - code[k]) * steps[k]`` a subtract then a multiply, and
    ``u = x * inverse`` then ``u - code[k]`` never contracted, no approximate op; the hash in
    32-bit integer multiplies."""
    kernel = compile_block_kernel(rule, layout, param_dtype, 0, batched, weights, "u32", stochastic)
    ptx = kernel.asm["ptx"]
    assert_exact_float_ops(ptx)
    assert len(kernel.asm["cubin"]) > 0
    assert "mul.lo.s32" in ptx or "mul.lo.u32" in ptx  # lowbias32's wrapping multiplies
