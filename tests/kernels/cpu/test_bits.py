"""The kernels' bf16 / fp16 conversions (qoptim.kernels.cpu.bits) against torch's."""

import numba
import numpy as np
import torch
from support.cpu_states import assert_same

from qoptim.kernels.cpu.bits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16


@numba.njit
def _round_trip(x, bf16, f16, back_bf16, back_f16):
    for i in range(x.size):
        bf16[i] = f32_to_bf16(x[i])
        f16[i] = f32_to_f16(x[i])
    for i in range(1 << 16):
        back_bf16[i] = bf16_to_f32(np.uint16(i))
        back_f16[i] = f16_to_f32(np.uint16(i))


def test_16_bit_conversions_match_torch():
    """float32 -> bf16/fp16 rounds to nearest-even as torch does (NaN stays NaN), and every
    16-bit pattern widens exactly."""
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.integers(0, 2**32, 500_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        (rng.standard_normal(100_000) * 1e-5).astype(np.float32),  # fp16 subnormals
        np.array([65504, 65519.99, 65520, 65536, 6e-8, 3e-8, 2.98e-8, -0.0], dtype=np.float32),
    ])  # fmt: skip
    bf16, f16 = np.empty(x.size, np.int64), np.empty(x.size, np.int64)
    back_bf16, back_f16 = np.empty(1 << 16, np.float32), np.empty(1 << 16, np.float32)
    _round_trip(x, bf16, f16, back_bf16, back_f16)
    for got, dtype in [(bf16, torch.bfloat16), (f16, torch.float16)]:
        expected = torch.from_numpy(x).to(dtype)
        assert_same(torch.from_numpy(got.astype(np.int16)).view(dtype), expected)
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    assert_same(torch.from_numpy(back_bf16), every.view(torch.bfloat16).float())
    assert_same(torch.from_numpy(back_f16), every.view(torch.float16).float())
