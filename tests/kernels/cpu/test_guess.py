"""The AVX-512 quantizer's first guess (qoptim.kernels.cpu.guess): which maps get a bin table,
that its guess is T(u) or T(u) - 1 for floats of every bin, and that the guessing kernel agrees
with ``torch.bucketize`` where a wrong guess would show: around every midpoint and every bin
edge."""

import numpy as np
import pytest
import torch

from qoptim.kernels.cpu import guess as cpu_guess
from qoptim.kernels.cpu import paths
from qoptim.kernels.cpu.quantize import quantize
from qoptim.kernels.cpu.tables import tables_for
from qoptim.quant.maps import create_dynamic_map, midpoints, signed_map, unsigned_map

CROWDED = torch.cat([torch.linspace(-1, 1, 200), 0.5 + torch.linspace(1e-5, 5e-4, 56)]).sort().values
INFINITE = torch.cat([torch.full((2,), -float("inf")), torch.linspace(-1, 1, 252), torch.full((2,), float("inf"))])
ZEROS = torch.cat([torch.full((3,), -0.0), torch.zeros(1), torch.linspace(1e-3, 1, 252)])
WIDE = torch.linspace(-1000, 1000, 256)

GUESSED = [signed_map(), unsigned_map(), torch.linspace(-1, 1, 256), create_dynamic_map(True, 4), INFINITE]
GUESSED_IDS = ["signed", "unsigned", "linear", "dynamic-4", "infinite"]


def mids_of(code):
    return midpoints(code).numpy()


@pytest.mark.parametrize("code", GUESSED, ids=GUESSED_IDS)
def test_these_maps_get_a_bin_table(code):
    assert cpu_guess.bin_table(mids_of(code)) is not None
    assert tables_for(code).guessed


@pytest.mark.parametrize("code", [CROWDED, ZEROS, WIDE, create_dynamic_map(False, 4)], ids=["crowded", "zeros", "wide", "unsigned-dynamic-4"])
def test_maps_whose_bins_do_not_fit_are_searched(code):
    """Midpoints closer than 2**-7 of an octave (crowded, equal zeros, the unsigned 4-bit
    dynamic map's top octave), or beyond the clamped range (wide): no table, and the kernel
    takes its exact search instead."""
    assert cpu_guess.bin_table(mids_of(code)) is None
    assert not tables_for(code).guessed


def bin_ends():
    """The lowest and highest float32 of every top-16-bit pattern (the finest bins there are);
    only finite ones, as the kernel settles the others apart."""
    top = np.arange(1 << 16, dtype=np.uint32) << 16
    floats = np.concatenate([top, top | 0xFFFF]).view(np.float32)
    return floats[np.isfinite(floats)]


@pytest.mark.parametrize("code", GUESSED, ids=GUESSED_IDS)
def test_the_guess_is_the_answer_or_one_below_at_both_ends_of_every_bin(code):
    """Every bin is a run of top-16-bit patterns, and T is monotone, so the ends of all the
    patterns bound every float32 (as the table builder checks per bin, but here lane by lane
    through the kernel's arithmetic, clamps and wrap-around offsets)."""
    mids = mids_of(code)
    tables = cpu_guess.bin_table(mids)
    u = bin_ends()
    below = np.searchsorted(mids, u, side="left") - cpu_guess.guess(tables, u).astype(np.int64)
    assert below.min() == 0 and below.max() == 1


def test_a_coarser_row_would_hold_two_midpoints():
    """Each row takes the fewest mantissa bits that keep one midpoint per bin: one bit fewer
    puts two midpoints in some bin of it (here the signed map's top octave, 6 bits)."""
    mids = mids_of(signed_map())
    shift, _, _ = cpu_guess.bin_table(mids)
    top_row = cpu_guess.ROWS - 2  # exponent 126: |u| in [0.5, 1)
    bits = cpu_guess.MANTISSA_BITS - int(shift[top_row])
    assert bits == 6
    low, high = cpu_guess.bin_counts(mids, top_row, bits - 1)
    assert (high - low).max() == 2


def neighbourhoods(points, ulps):
    """Every float32 within ``ulps`` steps of each point."""
    bits = np.asarray(points, dtype=np.float32).view(np.int32).astype(np.int64)
    steps = np.arange(-ulps, ulps + 1)
    near = (bits[:, None] + steps[None, :]).ravel()
    near = near[(near >= -(2**31)) & (near < 2**31)].astype(np.int32).view(np.float32)
    return near[np.isfinite(near)]


@pytest.mark.skipif(not paths.HAS_AVX512, reason="this CPU lacks AVX-512 VBMI")
@pytest.mark.parametrize("code", GUESSED, ids=GUESSED_IDS)
@pytest.mark.parametrize("finite", [True, False], ids=["promised-finite", "checked"])
def test_the_guessing_kernel_matches_bucketize_near_every_edge(code, finite):
    """Floats within 300 ulps of every midpoint (where the fix-up decides) and of 0, 1 and -1,
    and within 2 ulps of every top-16-bit pattern's ends (where bins and rows change); scaled
    by 1 (the values are u)."""
    mids = mids_of(code)
    values = np.concatenate([neighbourhoods(np.concatenate([mids[np.isfinite(mids)], [0.0, 1.0, -1.0]]), 300), neighbourhoods(bin_ends(), 2)])
    tables = tables_for(code)
    assert tables.guessed
    out = np.empty(values.size, dtype=np.uint8)
    quantize(values, np.float32(1.0), finite, tables, out, paths.AVX512)
    expected = torch.bucketize(torch.from_numpy(values), midpoints(code)).numpy()
    assert np.array_equal(out, expected)
