"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning"): Adam's direction
``u`` (plus decoupled weight decay) scaled per tensor by the trust ratio ``|p| / |u|``.
``max_unorm`` caps the trust ratio (0: no cap). At the default 1 the update is never larger than
Adam's, as in bitsandbytes' 32-bit LAMB (there, ``max_unorm`` caps ``|u|`` at ``max_unorm * |p|``:
the same step when ``max_unorm`` is 1).
bitsandbytes' 8-bit LAMB has no trust ratio; qoptim's has it at every precision."""

from __future__ import annotations

from .optimizer import Optimizer2State
from .variants import FixedVariant, variant

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit"]


class LAMB(FixedVariant, Optimizer2State):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 adam_w_mode=True, optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 max_unorm=1.0, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest", state_rounding=None):  # fmt: skip
        super().__init__("lamb", params, lr, betas, eps, weight_decay, self.state_bits(optim_bits, amsgrad), args, min_8bit_size,
                         percentile_clipping, block_wise, max_unorm=max_unorm, nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip
        self.add_group_defaults(bias_correction=bias_correction, adam_w_mode=adam_w_mode)

    def hyper(self, config, step):
        return super().hyper(config, step)._replace(
            decoupled=bool(config.get("adam_w_mode", True)), bias_correction=bool(config.get("bias_correction", True))
        )


LAMB8bit = variant(LAMB, "LAMB8bit", drop=("optim_bits",), fixed_bits=8)
LAMB32bit = variant(LAMB, "LAMB32bit", drop=("optim_bits",), fixed_bits=32)
