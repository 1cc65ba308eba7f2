"""AdEMAMix (Pagliardini, Ablin and Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
Older"): Adam plus a slow momentum (``beta3``) weighted by ``alpha``, both optionally warmed up
over ``t_alpha`` / ``t_beta3`` steps. ``state1`` stacks the fast and the slow momentum, shape
``(2, *p.shape)``, as bitsandbytes stores it (``state.layout_of``: the rule's three slots in two keys)."""

from __future__ import annotations

import math

import torch

from .optimizer import Optimizer2State
from .variants import FixedVariant, variant

__all__ = ["AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit"]


class AdEMAMix(FixedVariant, Optimizer2State):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None, eps=1e-8,
                 weight_decay=1e-2, optim_bits=32, min_8bit_size=4096, is_paged=False, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest", state_rounding=None):  # fmt: skip
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"Invalid betas: {betas!r}; AdEMAMix takes three (beta1, beta2, beta3)")
        if not alpha >= 0:
            raise ValueError(f"Invalid alpha value: {alpha}")
        for name, t in (("t_alpha", t_alpha), ("t_beta3", t_beta3)):
            if t is not None and (not isinstance(t, int) or t <= 0):
                raise ValueError(f"Invalid {name}: {t!r}; expected a positive number of steps or None")
        super().__init__("ademamix", params, lr, betas, eps, weight_decay, self.state_bits(optim_bits), None, min_8bit_size,
                         is_paged=is_paged or self.fixed_paged, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                         nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip

    def hyper(self, config, step):
        hp = super().hyper(config, step)
        return hp._replace(alpha=scheduled_alpha(hp.alpha, config["t_alpha"], step),
                           beta3=scheduled_beta3(hp.beta1, hp.beta3, config["t_beta3"], step))  # fmt: skip


def scheduled_alpha(alpha: float, t_alpha: int | None, step: int) -> float:
    """Linear warm-up of alpha over t_alpha steps."""
    return alpha if not t_alpha else min(step * alpha / t_alpha, alpha)


def scheduled_beta3(beta1: float, beta3: float, t_beta3: int | None, step: int) -> float:
    """The paper's beta3 warm-up: from beta1 to beta3 over t_beta3 steps, linear in the
    half-life 1 / ln(beta)."""
    if not t_beta3:
        return beta3
    frac = step / t_beta3
    if beta3 == 0.0:  # nothing to warm up to
        return 0.0
    ln3 = math.log(beta3)
    if beta1 == 0.0:  # half-life 0 at the start: the formula's limit as ln(beta1) -> -inf
        return min(math.exp(ln3 / frac), beta3) if frac > 0 else 0.0
    ln1 = math.log(beta1)
    return min(math.exp(ln1 * ln3 / ((1 - frac) * ln3 + frac * ln1)), beta3)


class _ReferenceAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix in plain PyTorch, float32 states (bitsandbytes' name, kept for code and tests that
    compare against it). Same update, schedules and state layout as ``AdEMAMix``: ``m1_m2`` stacks
    the fast and slow momentum, ``nu`` is the second moment, weight decay is decoupled."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, weight_decay=1e-2, t_beta3=None,
                 t_alpha=None):  # fmt: skip
        defaults = dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay, t_beta3=t_beta3, t_alpha=t_alpha)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = step = group.get("step", 0) + 1  # one count per group, as bitsandbytes keeps it
            beta1, beta2, beta3 = group["betas"]
            alpha = scheduled_alpha(group["alpha"], group["t_alpha"], step)
            beta3 = scheduled_beta3(beta1, beta3, group["t_beta3"], step)
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["m1_m2"] = p.new_zeros((2, *p.shape))
                    state["nu"] = torch.zeros_like(p)
                m1, m2, nu = state["m1_m2"][0], state["m1_m2"][1], state["nu"]
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                m2.mul_(beta3).add_(g, alpha=1 - beta3)
                nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = nu.sqrt().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
                direction = (m1 / (1 - beta1**step)).add_(m2, alpha=alpha).div_(denom)
                p.add_(direction.add_(p, alpha=group["weight_decay"]), alpha=-lr)
        return loss


AdEMAMix8bit = variant(AdEMAMix, "AdEMAMix8bit", drop=("optim_bits",), fixed_bits=8)
AdEMAMix32bit = variant(AdEMAMix, "AdEMAMix32bit", drop=("optim_bits",), fixed_bits=32)
PagedAdEMAMix = variant(AdEMAMix, "PagedAdEMAMix", drop=("is_paged",), fixed_paged=True)
PagedAdEMAMix8bit = variant(AdEMAMix, "PagedAdEMAMix8bit", drop=("optim_bits", "is_paged"), fixed_bits=8, fixed_paged=True)
PagedAdEMAMix32bit = variant(AdEMAMix, "PagedAdEMAMix32bit", drop=("optim_bits", "is_paged"), fixed_bits=32, fixed_paged=True)
