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
from qoptim.kernels.triton.trust import ratio_kernel  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def block_kernel_signature(layout: int, param_dtype: str, constants: dict) -> dict:
    signature = {name: "fp32" for name in block_kernel.arg_names}  # the scalars
    signature.update(p_ptr=f"*{param_dtype}", g_ptr=f"*{param_dtype}", skipped_ptr="*i64", n="i32", n_blocks="i32")
    signature.update(table_ptr="*i64", owner_ptr="*i64")
    for i in range(rules.MAX_STATES):
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
def test_compiles_for_sm90_with_exact_float_ops(rule, layout, param_dtype, pass_, batched):
    """No contracted multiply-adds, no approximate division or square root. A batch reads its
    pointers from the table and counts skipped blocks per tensor in int64."""
    spec = rules.RULES[rule]
    constants = dict(RULE=MATH_SWITCH[spec.math], N_STATES=spec.states, LAYOUT=layout, PASS=pass_,
                     NEVER_NEGATIVE=never_negative_mask(spec), DECAY=1 + (pass_ == 2),
                     TRUST=spec.trust, NESTEROV=True, FIRST_STEP=False, SCALE_GRAD=True, SKIP=True,
                     PARAM_BF16=param_dtype == "bf16", ROWS=4, BLOCK_SIZE=BLOCK, BATCHED=batched)  # fmt: skip
    source = ASTSource(block_kernel, block_kernel_signature(layout, param_dtype, constants), constexprs=constants)
    kernel = triton.compile(source, target=SM90, options={"enable_fp_fusion": False, "num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert "fma.rn" not in ptx and ".approx" not in ptx and len(kernel.asm["cubin"]) > 0
    if pass_ == 0 and layout != 0:  # the quantizer's reciprocal of the scale
        assert "div.rn.f32" in ptx
    if pass_ == 0 and rule in ("adam", "ademamix", "rmsprop", "adagrad", "lamb"):
        assert "sqrt.rn.f32" in ptx
    if pass_ == 0:
        assert "atom.global.gpu.acq_rel.add.u64" in ptx or "red.global.gpu.add.u64" in ptx  # the int64 skip counter


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
