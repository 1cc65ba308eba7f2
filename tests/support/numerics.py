"""Floating-point helpers."""

import torch


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the floating point numbers at each element of x, in x's dtype, as fp32."""
    return (torch.nextafter(x, torch.full_like(x, float("inf"))) - x).float().abs()
