"""A first guess of a code index from two lines, for the AVX-512 quantizer (cpu_avx512).

The quantizer's answer for a float ``u`` is ``T(u) = #{midpoints < u}``, a step function. Over
the dynamic maps' midpoints it is close to piecewise linear: the codes of one decade are
evenly spaced, so within a decade ``T`` climbs one step per spacing, and each decade has its
own spacing. The guess evaluates that line instead of searching:

    bucket = the sign and the top 7 exponent bits of u, clamped to 16 buckets per sign
    guess  = min(a1[bucket] * u + b1[bucket], a2[bucket] * u + b2[bucket])   (u >= 0)
    index  = clamp(floor(guess), 0, 255)
    index += midpoints[index] < u                                             (exact fix-up)

A bucket spans two octaves, which is less than a decade (3.3 octaves), so it meets at most
one change of spacing and two lines describe it: the steeper lower one and the flatter
upper one, whose minimum follows ``T`` where the spacing grows with ``u``. Below zero the
spacing shrinks as ``u`` grows, so there the guess is the maximum of its two lines; the
tables hold those lines negated, and the kernel negates the minimum back (one xor with
u's sign bit), so both signs run the same instructions.

Each line passes through midpoints ``(m_i, i + 0.5)`` of a run of evenly spaced ones,
shifted by a quarter step toward the side it errs on (a minimum of tangent lines lies above
a concave step function, a maximum below a convex one). The fix-up is exact wherever the
guess is ``T(u)`` or ``T(u) - 1``; ``fit_lines`` proves that for every float, and gives up on
a map where it cannot (then the kernel searches). The proof: within a bucket the guess is a
monotone function of ``u`` (both slopes are non-negative, and rounding is monotone) and ``T``
is constant between neighbouring midpoints, so checking both ends of every such interval
covers every float in between. The checks evaluate the lines in float64 (exact but for the
final add) and demand a margin of ``MARGIN`` steps, far above the kernel's float32 rounding
error (a few 1e-5 steps).
"""

from __future__ import annotations

import numpy as np

BUCKETS = 16  # per sign: registers of 16 floats, one pair per line coefficient
FIRST_BUCKET = 48  # top 7 exponent bits of the first bucket: |u| from 2**-31 up (smaller ones join it)
MARGIN = 1e-3  # of a step, on both sides of every check


def fit_lines(mids: np.ndarray) -> np.ndarray | None:
    """The guess's tables for sorted float32 midpoints (as the kernel compares with them):
    float32[8, BUCKETS], rows a1, a1 (negative u), b1, b1 (negative u), a2, ..., b2; or None
    when some bucket has no lines that are provably close enough."""
    mids = np.asarray(mids, dtype=np.float32)
    if mids.size < 2 or not np.isfinite(mids).all():
        return None
    table = np.zeros((4, 2, BUCKETS), dtype=np.float32)  # (a1, b1, a2, b2) x (u >= 0, u < 0) x bucket
    for negative in (0, 1):
        for bucket in range(BUCKETS):
            for lines in _candidates(mids, negative, bucket):
                table[:, negative, bucket] = np.array(lines, dtype=np.float64).ravel() * (-1.0 if negative else 1.0)
                if _proven(table, mids, negative, bucket):
                    break
            else:
                return None
    return table.reshape(8, BUCKETS)


def guess(table: np.ndarray, u: float) -> float:
    """The kernel's guess before flooring, in float64 (the final add aside, exact)."""
    table = table.reshape(4, 2, BUCKETS)
    bits = int(np.float32(u).view(np.uint32))
    negative = bits >> 31
    bucket = min(max((bits & 0x7FFFFFFF) >> 24, FIRST_BUCKET), FIRST_BUCKET + BUCKETS - 1) - FIRST_BUCKET
    a1, b1, a2, b2 = (float(x) for x in table[:, negative, bucket])
    low = min(float(u) * a1 + b1, float(u) * a2 + b2)
    return -low if negative else low


def _bucket_range(negative: int, bucket: int) -> tuple[np.float32, np.float32]:
    """Smallest and largest float32 of a bucket (the outer ones reach 0 and the largest float)."""
    top = FIRST_BUCKET + bucket
    low = 0 if bucket == 0 else top << 24
    high = 0x7F7FFFFF if bucket == BUCKETS - 1 else ((top + 1) << 24) - 1
    lo, hi = np.array([low, high], dtype=np.uint32).view(np.float32)
    return (lo, hi) if not negative else (-hi, -lo)


def _inside(mids: np.ndarray, lo: np.float32, hi: np.float32) -> tuple[int, int]:
    """Indices [first, end) of the midpoints within [lo, hi]."""
    return int(np.searchsorted(mids, lo, side="left")), int(np.searchsorted(mids, hi, side="right"))


def _runs(xs: list[float]) -> list[tuple[int, int]]:
    """Maximal runs of evenly spaced points, as (first, last) positions."""
    runs, i = [], 0
    while i < len(xs) - 1:
        step = xs[i + 1] - xs[i]
        j = i + 1
        while j + 1 < len(xs) and abs((xs[j + 1] - xs[j]) - step) <= 1e-3 * step:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _line(mids: np.ndarray, i: int, j: int, shift: float) -> tuple[float, float] | None:
    """The line through (m_i, i + 0.5) and (m_j, j + 0.5), moved up by ``shift`` steps (None
    for equal midpoints)."""
    width = float(mids[j]) - float(mids[i])
    if not width > 0:
        return None
    slope = (j - i) / width
    return slope, i + 0.5 + shift - slope * float(mids[i])


def _candidates(mids: np.ndarray, negative: int, bucket: int):
    """Pairs of lines to try for a bucket, likeliest first: the first and the last run of
    the midpoints in it (and one on each side), shifted a quarter step toward where they err."""
    first, end = _inside(mids, *_bucket_range(negative, bucket))
    if first == end:  # no midpoint inside: T is constant
        yield (0.0, first + 0.5), (0.0, first + 0.5)
        return
    lo, hi = max(first - 1, 0), min(end, mids.size - 1)
    runs = [(lo + i, lo + j) for i, j in _runs([float(m) for m in mids[lo : hi + 1]])]
    quarter = 0.25 if negative else -0.25
    for shift in (quarter, 0.0, quarter / 2, quarter * 1.5):
        for lower in runs[:2]:
            for upper in runs[::-1][:2]:
                lines = _line(mids, *lower, shift), _line(mids, *upper, shift)
                if None not in lines:
                    yield lines


def _proven(table: np.ndarray, mids: np.ndarray, negative: int, bucket: int) -> bool:
    """Whether the guess lands on T(u) or T(u) - 1 (after clamping to 0..255) for every
    float u of the bucket: checked at both ends of each interval where T is constant."""
    lo, hi = _bucket_range(negative, bucket)
    first, end = _inside(mids, lo, hi)
    left = lo
    for t in range(first, end + 1):
        right = hi if t == end else mids[t]  # T = t on [left, right]
        for u in (left, right) if right >= left else ():
            g = guess(table, u)
            for wobble in (-MARGIN, MARGIN):
                index = min(max(np.floor(g + wobble), 0), 255)
                if not t - 1 <= index <= t:
                    return False
        if t < end:
            left = np.nextafter(mids[t], np.float32(np.inf))
    return True
