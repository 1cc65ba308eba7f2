"""Shared helpers of the optimizer tests."""

import contextlib
import io

import torch

import qoptim.functional as F

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# 2-D shapes with a partial last 256-block, exactly whole blocks, and one below min_8bit_size
SHAPES = [(64, 81), (32, 256), (17, 33)]


def make_params(shape, dtype, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype)) for _ in range(n)]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def gradients(shape, steps, seed=1, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(steps)]


def dequantized(state, i):
    """fp32 values of state{i} of one parameter, whatever its layout."""
    values = state[f"state{i}"]
    if values.dtype != torch.uint8:
        return values.float()
    if f"absmax{i}" in state:
        return F.dequantize_blockwise(values, absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256)
    return state[f"qmap{i}"][values.long()] * state[f"max{i}"]


def round_trip(obj):
    """torch.save then torch.load(weights_only=True), as a checkpoint would."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the floating point numbers at each element of x, in x's dtype, as fp32."""
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).float().abs()


@contextlib.contextmanager
def exact_sqrt():
    """torch's ``sqrt`` / ``sqrt_`` correctly rounded (through float64, exact for float32), for
    the reference's fp32 math: torch's CPU float32 sqrt is one ulp off for some inputs, while the
    fused kernels' is correctly rounded, so bit-for-bit comparisons patch the reference's."""
    plain, plain_ = torch.Tensor.sqrt, torch.Tensor.sqrt_
    torch.Tensor.sqrt = lambda self: plain(self.double()).to(self.dtype)
    torch.Tensor.sqrt_ = lambda self: self.copy_(plain(self.double()))
    try:
        yield
    finally:
        torch.Tensor.sqrt, torch.Tensor.sqrt_ = plain, plain_
