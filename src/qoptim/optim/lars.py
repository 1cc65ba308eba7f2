"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum
whose gradient term is scaled per tensor by the local learning rate
``eta * |p| / (|g| + weight_decay * |p|)``, eta being ``max_unorm`` (bitsandbytes' name for the
trust coefficient). bitsandbytes' 8-bit LARS has no trust ratio; qoptim's has it at every precision."""

from __future__ import annotations

from .optimizer import Optimizer1State
from .sgd import MomentumSettings, check_momentum
from .variants import FixedVariant, variant

__all__ = ["LARS", "LARS8bit", "LARS32bit"]


class LARS(FixedVariant, MomentumSettings, Optimizer1State):
    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, max_unorm=0.02, nonfinite="skip"):  # fmt: skip
        check_momentum("LARS", momentum, dampening, nesterov)
        super().__init__("lars", params, lr, (momentum, dampening), 0.0, weight_decay, self._bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise, max_unorm=max_unorm, nonfinite=nonfinite)  # fmt: skip
        self.add_group_defaults(nesterov=nesterov)


LARS8bit = variant(LARS, "LARS8bit", drop=("optim_bits",), fixed_bits=8)
LARS32bit = variant(LARS, "LARS32bit", drop=("optim_bits",), fixed_bits=32)
