"""Adam with L2 weight decay (added to the gradient, as torch.optim.Adam does): 8-bit or 32-bit
states, optionally paged. The update itself is the ``adam`` rule of ``qoptim.kernels``."""

from __future__ import annotations

from .optimizer import Optimizer2State

__all__ = ["Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit"]


class FixedVariant:
    """Class-level choices of the bitsandbytes variants: ``Adam8bit`` fixes 8-bit states,
    ``PagedAdam`` fixes paging, ``Adam`` leaves both to its arguments."""

    fixed_bits: int | None = None
    fixed_paged: bool = False

    def _bits(self, amsgrad: bool, optim_bits: int) -> int:
        name = type(self).__name__
        if amsgrad:
            raise ValueError(f"{name} does not support amsgrad=True")
        if self.fixed_bits == 8 and optim_bits != 32:
            raise ValueError(f"{name} only supports optim_bits=32 (default value for compatibility)")
        return optim_bits if self.fixed_bits is None else self.fixed_bits


class Adam(FixedVariant, Optimizer2State):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False, nonfinite="skip"):  # fmt: skip
        super().__init__("adam", params, lr, betas, eps, weight_decay, self._bits(amsgrad, optim_bits), args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=is_paged or self.fixed_paged, nonfinite=nonfinite)  # fmt: skip


class Adam8bit(Adam):
    fixed_bits = 8


class Adam32bit(Adam):
    fixed_bits = 32


class PagedAdam(Adam):
    fixed_paged = True


class PagedAdam8bit(Adam):
    fixed_bits = 8
    fixed_paged = True


class PagedAdam32bit(Adam):
    fixed_bits = 32
    fixed_paged = True
