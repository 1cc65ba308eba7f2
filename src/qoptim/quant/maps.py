"""The dynamic quantization maps of 8-bit optimizer states.

A map is a sorted float32 tensor of 256 code values in [-1, 1]. A state element ``x`` in a
block with scale ``absmax`` is stored as the index of the code nearest to ``x / absmax``.
The dynamic map spends its codes logarithmically: as many codes on (1e-7, 1e-6) as its
exponent allows, doubling per decade up to (0.1, 1), so that small moments keep precision.

The first moment uses the signed map, the second moment (never negative) the unsigned one,
which spends all its codes on [0, 1] and so has twice the resolution.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["create_dynamic_map", "signed_map", "unsigned_map", "midpoints", "search_points"]


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Return the 2**total_bits sorted float32 code values of a dynamic map.

    Bit-identical to ``bitsandbytes.functional.create_dynamic_map``: the arithmetic is done
    in float32 tensors exactly as it is there, because recomputing it in float64 and
    rounding at the end changes a few dozen values in the last bit.
    """
    if not isinstance(total_bits, int) or not 2 <= total_bits <= 8:
        raise ValueError(f"total_bits must be an int in [2, 8], got {total_bits!r}")
    if not isinstance(max_exponent_bits, int) or not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(f"max_exponent_bits must be an int in [1, total_bits - 1], got {max_exponent_bits!r}")
    values: list[float] = []
    magnitude_bits = total_bits - 1
    extra_items = 2 ** (magnitude_bits - max_exponent_bits) - 1
    for exponent in range(max_exponent_bits):
        per_decade = 2 ** (exponent + magnitude_bits - max_exponent_bits + (0 if signed else 1))
        values += _decade(exponent, max_exponent_bits, per_decade, signed)
    if extra_items > 0:
        values += _decade(max_exponent_bits - 1, max_exponent_bits, extra_items, signed)
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise ValueError(
            f"a dynamic map with signed={signed}, max_exponent_bits={max_exponent_bits} "
            f"needs {len(values)} codes, more than 2**total_bits = {2**total_bits}"
        )
    values += [0.0] * (2**total_bits - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _decade(exponent: int, max_exponent_bits: int, items: int, signed: bool) -> list[float]:
    """`items` evenly spaced values (bin centres of [0.1, 1]) scaled into one decade, in float32."""
    edges = torch.linspace(0.1, 1, items + 1, dtype=torch.float32)
    centres = (edges[:-1] + edges[1:]) / 2.0
    scaled = (10 ** (exponent - (max_exponent_bits - 1))) * centres
    return scaled.tolist() + ((-scaled).tolist() if signed else [])


@functools.cache
def _cached_map(signed: bool, device: torch.device) -> torch.Tensor:
    return create_dynamic_map(signed=signed).to(device)


def signed_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed dynamic map (bitsandbytes' "dynamic"), used for first moments. Do not modify it."""
    return _cached_map(True, torch.device(device))


def unsigned_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The unsigned dynamic map (bitsandbytes' "udynamic"), used for second moments. Do not modify it."""
    return _cached_map(False, torch.device(device))


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The decision boundaries of nearest rounding: float32 midpoints of neighbouring codes.

    Every backend rounds the same way: the code index of ``u`` is the number of midpoints
    strictly below ``u``. So a value exactly on a midpoint goes to the lower code, and an
    exact zero goes to the code 0.0 (index 127 signed, 0 unsigned).
    """
    code = code.float()
    return (code[:-1] + code[1:]) * 0.5


def search_points(code: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints of ``code`` and a ``+inf`` sentinel: 256 float32 values on ``code``'s device.

    What the fused kernels search: 256 entries make a power-of-two table (an 8-step binary
    search, the AVX-512 register tables), and as no value lies above ``+inf``, a search never
    passes the sentinel and so ends at index 255, the last code, at most.
    """
    mids = midpoints(code)
    return torch.cat([mids, torch.full((1,), math.inf, dtype=torch.float32, device=mids.device)])
