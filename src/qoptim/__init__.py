"""qoptim: memory-efficient optimizers for PyTorch, a drop-in for bitsandbytes' 8-bit optimizers.

    import qoptim as bnb
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
"""

from . import functional, optim, utils
from .optim import *  # noqa: F403
from .optim import QOPTIM_NAMES as _qoptim_names
from .optim import __all__ as _optim_all
from .optim import Adam4bit, AdamW4bit, PagedAdam4bit, PagedAdamW4bit, release_gradients

__version__ = "0.1.0"

__all__ = ["functional", "optim", "utils", "__version__", *_qoptim_names, *_optim_all]
