"""The layer-wise trust ratio of LAMB and LARS, made on the device without a host sync.

The ratio needs two norms over the whole parameter before any element is updated: LAMB's of the
parameter and of its update direction, LARS's of the parameter and of the gradient
(``reference.TRUST_RATIOS``). They come in three steps, all queued on the device:

  1. the block kernel's ``NORMS_PASS`` writes, per program, the two float64 sums of squares of
     its tile (skipped blocks left out, as in the reference);
  2. torch sums those partial sums (a deterministic reduction);
  3. ``ratio_kernel`` (one program) turns the two sums into the reference's ratio, in float64,
     and into the float32 factor that the update multiplies by: the ratio itself for LARS (it
     scales the gradient), ``lr * ratio`` for LAMB (its step size), rounded as the reference
     rounds the Python double it computes.

Agreement with the reference: every square is exact (a float32 squared in float64), but the sums
add them in another order than the reference's float64 ``sum``, so the ratio agrees to a few
units in the last place of a double (relative error ~1e-15), not bit for bit; the float32 factor
then agrees bit for bit but for the rare ratio that lies that close to a float32 rounding boundary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..types import Hyper
from .rules import LAMB


class TrustRatio(NamedTuple):
    """Device scalars: the ratio (float64), and the float32 factor the update kernel reads."""

    ratio: torch.Tensor
    factor: torch.Tensor


@triton.jit
def _safe_div(a, b):
    """a / b where b > 0 (1 elsewhere): no division by zero, even in a value thrown away."""
    return a / tl.where(b > 0, b, 1.0)


@triton.jit
def ratio_kernel(sums_ptr, ratio_ptr, factor_ptr, lr: tl.float64, weight_decay: tl.float64, coefficient: tl.float64,
                 RULE: tl.constexpr):  # fmt: skip
    """reference.lamb_trust_ratio / lars_trust_ratio on float64 device scalars (float64 division
    and square root are correctly rounded on the GPU, as on the host). ``coefficient``: LAMB's
    cap of the ratio, ``max_unorm`` (0: none); LARS's eta, ``trust_coefficient``."""
    a = tl.sqrt(tl.load(sums_ptr))  # |p|
    b = tl.sqrt(tl.load(sums_ptr + 1))  # |direction| (LAMB), |g| (LARS)
    if RULE == LAMB:
        ratio = tl.where((a > 0) & (b > 0), _safe_div(a, b), 1.0)
        ratio = tl.where((coefficient > 0) & (coefficient < ratio), coefficient, ratio)  # Python's min(ratio, max_unorm)
        factor = lr * ratio
    else:  # LARS: eta * |p| / (|g| + weight_decay * |p|), eta = coefficient
        denominator = b + weight_decay * a
        ratio = tl.where((a > 0) & (denominator > 0), _safe_div(coefficient * a, denominator), 1.0)
        factor = ratio
    tl.store(ratio_ptr, ratio)
    tl.store(factor_ptr, factor.to(tl.float32))


def ratio_from_sums(rule: int, partial_sums: torch.Tensor, hp: Hyper, launch_options: dict) -> TrustRatio:
    """The trust ratio of a NORMS_PASS's partial sums ([programs, 2] float64), on their device;
    ``rule``: the RULE switch (``rules.LAMB``, or LARS's ``rules.MOMENTUM``)."""
    sums = partial_sums.view(-1, 2).sum(dim=0)
    ratio = torch.empty(1, dtype=torch.float64, device=sums.device)
    factor = torch.empty(1, dtype=torch.float32, device=sums.device)
    coefficient = hp.max_unorm if rule == LAMB.value else hp.trust_coefficient
    args = float(hp.lr), float(hp.weight_decay), float(coefficient)
    ratio_kernel[(1,)](sums, ratio, factor, *args, RULE=rule, **launch_options)
    return TrustRatio(ratio, factor)
