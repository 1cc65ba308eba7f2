"""AdamW: Adam with decoupled weight decay (``p <- p * (1 - lr * weight_decay)``, as
torch.optim.AdamW), 8-bit or 32-bit states (or 4-bit: ``quant.formats``), optionally paged."""

from __future__ import annotations

from .adam import AdamFamily
from .variants import variant

__all__ = ["AdamW", "AdamW4bit", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW4bit", "PagedAdamW8bit", "PagedAdamW32bit"]

_ADAMW = {"defaults": {"weight_decay": 1e-2}, "family_name": "adamw"}

AdamW = variant(AdamFamily, "AdamW", **_ADAMW)
AdamW4bit = variant(AdamFamily, "AdamW4bit", fixed_bits=4, **_ADAMW)  # qoptim's (bitsandbytes has no 4-bit optimizers)
AdamW8bit = variant(AdamFamily, "AdamW8bit", fixed_bits=8, **_ADAMW)
AdamW32bit = variant(AdamFamily, "AdamW32bit", fixed_bits=32, **_ADAMW)
# always paged: unlike AdamW they take no is_paged argument (as in bitsandbytes)
PagedAdamW = variant(AdamFamily, "PagedAdamW", drop=("is_paged",), fixed_paged=True, **_ADAMW)
PagedAdamW4bit = variant(AdamFamily, "PagedAdamW4bit", drop=("is_paged",), fixed_bits=4, fixed_paged=True, **_ADAMW)
PagedAdamW8bit = variant(AdamFamily, "PagedAdamW8bit", drop=("is_paged",), fixed_bits=8, fixed_paged=True, **_ADAMW)
PagedAdamW32bit = variant(AdamFamily, "PagedAdamW32bit", drop=("is_paged",), fixed_bits=32, fixed_paged=True, **_ADAMW)
