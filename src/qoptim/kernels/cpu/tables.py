"""Lookup tables of the CPU kernel's exact quantizer, derived from a code map.

The reference rounds ``u`` to the code index ``#{midpoints < u}`` (``torch.bucketize`` on the
255 float32 midpoints of neighbouring codes). A binary search for it costs 8 dependent steps;
instead the kernel reads a first guess from a table indexed by the top 16 bits of ``u``'s
float32 bit pattern (sign, exponent and 7 mantissa bits) and corrects it with a few
comparisons against the midpoints themselves, so the result is exact by construction:

    idx = first[bits(u) >> 16]                  # midpoints below every float with these top bits
    repeat `fixups` times: idx += mids[idx] < u  # midpoints inside the bucket that are below u

Every float with the same top 16 bits lies in one interval [lo, hi] of the reals; ``first``
counts the midpoints below ``lo`` and ``fixups`` is the largest number of midpoints inside any
one interval (1 for the standard dynamic maps). NaN is not ordered, so the kernel maps it
separately to ``NAN_INDEX``, where ``torch.bucketize`` puts it.

The vectorized path saves the second table read where a bucket holds at most one midpoint
(every standard map): all floats of a bucket share their top 16 bits, so the one midpoint
that can lie inside is told apart from ``u`` by its low 16 bits alone. ``packed`` holds per
bucket ``first | key(midpoint) << 16``, where ``key`` orders the low bits as the values are
ordered (inverted for negative floats), or ``0xFFFF`` when no midpoint lies inside, so that

    idx = (packed & 0xFF) + (key(u) > packed >> 16)

is the same exact index from one read.

Stochastic rounding (a state with a draw: ``quant.blockwise.quantize_stochastic``) needs the
floor code instead, k = #{codes after the first at or below u}. For floats ``c <= u`` exactly
when ``nextafter(c, -inf) < u`` (no float lies between the two; both zeros included), so k is
this very quantizer's count on other boundaries, ``nextafter(code[1:], -inf)``: the floor tables
(``StochasticTables``), exact by the same construction on every path, NaN to the last code as
the reference has it. Only ``c = -inf`` has no float below: a map with -inf after its first code
has no floor tables (the kernels leave its draws to the reference). With them go ``steps``, the
very float32 table the reference reads (``blockwise.stochastic_steps``), and its byte planes.

The AVX-512 path reads its tables from vector registers instead (``avx512``): the code map
and the midpoints as byte planes, a search tree and the first guess's bins (``guess``), laid
out in one byte array by ``register_tables`` (the offsets below).

Any map works (a checkpoint may carry its own): tables are built from the map's contents and
cached by them (``tables_for``), and by the map tensor itself while it is unchanged
(``tables_of``: the optimizers pass the same map every step).
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, NamedTuple, TypeVar

import numpy as np
import torch

from ...quant.blockwise import stochastic_steps
from ...quant.maps import midpoints
from . import guess

__all__ = [
    "NAN_INDEX", "PLANES", "QuantTables", "REGISTERS", "StochasticTables", "byte_planes", "cached_by_tensor", "register_tables",
    "stochastic_tables_for", "stochastic_tables_of", "tables_for", "tables_of",
]  # fmt: skip

T = TypeVar("T")

# torch.bucketize's answer for a NaN input (it orders NaN after every boundary)
NAN_INDEX = 255

# A map's register tables, one byte array: byte planes of the codes and of the midpoints
# (+inf after the last, so a guess of 255 compares false), the search tree (node 0: the index
# of +inf), the guess's rows (shifts and offsets, 64 words each) and bins.
CODE_PLANES, MID_PLANES, SEARCH, SHIFTS, OFFSETS, BINS = 0, 1024, 2048, 3072, 3200, 3328
REGISTERS = BINS + guess.MAX_BINS
PLANES = 1024  # bytes of a table of 256 floats as byte planes (``byte_planes``)


class QuantTables(NamedTuple):
    code: np.ndarray  # float32[256], the map itself (for dequantizing)
    first: np.ndarray  # uint8[65536 + 4], midpoints below each top-16-bit bucket (+ padding: a vector gather reads 4 bytes)
    mids: np.ndarray  # float32[256], the 255 midpoints then +inf, so a fix-up never runs past the end
    fixups: int  # comparisons that make a guess from `first` exact
    packed: np.ndarray  # int32[65536] (see above), or empty where some bucket holds 2+ midpoints
    registers: np.ndarray  # uint8[REGISTERS], the AVX-512 path's tables (register_tables)
    guessed: bool  # whether the AVX-512 path quantizes from a first guess (else it searches)


def tables_for(code: torch.Tensor) -> QuantTables | None:
    """The quantizer tables of a float32 map of 256 codes; None if the map is not sorted
    (then ``torch.bucketize`` has no defined answer to agree with)."""
    code = code.detach().to("cpu", torch.float32).contiguous()
    return _tables(code.numpy().tobytes())


class StochasticTables(NamedTuple):
    """A map's tables for stochastic rounding (see above)."""

    floors: QuantTables  # the quantizer's tables of the boundaries nextafter(code[1:], -inf) (its ``code``: the map)
    steps: np.ndarray  # float32[256], ``blockwise.stochastic_steps``: the scale of the draw per code
    step_planes: np.ndarray  # uint8[PLANES], ``byte_planes`` of ``steps``: the AVX-512 path's


