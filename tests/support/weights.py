"""The weight formats of a 16-bit parameter (``kernels.types.WeightFormat``) as test cases: a 24-
or 32-bit master (a correction that starts non-zero: the parameter is the encoding of a random
fp32 master) and stochastic rounding (a key per step, as the optimizers draw it, and a first
index other than 0, as a shard's). Imported as ``support.weights``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from qoptim.kernels.types import NEAREST, Hyper, WeightFormat
from qoptim.quant import master

SEED = 1234  # a parameter's rounding seed in these cases
HALF_DTYPES = (torch.bfloat16, torch.float16)


class WeightCase(NamedTuple):
    name: str
    master_bits: int | None  # the correction's format, or None
    stochastic: bool
    first_index: int = 0  # stochastic rounding: the index of the parameter's first element

    def start(self, p: torch.Tensor) -> torch.Tensor | None:
        """Give 16-bit ``p`` a master that its weight does not hold exactly (in place); the
        correction, or None for a case without one."""
        if self.master_bits is None:
            return None
        gen = torch.Generator().manual_seed(p.numel())
        spacing = 2.0**-8 if p.dtype == torch.bfloat16 else 2.0**-11
        fine = torch.rand(p.shape, generator=gen).to(p.device) * spacing
        weight, correction = master.encode(p.float() * (1 + fine), p.dtype, self.master_bits)
        p.copy_(weight)
        return correction

    def at(self, correction: torch.Tensor | None, hp: Hyper) -> WeightFormat:
        """The weight format of the step ``hp`` for a parameter with ``correction``."""
        if self.master_bits is not None:
            return WeightFormat(correction=correction)
        if self.stochastic:
            return WeightFormat(draw=master.Draw(master.step_key(SEED, hp.step), self.first_index))
        return NEAREST


WEIGHT_CASES = (
    WeightCase("master24", 24, False),
    WeightCase("master32", 32, False),
    WeightCase("stochastic", None, True, first_index=77_777),
)
