"""SGD with momentum (torch.optim.SGD's update), with ``dampening`` and ``nesterov`` honoured."""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import FixedVariant, variant

__all__ = ["SGD", "SGD8bit", "SGD32bit", "MomentumSettings", "check_momentum"]


def check_momentum(name: str, momentum, dampening, nesterov) -> None:
    """bitsandbytes' rule (the state is the momentum buffer) and torch's rules for nesterov."""
    if momentum == 0:
        raise NotImplementedError(f"{name} without momentum is not supported!")
    if not 0.0 < momentum < 1.0 or not 0.0 <= dampening < 1.0:
        raise ValueError(f"Invalid momentum {momentum} or dampening {dampening}: momentum must be in (0, 1), dampening in [0, 1)")
    if nesterov and dampening != 0:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class MomentumSettings:
    """The step settings of the momentum families (SGD, LARS): bitsandbytes keeps
    ``(momentum, dampening)`` in ``betas``; ``nesterov`` is a group setting of their own."""

    def hyper(self, config, step):
        momentum, dampening = config["betas"][:2]
        hp = super().hyper(config, step)
        return hp._replace(beta1=0.0, beta2=0.0, momentum=float(momentum), dampening=float(dampening), nesterov=bool(config.get("nesterov")))


class SGD(FixedVariant, MomentumSettings, Optimizer1State):
    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, nonfinite="skip"):  # fmt: skip
        check_momentum(type(self).__name__.removesuffix("8bit").removesuffix("32bit"), momentum, dampening, nesterov)
        # bitsandbytes keeps (momentum, dampening) in betas
        super().__init__("momentum", params, lr, (momentum, dampening), 0.0, weight_decay, self.state_bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise, nonfinite=nonfinite)  # fmt: skip
        self.add_group_defaults(nesterov=nesterov)


SGD8bit = variant(SGD, "SGD8bit", drop=("optim_bits",), fixed_bits=8)
SGD32bit = variant(SGD, "SGD32bit", drop=("optim_bits",), fixed_bits=32)
