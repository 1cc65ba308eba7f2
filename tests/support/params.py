"""Parameters and gradients to test with."""

import torch

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
