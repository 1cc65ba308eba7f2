"""The AVX-512 quantizer's first guess (qoptim.kernels.cpu_guess): which maps get one, that
the proof behind it rejects lines that are off, and that the guessing kernel agrees with
``torch.bucketize`` on the floats where a wrong guess would show: around every midpoint and
every bucket edge."""

import numpy as np
import pytest
import torch

from qoptim.kernels import cpu, cpu_guess
from qoptim.kernels.cpu_tables import tables_for
from qoptim.quant.maps import create_dynamic_map, midpoints, signed_map, unsigned_map

CROWDED = torch.cat([torch.linspace(-1, 1, 200), 0.5 + torch.linspace(1e-5, 5e-4, 56)]).sort().values
INFINITE = torch.cat([torch.full((2,), -float("inf")), torch.linspace(-1, 1, 252), torch.full((2,), float("inf"))])
ZEROS = torch.cat([torch.full((3,), -0.0), torch.zeros(1), torch.linspace(1e-3, 1, 252)])


def mids_of(code):
    return midpoints(code).numpy()


@pytest.mark.parametrize("code", [signed_map(), unsigned_map(), torch.linspace(-1, 1, 256)], ids=["signed", "unsigned", "linear"])
def test_the_optimizers_maps_are_guessed(code):
    assert cpu_guess.fit_lines(mids_of(code)) is not None
    assert tables_for(code).guessed


@pytest.mark.parametrize("code", [CROWDED, INFINITE, ZEROS, create_dynamic_map(True, 4)], ids=["crowded", "infinite", "zeros", "dynamic-4"])
def test_maps_without_provable_lines_are_searched(code):
    """No lines for these (many midpoints in a tiny range, infinite midpoints, equal ones,
    midpoints below the first bucket): the kernel takes its exact search instead."""
    assert cpu_guess.fit_lines(mids_of(code)) is None
    assert not tables_for(code).guessed


def test_the_proof_rejects_lines_that_are_off():
    """The fitted guess sits a quarter step off the midpoints' line; moving a bucket's lines
    by a whole step either way, or tilting them by 2%, breaks the proof there."""
    mids = mids_of(signed_map())
    table = cpu_guess.fit_lines(mids).reshape(4, 2, cpu_guess.BUCKETS)
    bucket = 63 - cpu_guess.FIRST_BUCKET  # |u| in [0.5, 2): 71 midpoints
    for negative in (0, 1):
        assert cpu_guess._proven(table, mids, negative, bucket)
        for rows, change in (((1, 3), 1.0), ((1, 3), -1.0), ((0, 2), 1.02), ((0, 2), 0.98)):
            bad = table.copy()
            for row in rows:  # b1 and b2 moved, or a1 and a2 scaled
                if row in (1, 3):
                    bad[row, negative, bucket] += change
                else:
                    bad[row, negative, bucket] *= change
            assert not cpu_guess._proven(bad, mids, negative, bucket), (negative, rows, change)


def neighbourhoods(points, ulps):
    """Every float32 within ``ulps`` steps of each point."""
    bits = np.asarray(points, dtype=np.float32).view(np.int32).astype(np.int64)
    steps = np.arange(-ulps, ulps + 1)
    near = (bits[:, None] + steps[None, :]).ravel()
    near = near[(near >= -(2**31)) & (near < 2**31)].astype(np.int32).view(np.float32)
    return near[np.isfinite(near)]


@pytest.mark.skipif(not cpu.HAS_AVX512, reason="this CPU lacks AVX-512 VBMI")
@pytest.mark.parametrize("code", [signed_map(), unsigned_map(), torch.linspace(-1, 1, 256)], ids=["signed", "unsigned", "linear"])
@pytest.mark.parametrize("finite", [True, False], ids=["promised-finite", "checked"])
def test_the_guessing_kernel_matches_bucketize_near_every_edge(code, finite):
    """Floats within 300 ulps of every midpoint (where the fix-up decides), of every bucket
    edge (where the lines change) and of 0, of both signs; scaled by 1 (the values are u)."""
    mids = mids_of(code)
    edges = [np.uint32((cpu_guess.FIRST_BUCKET + k) << 24).view(np.float32) for k in range(cpu_guess.BUCKETS + 1)]
    points = np.concatenate([mids, edges, np.negative(edges), [0.0, 1.0, -1.0]])
    values = neighbourhoods(points, 300)
    tables = cpu._kernel_tables(tables_for(code))
    assert tables[6]
    out = np.empty(values.size, dtype=np.uint8)
    cpu._quantize(values, np.float32(1.0), finite, tables, out, cpu._AVX512)
    expected = torch.bucketize(torch.from_numpy(values), midpoints(code)).numpy()
    assert np.array_equal(out, expected)
