"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): one momentum
state, an update of fixed size per element (the sign), decoupled weight decay."""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import FixedVariant, variant

__all__ = ["Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"]


class Lion(FixedVariant, Optimizer1State):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32, args=None, min_8bit_size=4096,
                 percentile_clipping=100, block_wise=True, is_paged=False, nonfinite="skip", *,
                 master_weight_bits=None, weight_rounding="nearest"):  # fmt: skip
        super().__init__("lion", params, lr, betas, 0.0, weight_decay, self.state_bits(optim_bits), args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=is_paged or self.fixed_paged, nonfinite=nonfinite,
                         master_weight_bits=master_weight_bits, weight_rounding=weight_rounding)  # fmt: skip


Lion8bit = variant(Lion, "Lion8bit", drop=("optim_bits",), fixed_bits=8)
Lion32bit = variant(Lion, "Lion32bit", drop=("optim_bits",), fixed_bits=32)
PagedLion = variant(Lion, "PagedLion", drop=("is_paged",), fixed_paged=True)
PagedLion8bit = variant(Lion, "PagedLion8bit", drop=("optim_bits", "is_paged"), fixed_bits=8, fixed_paged=True)
PagedLion32bit = variant(Lion, "PagedLion32bit", drop=("optim_bits", "is_paged"), fixed_bits=32, fixed_paged=True)
