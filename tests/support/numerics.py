"""Floating-point helpers."""

import contextlib

import torch


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