@functools.lru_cache(maxsize=16)
def _tables(code_bytes: bytes) -> QuantTables | None:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    return _search_tables(code.numpy(), midpoints(code).numpy())  # the very midpoints the reference compares with


def stochastic_tables_for(code: torch.Tensor) -> StochasticTables | None:
    """The stochastic rounding tables of a float32 map of 256 codes; None where the map is not
    sorted or has -inf after its first code (see above)."""
    code = code.detach().to("cpu", torch.float32).contiguous()
    return _stochastic_tables(code.numpy().tobytes())


def stochastic_tables_of(code: torch.Tensor) -> StochasticTables | None:
    """``stochastic_tables_for(code)``, cached by the map tensor itself (while unchanged in place)."""
    return cached_by_tensor(code, stochastic_tables_for)


@functools.lru_cache(maxsize=16)
def _stochastic_tables(code_bytes: bytes) -> StochasticTables | None:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    values = code.numpy()
    if np.isnan(values).any() or (values[1:] < values[:-1]).any() or (values[1:] == -np.inf).any():
        return None
    floors = _search_tables(values, np.nextafter(values[1:], np.float32(-np.inf)).astype(np.float32))
    steps = stochastic_steps(code).numpy()
    return StochasticTables(floors, steps, byte_planes(steps))


def _search_tables(code: np.ndarray, mids: np.ndarray) -> QuantTables | None:
    """The quantizer's tables of a map ``code`` counting the sorted float32 boundaries ``mids``
    below u (its midpoints, or the floor's boundaries); None where they are not sorted."""
    if np.isnan(mids).any() or (mids[1:] < mids[:-1]).any():
        return None
    lo, hi = _bucket_bounds()
    first = np.searchsorted(mids, lo, side="left")  # midpoints strictly below lo
    inside = np.searchsorted(mids, hi, side="right") - first  # midpoints in [lo, hi]
    padded = np.append(mids, np.float32(np.inf)).astype(np.float32)
    packed = _packed(first, inside, mids)
    first = np.append(first.astype(np.uint8), np.zeros(4, np.uint8))
    registers, guessed = register_tables(code, mids)
    return QuantTables(code.copy(), first, padded, int(inside.max()), packed, registers, guessed)


