"""The formats of quantized optimizer states: one line each in ``FORMATS``, keyed by ``optim_bits``.

A format says how many bits a code has, how many elements share one float32 scale (their block's
largest magnitude) and which map of ``2**bits`` sorted codes in [-1, 1] a state's values round to:
one for states that may be negative (first moments, momenta), one for states that never are
(second moments, sums of squares), and how a never-negative state's value is rounded to its codes:
to the nearest code (``maps.midpoints``), or stochastically, right on average
(``blockwise.quantize_stochastic``, keyed by the parameter's seed, the step and the element's
index). A first moment is always rounded to nearest. Every backend rounds the same way.

* 8 bits (bitsandbytes' format): blocks of 256, the dynamic maps of ``maps``. A never-negative
  state's positive value never rounds to the unsigned map's zero (``blockwise.raise_positive_from_zero``).
* 4 bits: blocks of 128; the signed dynamic map with 3 exponent bits for first moments and the
  zero-free linear map {1/16, 2/16, .., 1} for second moments (the maps of lpmm's fused kernel
  and torchao's AdamW4bit): with no zero code, a second moment never rounds to 0 and so never makes
  a step of ``lr * m / eps`` (Li et al. 2023's zero-point problem). The second moment is rounded
  stochastically: rounded to nearest, its errors make Adam's steps larger than fp32 Adam's, more
  so as training goes on (+44% in norm by step 1,000 of the lean GPT), where rounded
  stochastically they stay within 4%. The choice among the alternatives that were measured
  (stochastic and dithered rounding of both moments, rank-1 scales, a companded second moment) is
  docs/four_bit.md's. Two 4-bit codes share a byte: how a parameter's states
  keep them is ``qoptim.optim.state``'s.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from .maps import create_dynamic_map, signed_map, unsigned_map

__all__ = ["FORMATS", "MAP_NAMES", "NEAREST_ROUNDING", "STOCHASTIC_ROUNDING", "StateFormat", "format_of", "state_map"]

NEAREST_ROUNDING, STOCHASTIC_ROUNDING = "nearest", "stochastic"  # how a never-negative state's values round to its codes


def _linear_zero_free(bits: int) -> torch.Tensor:
    """{1, 2, .., 2**bits} / 2**bits: the levels of a linear map of never-negative values, without 0."""
    levels = 1 << bits
    return torch.arange(1, levels + 1, dtype=torch.float32) / levels


@functools.cache
def _cached(name: str, device: torch.device) -> torch.Tensor:
    return _MAKERS[name]().to(device)


_MAKERS: dict[str, Callable[[], torch.Tensor]] = {
    "dynamic": lambda: signed_map(),  # bitsandbytes' names of the 8-bit maps
    "udynamic": lambda: unsigned_map(),
    "dynamic4": lambda: create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4),
    "linear4": lambda: _linear_zero_free(4),
}


MAP_NAMES = tuple(_MAKERS)


def state_map(name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The map called ``name`` (one of ``MAP_NAMES``) on ``device``, shared: do not modify it."""
    return _cached(name, torch.device(device))


class StateFormat(NamedTuple):
    """How a quantized state is kept: ``bits`` per code, one float32 scale per ``blocksize``
    elements, the maps (``MAP_NAMES``) of signed and of never-negative states."""

    bits: int
    blocksize: int
    signed_map: str
    unsigned_map: str
    zero_free_unsigned: bool  # the unsigned map has no zero code (else a positive value is raised past it)
    unsigned_rounding: str = NEAREST_ROUNDING  # how a never-negative state rounds to its codes (NEAREST_ROUNDING or STOCHASTIC_ROUNDING)

    @property
    def codes(self) -> int:
        return 1 << self.bits

    def map_name(self, signed: bool) -> str:
        return self.signed_map if signed else self.unsigned_map

    @property
    def map_names(self) -> tuple[str, str]:
        return self.signed_map, self.unsigned_map


FORMATS: dict[int, StateFormat] = {
    8: StateFormat(bits=8, blocksize=256, signed_map="dynamic", unsigned_map="udynamic", zero_free_unsigned=False),
    4: StateFormat(bits=4, blocksize=128, signed_map="dynamic4", unsigned_map="linear4", zero_free_unsigned=True,
                   unsigned_rounding=STOCHASTIC_ROUNDING),
}


def format_of(code: torch.Tensor) -> StateFormat | None:
    """The format whose maps have as many codes as ``code`` (None: no format's)."""
    for fmt in FORMATS.values():
        if code.numel() == fmt.codes:
            return fmt
    return None
