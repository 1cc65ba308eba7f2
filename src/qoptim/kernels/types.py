"""The plain data that crosses the kernel seam: one parameter's states and a step's hyperparameters.

Optimizer classes build these; kernels read and update them. Neither side knows more of the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

# Granularity of non-finite gradient skipping, and the block size of 8-bit optimizer states.
from ..quant.blockwise import BLOCK  # its home is quant; re-exported here for the kernels
from ..quant.master import Draw

# Scales per tensor rather than per block: the non-blockwise 8-bit layout (block_wise=False).
WHOLE_TENSOR = 0


@dataclass
class StateSlot:
    """One optimizer state of one parameter, as a flat view.

    ``values`` holds float32 values, or uint8 codes into ``code`` scaled by ``absmax``: one
    float32 scale per ``blocksize`` elements, or a single scale when ``blocksize`` is
    ``WHOLE_TENSOR``. A map of 256 codes (8 bits) takes a byte per element; one of 16 (4 bits,
    ``quant.formats``) takes the 4 bits of each byte from ``shift`` up, and another state the
    other 4. Kernels update ``values`` and ``absmax`` in place. With a ``draw``, block-wise codes
    are rounded stochastically (``quant.blockwise.quantize_stochastic``), element i of the slot
    drawing the bits of index ``draw.first_index + i``; without, to nearest.
    """

    values: torch.Tensor
    code: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    blocksize: int = BLOCK
    shift: int = 0  # 4-bit codes: the lowest bit of this state's code in each byte (0 or 4)
    draw: Draw | None = None  # stochastic rounding of the codes: the step's key, the first element's index

    @property
    def quantized(self) -> bool:
        return self.values.dtype == torch.uint8

    @property
    def bits(self) -> int:
        """Bits per code: 8, or 4 for a map of 16 codes."""
        return 4 if self.code is not None and self.code.numel() == 16 else 8


def state_draw(slots: list[StateSlot]) -> Draw | None:
    """The draw of a parameter's stochastically rounded states, or None where they all round to
    nearest. The optimizers give a step's states one draw; backends that keep one per parameter
    (a batch row, a launch's arguments) take a job with two the slow way (``one_state_draw``)."""
    return next((slot.draw for slot in slots if slot.draw is not None), None)


def one_state_draw(slots: list[StateSlot]) -> bool:
    """Whether the states draw alike (one draw, or none): what ``state_draw`` stands for."""
    return len({slot.draw for slot in slots if slot.draw is not None}) <= 1


class Hyper(NamedTuple):
    """A step's hyperparameters for one parameter, as Python numbers."""

    lr: float
    beta1: float  # the first moment's decay (Adam, AdEMAMix, LAMB, Lion); 0 for rules without one
    beta2: float  # the second moment's decay (Adam, AdEMAMix, LAMB); Lion: its momentum's decay
    eps: float
    weight_decay: float
    step: int
    decoupled: bool  # weight decay applied to the parameter (AdamW) rather than added to the gradient (Adam)
    gnorm_scale: float = 1.0  # gradient multiplier from percentile clipping
    beta3: float = 0.0  # AdEMAMix: decay of the slow momentum (already scheduled for this step)
    alpha: float = 0.0  # AdEMAMix: weight of the slow momentum (already scheduled for this step)
    momentum: float = 0.0  # SGD, LARS
    dampening: float = 0.0  # SGD, LARS
    nesterov: bool = False  # SGD, LARS
    smoothing: float = 0.0  # RMSprop: the decay of its running mean of g² (torch's ``alpha``)
    lr_decay: float = 0.0  # Adagrad
    bias_correction: bool = True  # LAMB
    max_unorm: float = 0.0  # LAMB: cap of the update norm relative to |p| (0: none)
    trust_coefficient: float = 0.0  # LARS: eta of its trust ratio (bitsandbytes' ``max_unorm`` argument)
    trust_ratio: float = 1.0  # LAMB, LARS: the layer-wise scale, filled in by the backend


class WeightFormat(NamedTuple):
    """How a step reads and writes a bf16 / fp16 parameter (``quant.master`` defines both).

    With a ``correction`` the parameter and it hold an fp32 master: the step decodes it, updates
    it and encodes it again. With a ``draw`` the updated value is rounded stochastically. With
    neither (``NEAREST``), or for an fp32 parameter, the step rounds to nearest even, as torch."""

    correction: torch.Tensor | None = None  # int8 (24-bit master) or int16 (32-bit), flat, p's size
    draw: Draw | None = None  # stochastic rounding: the step's key and the first element's index

    @property
    def nearest(self) -> bool:
        """Neither a master nor stochastic rounding (``NEAREST``). Ask this rather than ``== NEAREST``:
        comparing tuples that hold a tensor calls torch's ``==`` with None, ~16 us a time."""
        return self.correction is None and self.draw is None


NEAREST = WeightFormat()


class Job(NamedTuple):
    """One parameter's update, the arguments of ``kernels.update`` as one value (``update_many``)."""

    rule: str
    p: torch.Tensor  # flat, contiguous
    g: torch.Tensor  # flat, contiguous, p's dtype
    slots: list[StateSlot]
    hp: Hyper
    skip_nonfinite: bool = True
    weights: WeightFormat = NEAREST


class UpdateResult(NamedTuple):
    # 256-blocks left untouched because their gradient held a NaN or Inf: an int, or a 0-d device
    # tensor (GPU backends), which the optimizer reads once per step rather than once per parameter
    skipped_blocks: int | torch.Tensor
