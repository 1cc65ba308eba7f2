"""The optimizer classes, with bitsandbytes' names, signatures and defaults."""

from .adam import Adam, Adam8bit, Adam32bit, PagedAdam, PagedAdam8bit, PagedAdam32bit
from .adamw import AdamW, AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit
from .manager import GlobalOptimManager
from .optimizer import Optimizer1State, Optimizer2State, Optimizer8bit

__all__ = [
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
    "GlobalOptimManager", "Optimizer8bit", "Optimizer2State", "Optimizer1State",
]  # fmt: skip
