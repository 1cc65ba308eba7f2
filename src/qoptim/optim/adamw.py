"""AdamW: Adam with decoupled weight decay (``p <- p * (1 - lr * weight_decay)``, as
torch.optim.AdamW), 8-bit or 32-bit states, optionally paged."""

from __future__ import annotations

from .optimizer import Optimizer2State
from .variants import FixedVariant

__all__ = ["AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit"]


class AdamW(FixedVariant, Optimizer2State):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False, nonfinite="skip"):  # fmt: skip
        super().__init__("adamw", params, lr, betas, eps, weight_decay, self._bits(optim_bits, amsgrad), args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=is_paged or self.fixed_paged, nonfinite=nonfinite)  # fmt: skip


class AdamW8bit(AdamW):
    fixed_bits = 8


class AdamW32bit(AdamW):
    fixed_bits = 32


class PagedAdamW(AdamW):
    """Always paged: unlike AdamW it takes no ``is_paged`` argument (as in bitsandbytes)."""

    fixed_paged = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, nonfinite="skip"):  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True, nonfinite=nonfinite)  # fmt: skip


class PagedAdamW8bit(PagedAdamW):
    fixed_bits = 8


class PagedAdamW32bit(PagedAdamW):
    fixed_bits = 32