def register_tables(code: np.ndarray, mids: np.ndarray) -> tuple[np.ndarray, bool]:
    """A map's register tables (float32 ``code``, sorted float32 ``mids``), and whether it has
    a guess table (else the kernel searches)."""
    tables = np.zeros(REGISTERS, dtype=np.uint8)
    padded = np.append(mids, np.float32(np.inf)).astype(np.float32)
    tables[CODE_PLANES : CODE_PLANES + PLANES] = byte_planes(code)
    tables[MID_PLANES : MID_PLANES + PLANES] = byte_planes(padded)
    search = tables[SEARCH:SHIFTS].view(np.float32)
    search[0] = np.count_nonzero(mids < np.inf)  # the index of +inf (node 0 is not part of the tree)
    for n in range(1, 256):
        level = n.bit_length() - 1
        step = 128 >> level  # node n splits [j * 2 * step, (j + 1) * 2 * step)
        search[n] = mids[(2 * (n - (1 << level)) + 1) * step - 1] + np.float32(0.0)  # -0 as +0: see avx512._searched
    bins = guess.bin_table(mids)
    if bins is not None:
        shifts, offsets, table = bins
        tables[SHIFTS:OFFSETS] = shifts.view(np.uint8)
        tables[OFFSETS:BINS] = offsets.view(np.uint8)
        tables[BINS:REGISTERS] = table
    return tables, bins is not None


def byte_planes(values: np.ndarray) -> np.ndarray:
    """256 float32 ``values`` as four byte planes (``PLANES`` bytes, byte k of entry i at 256 * k
    + i), as the AVX-512 path reads a table from registers (``avx512.lookup_planes``)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    return np.concatenate([(bits >> (8 * k)) & 0xFF for k in range(4)]).astype(np.uint8)


# (id(code map), maker) -> (weak reference to it, its version and address then, its tables): the
# optimizers pass the same map tensor every step, so its tables are found without reading it.
_BY_TENSOR: dict[int, tuple] = {}


def tables_of(code: torch.Tensor) -> QuantTables | None:
    """``tables_for(code)``, cached by the map tensor itself (while unchanged in place)."""
    return cached_by_tensor(code, tables_for)


def cached_by_tensor(code: torch.Tensor, make: Callable[[torch.Tensor], T]) -> T:
    """``make(code)`` (a map's tables), cached by the map tensor itself (while unchanged in place)."""
    key = (id(code), make)
    seen = _BY_TENSOR.get(key)
    stamp = (code._version, code.data_ptr())
    if seen is not None and seen[0]() is code and seen[1] == stamp:
        return seen[2]
    tables = make(code)
    if len(_BY_TENSOR) >= 64:
        _BY_TENSOR.clear()
    _BY_TENSOR[key] = (weakref.ref(code), stamp, tables)
    return tables


def _packed(first: np.ndarray, inside: np.ndarray, mids: np.ndarray) -> np.ndarray:
    if inside.max() > 1:
        return np.zeros(0, dtype=np.int32)
    buckets = np.arange(1 << 16, dtype=np.uint32)
    candidate = np.append(mids, np.float32(np.inf))[first].view(np.uint32)  # the first midpoint not below the bucket
    key = _low_key(candidate)
    # a midpoint inside by value but with other top bits can only be a zero of the other sign:
    # the 16-bit comparison cannot see it, so such a map takes the two-read path
    if ((inside == 1) & ((candidate >> 16) != buckets)).any():
        return np.zeros(0, dtype=np.int32)
    key = np.where(inside == 1, key, 0xFFFF).astype(np.uint32)
    return (first.astype(np.uint32) | (key << 16)).view(np.int32)


def _low_key(bits: np.ndarray) -> np.ndarray:
    """Low 16 bits of float32 bit patterns, inverted for negative floats (whose values fall as
    their bits grow): within one bucket, keys order as the values do."""
    negative = (bits >> 31).astype(bool)
    return np.where(negative, (bits & 0xFFFF) ^ 0xFFFF, bits & 0xFFFF).astype(np.uint32)


@functools.cache
def _bucket_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest float32 of each top-16-bit bucket. NaN patterns stand in for the
    infinity of their sign: NaN never reaches the table lookup's answer."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    low_bits = top.view(np.float32)
    high_bits = (top | 0xFFFF).view(np.float32)
    negative = np.arange(1 << 16) >= 0x8000
    lo = np.where(negative, high_bits, low_bits)  # a negative float grows more negative with its bits
    hi = np.where(negative, low_bits, high_bits)
    inf = np.where(negative, -np.inf, np.inf).astype(np.float32)
    lo = np.where(np.isnan(lo), inf, lo).astype(np.float32)
    hi = np.where(np.isnan(hi), inf, hi).astype(np.float32)
    return lo, hi
