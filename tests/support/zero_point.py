"""The cases of the never-negative states' quantizer rule (issue #16: a positive value never
rounds to code 0), shared by the CPU and Triton kernel tests."""

from __future__ import annotations

import torch

from qoptim.kernels.rules import RULES
from qoptim.kernels.types import Hyper

# rules with a never-negative state and no trust ratio (LAMB, with its ratio: the rules tests)
UNSIGNED_RULES = [name for name, spec in RULES.items() if not all(spec.signed) and not spec.trust]


def hyper(rule: str, step: int) -> Hyper:
    common = dict(lr=1e-3, eps=1e-8, weight_decay=0.0, step=step, decoupled=True)
    if rule == "rmsprop":
        return Hyper(beta1=0.0, beta2=0.0, smoothing=0.99, **common)
    if rule == "adagrad":
        return Hyper(beta1=0.0, beta2=0.0, **common)
    return Hyper(beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, **common)


def gradient(n: int, step: int, spike: float = 1.0) -> torch.Tensor:
    """Per block one large value (``spike``); tiny positive and negative ones whose squares round
    to codes below the unsigned map's smallest (1e-4 .. 1e-9 of it), exact zeros, subnormals
    (squares 0), on places that move with the step; on even steps, units gone dead after a step
    with a gradient."""
    gen = torch.Generator().manual_seed(step)
    tiny = torch.logspace(-4, -9, 6)[torch.randint(0, 6, (n,), generator=gen)]
    g = tiny * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    kind = torch.randint(0, 8, (n,), generator=gen)
    g[kind == 0] = 0.0
    g[kind == 1] = 1e-40  # subnormal
    g[kind == 2] = -3e-39
    g[::256] = spike
    if step % 2 == 0:
        g[kind == 3] = 0.0
    return g
