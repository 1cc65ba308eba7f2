"""Adam with L2 weight decay (added to the gradient, as torch.optim.Adam does): 8-bit or 32-bit
states (or 4-bit: ``quant.formats``), optionally paged. The update itself is the ``adam`` rule of ``qoptim.kernels``."""

from __future__ import annotations

from .optimizer import Optimizer2State
from .variants import FixedVariant, variant

__all__ = ["Adam", "Adam4bit", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam4bit", "PagedAdam8bit", "PagedAdam32bit",
           "AdamFamily"]  # fmt: skip


class AdamFamily(FixedVariant, Optimizer2State):
    """The constructor of every Adam and AdamW class; ``family`` says how weight decay applies."""

    family_name = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest", state_rounding=None):  # fmt: skip
        super().__init__(self.family_name, params, lr, betas, eps, weight_decay, self.state_bits(optim_bits, amsgrad), args,
                         min_8bit_size, percentile_clipping, block_wise, is_paged=is_paged or self.fixed_paged,
                         nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding, state_rounding=state_rounding)  # fmt: skip


Adam = variant(AdamFamily, "Adam")
Adam4bit = variant(AdamFamily, "Adam4bit", fixed_bits=4)  # qoptim's (bitsandbytes has no 4-bit optimizers)
Adam8bit = variant(AdamFamily, "Adam8bit", fixed_bits=8)
Adam32bit = variant(AdamFamily, "Adam32bit", fixed_bits=32)
PagedAdam = variant(AdamFamily, "PagedAdam", fixed_paged=True)  # keeps the (ignored) is_paged argument, as bitsandbytes
PagedAdam4bit = variant(AdamFamily, "PagedAdam4bit", fixed_bits=4, fixed_paged=True)
PagedAdam8bit = variant(AdamFamily, "PagedAdam8bit", fixed_bits=8, fixed_paged=True)
PagedAdam32bit = variant(AdamFamily, "PagedAdam32bit", fixed_bits=32, fixed_paged=True)
