"""The Triton (CUDA) kernels against the reference, run by Triton's interpreter on CPU tensors.

The interpreter must be chosen before ``triton`` is first imported in a process (``triton.jit``
decides then, for Triton's own library functions too), and a process that runs real GPU
kernels cannot also interpret. So this file has two faces:

  * in a normal pytest run (``TRITON_INTERPRET`` unset) it holds only ``test_interpreted``,
    which runs this same file again in a child pytest process with ``TRITON_INTERPRET=1``,
    in two groups that xdist can spread over workers;
  * in that child it holds the real cases.

The parent also compiles the kernels for sm_90 (no GPU needed) and checks the PTX.

What must agree, step by step (each step starts both sides from the reference's state):
  * 8-bit codes, block scales and fp32 states: bit-exact. The states never go through a
    square root, and every other float op is the reference's, in its order.
  * parameters: within two ulps of the update, for a small fraction of elements. torch's fp32
    ``sqrt`` on the CPU (vectorized, Sleef) is not correctly rounded (it differs from the exact
    result for ~15% of inputs on AVX512), while the kernel's ``sqrt_rn`` is (as numpy under the
    interpreter, and torch on CUDA, are), so ``denom`` can differ by one ulp. With the
    reference's ``sqrt`` replaced by a correctly rounded one, parameters agree bit for bit too.
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

from qoptim.kernels.types import BLOCK, WHOLE_TENSOR, Hyper, StateSlot
from qoptim.quant.maps import signed_map, unsigned_map

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SIZES = (1, 255, 257, 4097, 20_011)
STEPS = 5
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("blockwise", "whole_tensor", "fp32")
VARIANTS = ("adamw", "adam_l2", "gnorm_scale", "skip", "propagate")

# -k expressions of the child runs: about half of the work each (the two-pass layout is the slowest)
GROUPS = {"whole_tensor": "whole_tensor", "rest": "not whole_tensor"}

if INTERPRETING:
    pytest.importorskip("triton")
    from qoptim.kernels import reference
    from qoptim.kernels import triton as tk

    assert tk.INTERPRETED, "triton was imported before TRITON_INTERPRET was set"
    pytestmark = [  # numpy, inside the interpreter, on NaN / Inf lanes: expected
        pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
        pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    ]


@pytest.mark.parametrize("group", GROUPS)
def interpreted(group):
    """This file's cases in a child pytest process that interprets Triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'qoptim[cuda]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", __file__, "-k", GROUPS[group]]
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert child.returncode == 0, child.stdout[-8000:] + child.stderr[-2000:]
    assert " passed" in child.stdout


def _fresh(n: int, layout: str, dtype: torch.dtype) -> tuple[torch.Tensor, list[StateSlot]]:
    p = (torch.randn(n) * 0.1).to(dtype)
    if layout == "fp32":
        return p, [StateSlot(torch.zeros(n)), StateSlot(torch.zeros(n))]
    blocksize = BLOCK if layout == "blockwise" else WHOLE_TENSOR
    scales = math.ceil(n / BLOCK) if layout == "blockwise" else 1
    zero_code = int(torch.searchsorted(signed_map(), torch.tensor(0.0)))  # 0.0 in the signed map
    return p, [
        StateSlot(torch.full((n,), zero_code, dtype=torch.uint8), signed_map(), torch.zeros(scales), blocksize),
        StateSlot(torch.zeros(n, dtype=torch.uint8), unsigned_map(), torch.zeros(scales), blocksize),
    ]


def _copy(p: torch.Tensor, slots: list[StateSlot]) -> tuple[torch.Tensor, list[StateSlot]]:
    cloned = [StateSlot(s.values.clone(), s.code, None if s.absmax is None else s.absmax.clone(), s.blocksize) for s in slots]
    return p.clone(), cloned


def _gradient(n: int, dtype: torch.dtype, step: int, variant: str) -> torch.Tensor:
    g = torch.randn(n) * 0.01
    if variant in ("skip", "propagate"):
        # a NaN and an Inf three blocks apart, moving from step to step
        g[(step * 37) % n] = math.nan
        g[(step * 37 + 3 * BLOCK) % n] = -math.inf
    return g.to(dtype)


def _hyper(step: int, variant: str) -> Hyper:
    return Hyper(
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0 if variant == "propagate" else 0.01,
        step=step,
        decoupled=variant != "adam_l2",
        gnorm_scale=0.37 if variant == "gnorm_scale" else 1.0,
    )


def _assert_params_close(p: torch.Tensor, expected: torch.Tensor, before: torch.Tensor) -> None:
    """Equal up to two ulps of the update ``x = old - new``, bounded by |old| + |new|: a one-ulp
    change of ``denom`` changes ``x`` by at most about two ulps (after the division and the
    multiply by the step size), and where ``x`` nearly cancels the parameter that is many ulps of
    the result. With 16-bit parameters the result then rounds the same way, or one ulp apart."""
    assert torch.equal(p.isnan(), expected.isnan())
    finite = ~expected.isnan()
    a, b, old = p[finite].float(), expected[finite].float(), before[finite].float().nan_to_num()
    bound = 2 * torch.finfo(p.dtype).eps * (old.abs() + torch.maximum(a.abs(), b.abs()))
    assert bool(((a - b).abs() <= bound).all()), f"max diff {(a - b).abs().max()}"
    assert int((a != b).sum()) <= 4 + a.numel() // 50


