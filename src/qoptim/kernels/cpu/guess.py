"""A first guess of a code index from a small table, for the AVX-512 quantizer (``avx512``).

The quantizer's answer for a float ``u`` is ``T(u) = #{midpoints < u}``, a step function. The
guess reads it from a table of bins, each a run of floats that share their sign, exponent and
top mantissa bits, and holds ``T`` at the bin's lowest float. A bin that has at most one
midpoint in it makes the guess ``T(u)`` or ``T(u) - 1`` for every float in it, so one
comparison with ``midpoints[guess]`` makes it exact; no float can fall outside the proof,
because the bins cover every float and the check is done at each bin's two ends.

The bins work on the top 16 bits of u's pattern, ``w`` = sign | exponent | 7 mantissa bits:

    m     = clamp(w & 0x7FFF, 96 << 7, 0x3FFF)      magnitudes from 2**-31 to just below 2
    row   = sign << 5 | (m >> 7) - 96                 64 rows: a sign and an exponent
    bin   = OFFSET[row] + (m >> SHIFT[row])           keeps the row's top 7 - SHIFT mantissa bits
    guess = BINS[bin]                                 T at the bin's lowest float

Each row takes as few mantissa bits as keep one midpoint per bin, so the dynamic maps, whose
codes are evenly spaced within a decade, fit in 512 bins: the signed one in ~450, the
unsigned one in ~480 (72 midpoints in its top octave take all 7 bits). Magnitudes below 2**-31
share the first row's first bin, those from 2 on (up to the largest float) the last row's
last bin. A map whose bins do not fit (midpoints closer together than 2**-7 of an octave,
or in the clamped ranges) has no table, and the kernel searches instead.
"""

from __future__ import annotations

import numpy as np

FIRST_EXPONENT = 96  # biased exponent of the first row: |u| from 2**-31 (smaller ones join it)
ROWS = 32  # exponents per sign: 2**-31 <= |u| < 2
MANTISSA_BITS = 7  # of u's top 16 bits
MAX_BINS = 512
LOW, HIGH = FIRST_EXPONENT << MANTISSA_BITS, ((FIRST_EXPONENT + ROWS) << MANTISSA_BITS) - 1  # clamp of m


def bin_table(mids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The guess's tables for sorted float32 midpoints (as the kernel compares with them):
    uint16 SHIFT[64], uint16 OFFSET[64] and uint8 BINS[512]; or None when a row needs more
    than 7 mantissa bits or the bins do not fit."""
    mids = np.asarray(mids, dtype=np.float32)
    if mids.size > 255 or np.isnan(mids).any() or (mids[1:] < mids[:-1]).any():
        return None
    shift = np.zeros(2 * ROWS, dtype=np.uint16)
    offset = np.zeros(2 * ROWS, dtype=np.uint16)
    bins: list[np.ndarray] = []
    used = 0
    for row in range(2 * ROWS):
        for bits in range(MANTISSA_BITS + 1):
            low, high = bin_counts(mids, row, bits)
            if (high - low <= 1).all():
                break
        else:
            return None
        first_word = (FIRST_EXPONENT + row % ROWS) << bits  # m >> shift at the row's first bin
        shift[row] = MANTISSA_BITS - bits
        offset[row] = (used - first_word) % (1 << 16)
        bins.append(low)
        used += low.size
    if used > MAX_BINS:
        return None
    table = np.zeros(MAX_BINS, dtype=np.uint8)
    table[:used] = np.concatenate(bins)
    return shift, offset, table


def guess(tables: tuple[np.ndarray, np.ndarray, np.ndarray], u: np.ndarray) -> np.ndarray:
    """The kernel's guesses for float32 ``u``, lane by lane as the vector code computes them."""
    shift, offset, table = tables
    w = np.asarray(u, dtype=np.float32).view(np.uint32) >> 16
    m = np.clip(w & 0x7FFF, LOW, HIGH)
    row = (w >> 15) * ROWS + (m >> MANTISSA_BITS) - FIRST_EXPONENT
    return table[(offset[row].astype(np.uint32) + (m >> shift[row])) % (1 << 16)]


def bin_counts(mids: np.ndarray, row: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """T at the lowest and at the highest float of each bin of a row split by ``bits``
    mantissa bits (the clamped ends reach 0 and the largest float)."""
    exponent = FIRST_EXPONENT + row % ROWS
    width = 1 << (23 - bits)
    starts = (np.uint64(exponent) << np.uint64(23)) + np.arange(1 << bits, dtype=np.uint64) * np.uint64(width)
    ends = starts + np.uint64(width - 1)
    if row % ROWS == 0:
        starts[0] = 0
    if row % ROWS == ROWS - 1:
        ends[-1] = 0x7F7FFFFF
    small = starts.astype(np.uint32).view(np.float32)
    large = ends.astype(np.uint32).view(np.float32)
    if row >= ROWS:  # negative: the lowest float has the largest magnitude
        small, large = -large, -small
    return np.searchsorted(mids, small, side="left").astype(np.int64), np.searchsorted(mids, large, side="left").astype(np.int64)
