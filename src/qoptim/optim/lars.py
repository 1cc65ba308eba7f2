"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum
whose gradient term is scaled per tensor by the local learning rate
``eta * |p| / (|g| + weight_decay * |p|)``, eta being ``max_unorm`` (bitsandbytes' name for the
trust coefficient). bitsandbytes' 8-bit LARS has no trust ratio; qoptim's has it at every precision."""

from __future__ import annotations

import torch

from .optimizer import Optimizer1State
from .sgd import MomentumSettings, check_momentum
from .variants import FixedVariant, variant

__all__ = ["LARS", "LARS8bit", "LARS32bit", "PytorchLARS"]


class LARS(FixedVariant, MomentumSettings, Optimizer1State):
    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, max_unorm=0.02, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest"):  # fmt: skip
        check_momentum("LARS", momentum, dampening, nesterov)
        super().__init__("lars", params, lr, (momentum, dampening), 0.0, weight_decay, self.state_bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise, max_unorm=max_unorm, nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding)  # fmt: skip
        self.add_group_defaults(nesterov=nesterov, momentum=momentum, dampening=dampening)

    def hyper(self, config, step):
        """bitsandbytes passes LARS's trust coefficient as ``max_unorm``."""
        hp = super().hyper(config, step)
        return hp._replace(trust_coefficient=hp.max_unorm, max_unorm=0.0)


LARS8bit = variant(LARS, "LARS8bit", drop=("optim_bits",), fixed_bits=8)
LARS32bit = variant(LARS, "LARS32bit", drop=("optim_bits",), fixed_bits=32)


class PytorchLARS(torch.optim.Optimizer):
    """bitsandbytes' plain-PyTorch LARS, kept for code that uses it: ``torch.optim.SGD``'s step
    (L2 weight decay, momentum with dampening, nesterov) whose update ``u`` is scaled down to
    ``max_unorm * |p|`` when it is longer (``max_unorm=0``: no cap). Unlike ``LARS`` above, it
    has no trust ratio, and momentum 0 is allowed (the update is then the gradient)."""

    def __init__(self, params, lr=0.01, momentum=0, dampening=0, weight_decay=0, nesterov=False, max_unorm=0.02):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")  # torch's text (bitsandbytes fails on it with a RuntimeError)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        max_unorm=max_unorm)  # fmt: skip
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, max_unorm = group["momentum"], group["max_unorm"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                u = g
                if momentum:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = g.detach().clone()
                    else:
                        buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
                    u = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                scale = 1.0
                if max_unorm > 0:
                    p_norm, u_norm = p.float().norm(), u.float().norm()
                    if u_norm > max_unorm * p_norm:
                        scale = float(max_unorm * p_norm / u_norm)
                p.add_(u, alpha=-group["lr"] * scale)
        return loss
