"""RMSprop (torch.optim.RMSprop's update, not centered): one state, the running mean of g²."""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import FixedVariant, variant

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit"]


class RMSprop(FixedVariant, Optimizer1State):
    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest", state_rounding=None):  # fmt: skip
        name = type(self).__name__
        if alpha == 0:
            raise NotImplementedError("RMSprop with alpha==0.0 is not supported!")
        if centered:
            raise NotImplementedError("Centered RMSprop is not supported!")
        if momentum != 0:  # bitsandbytes accepts and ignores it; a second state would be needed
            raise ValueError(f"{name} does not support momentum (got momentum={momentum}); use momentum=0")
        # bitsandbytes keeps (alpha, momentum) in betas
        super().__init__("rmsprop", params, lr, (alpha, momentum), eps, weight_decay, self.state_bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise, nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip


    def hyper(self, config, step):
        """bitsandbytes keeps (alpha, momentum) in betas; the kernels take alpha as ``smoothing``."""
        return super().hyper(config, step)._replace(beta1=0.0, beta2=0.0, smoothing=float(config["betas"][0]))


RMSprop8bit = variant(RMSprop, "RMSprop8bit", drop=("optim_bits",), fixed_bits=8)
RMSprop32bit = variant(RMSprop, "RMSprop32bit", drop=("optim_bits",), fixed_bits=32)
