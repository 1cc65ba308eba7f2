"""Adagrad (torch.optim.Adagrad's update): one state, the sum of g², with ``lr_decay``."""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import FixedVariant, variant

__all__ = ["Adagrad", "Adagrad8bit", "Adagrad32bit"]


class Adagrad(FixedVariant, Optimizer1State):
    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest", state_rounding=None):  # fmt: skip
        if initial_accumulator_value != 0.0:
            raise ValueError("Initial accumulator value != 0.0 not supported!")
        if not lr_decay >= 0.0:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        super().__init__("adagrad", params, lr, (0.0, 0.0), eps, weight_decay, self.state_bits(optim_bits), args, min_8bit_size,
                         percentile_clipping, block_wise, nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip
        self.add_group_defaults(lr_decay=lr_decay)

    def hyper(self, config, step):
        return super().hyper(config, step)._replace(lr_decay=float(config.get("lr_decay", 0.0)))


# bitsandbytes' Adagrad8bit takes optim_bits=8 (and only 8)
Adagrad8bit = variant(Adagrad, "Adagrad8bit", defaults={"optim_bits": 8}, fixed_bits=8, default_bits=8)
Adagrad32bit = variant(Adagrad, "Adagrad32bit", fixed_bits=32)