def _assert_states_equal(slots: list[StateSlot], expected: list[StateSlot]) -> None:
    for s, e in zip(slots, expected):
        assert torch.allclose(s.values.float(), e.values.float(), rtol=0, atol=0, equal_nan=True)  # bit-exact
        if s.absmax is not None:
            assert torch.allclose(s.absmax, e.absmax, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", LAYOUTS)
def adam_matches_reference(layout, dtype, variant):
    skip_nonfinite = variant != "propagate"
    for n in SIZES:
        p_ref, slots_ref = _fresh(n, layout, dtype)
        for step in range(1, STEPS + 1):
            g = _gradient(n, dtype, step, variant)
            hp = _hyper(step, variant)
            p, slots = _copy(p_ref, slots_ref)
            before = p.clone()
            skipped = tk.update("adam", p, g, slots, hp, skip_nonfinite).skipped_blocks
            expected = reference.update("adam", p_ref, g, slots_ref, hp, skip_nonfinite).skipped_blocks
            assert skipped == expected
            _assert_params_close(p, p_ref, before)
            _assert_states_equal(slots, slots_ref)
        if variant == "skip" and n >= 4 * BLOCK:
            assert expected == 2


def skipped_block_keeps_its_bytes():
    n = 4 * BLOCK
    p, slots = _fresh(n, "blockwise", torch.float32)
    tk.update("adam", p, torch.randn(n) * 0.01, slots, _hyper(1, "adamw"))  # non-trivial states
    before_p, before = _copy(p, slots)
    g = torch.randn(n) * 0.01
    g[BLOCK + 5] = math.inf
    assert tk.update("adam", p, g, slots, _hyper(2, "adamw")).skipped_blocks == 1
    kept = slice(BLOCK, 2 * BLOCK)
    assert torch.equal(p[kept], before_p[kept]) and not torch.equal(p[:BLOCK], before_p[:BLOCK])
    for s, b in zip(slots, before):
        assert torch.equal(s.values[kept], b.values[kept]) and s.absmax[1] == b.absmax[1]


def supports_only_adam_layouts():
    p = torch.zeros(300)
    blockwise = [StateSlot(torch.zeros(300, dtype=torch.uint8), signed_map(), torch.zeros(2)) for _ in range(2)]
    assert tk.supports("adam", p, blockwise)
    assert not tk.supports("lion", p, blockwise[:1])
    assert not tk.supports("adam", p.double(), blockwise)
    assert not tk.supports("adam", p, [blockwise[0], StateSlot(torch.zeros(300))])  # mixed layouts
    blocks_of_128 = StateSlot(torch.zeros(300, dtype=torch.uint8), signed_map(), torch.zeros(3), 128)
    assert not tk.supports("adam", p, [blocks_of_128] * 2)


# ---- compiled (not interpreted): the GPU code itself, built for sm_90 without a GPU -----------


def _kernel_signature(fn, layout: int, param_dtype: str, constants: dict) -> dict:
    signature = {name: "fp32" for name in fn.arg_names}  # the scalars
    signature.update(p_ptr=f"*{param_dtype}", g_ptr=f"*{param_dtype}", skipped_ptr="*i32", n="i32", n_blocks="i32")
    for i in (1, 2):
        signature[f"s{i}_ptr"] = "*fp32" if layout == 0 else "*u8"
        signature.update({f"{a}{i}_ptr": "*fp32" for a in ("code", "mids", "absmax")})
    scratch = "*fp32" if layout == 2 else "*i32"  # what update() passes: new scales / peaks, or the counter
    signature.update(new_scale_ptr=scratch, peaks_ptr=scratch)
    signature.update({name: "constexpr" for name in constants})
    return signature


@pytest.mark.parametrize("layout, param_dtype, peaks_only", [(0, "fp32", False), (1, "bf16", False), (1, "fp16", False),
                                                             (2, "fp32", True), (2, "bf16", False)])  # fmt: skip
def compiles_for_sm90_with_exact_float_ops(layout, param_dtype, peaks_only):
    """The kernels lower to PTX and a cubin (Triton bundles ptxas), and the PTX keeps torch's
    float semantics: no contracted multiply-adds, no approximate division or square root."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qoptim.kernels import triton as compiled

    constants = dict(LAYOUT=layout, L2_DECAY=layout == 0, DECOUPLED_DECAY=layout != 0, SCALE_GRAD=True, SKIP=True,
                     PEAKS_ONLY=peaks_only, PARAM_BF16=param_dtype == "bf16", ROWS=4, BLOCK_SIZE=BLOCK)  # fmt: skip
    signature = _kernel_signature(compiled._adam_kernel, layout, param_dtype, constants)
    source = ASTSource(compiled._adam_kernel, signature, constexprs=constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": 4})
    ptx = kernel.asm["ptx"]
    assert "fma.rn.f32" not in ptx and ".approx" not in ptx and len(kernel.asm["cubin"]) > 0
    if not peaks_only:
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx


# Which face this file shows to pytest (see the module docstring).
if INTERPRETING:
    test_adam_matches_reference = adam_matches_reference
    test_skipped_block_keeps_its_bytes = skipped_block_keeps_its_bytes
    test_supports_only_adam_layouts = supports_only_adam_layouts
else:
    test_interpreted = interpreted
    test_compiles_for_sm90_with_exact_float_ops = compiles_for_sm90_with_exact_float_ops
