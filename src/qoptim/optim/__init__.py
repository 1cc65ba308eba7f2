"""The optimizer classes, with bitsandbytes' names, signatures and defaults.

- ``optimizer``: Optimizer8bit (the step loop, config, buffers), Optimizer2State / Optimizer1State
  (bitsandbytes' module path ``optim.optimizer``);
- ``names``: bitsandbytes' optimizer names ("adam", "adamw", ...) -> an update rule of ``kernels.rules``;
- ``validation``: the constructor's, each param group's and each parameter's checks;
- ``state``: the live per-parameter state: bitsandbytes' key names, shapes, allocation, slot views;
- ``update``: the update jobs of a step, percentile clipping, the skipped-block total;
- ``checkpoint``: state_dict / load_state_dict (bitsandbytes' nested layout, checks, placement);
- ``exports``: the state dict layouts other than the live one: DCP's portable one, FSDP1's export;
- ``reshard``: loading a saved state into the live layout, across shardings (DTensor), from an export;
- ``dtensor``: state buffers and local views of sharded (DTensor, FSDP2) parameters;
- ``manager``: GlobalOptimManager, per-parameter overrides;
- ``release``: gradient release, each parameter updated in backward as its gradient completes;
- ``variants``: the ``*8bit`` / ``*32bit`` / ``*4bit`` / ``Paged*`` classes made from one family class;
- one module per family: ``adam``, ``adamw``, ``ademamix``, ``lamb``, ``lars``, ``lion``, ``rmsprop``,
  ``sgd``, ``adagrad``.
"""

from .adagrad import Adagrad, Adagrad8bit, Adagrad32bit
from .adam import Adam, Adam4bit, Adam8bit, Adam32bit, PagedAdam, PagedAdam4bit, PagedAdam8bit, PagedAdam32bit
from .adamw import AdamW, AdamW4bit, AdamW8bit, AdamW32bit, PagedAdamW, PagedAdamW4bit, PagedAdamW8bit, PagedAdamW32bit
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .lars import LARS, LARS8bit, LARS32bit, PytorchLARS
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .manager import GlobalOptimManager
from .optimizer import Optimizer1State, Optimizer2State, Optimizer8bit
from .release import release_gradients
from .rmsprop import RMSprop, RMSprop8bit, RMSprop32bit
from .sgd import SGD, SGD8bit, SGD32bit

__all__ = [
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit",
    "Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit",
    "LAMB", "LAMB8bit", "LAMB32bit", "LARS", "LARS8bit", "LARS32bit", "PytorchLARS",
    "RMSprop", "RMSprop8bit", "RMSprop32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit", "SGD", "SGD8bit", "SGD32bit",
    "GlobalOptimManager", "Optimizer8bit", "Optimizer2State", "Optimizer1State",
]  # fmt: skip
# bitsandbytes' names only (tests/compat compares each with bitsandbytes'); qoptim's own names are
# imported above (release_gradients, the 4-bit classes) and listed in QOPTIM_NAMES
QOPTIM_NAMES = ["Adam4bit", "AdamW4bit", "PagedAdam4bit", "PagedAdamW4bit", "release_gradients"]

