"""The dynamic maps against bitsandbytes', and the midpoints and search points that decide rounding."""

from pathlib import Path

import numpy as np
import pytest
import torch

import qoptim.functional as F
from qoptim.quant.blockwise import quantize_with_absmax
from qoptim.quant.maps import midpoints, search_points, signed_map, unsigned_map

QMAPS = np.loadtxt(Path(__file__).parents[1] / "data" / "bnb-qmaps.txt", comments="#", dtype=np.float64)


@pytest.mark.parametrize("signed,column", [(True, 1), (False, 2)])
def test_maps_equal_bitsandbytes(signed, column):
    expected = torch.from_numpy(QMAPS[:, column].astype(np.float32))
    code = F.create_dynamic_map(signed=signed)
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.equal(code, expected)


def test_map_landmarks():
    s, u = signed_map(), unsigned_map()
    assert bool((s[1:] > s[:-1]).all()) and bool((u[1:] > u[:-1]).all())
    assert s[127] == 0 and s[255] == 1 and s[0] == pytest.approx(-0.992968738)
    assert u[0] == 0 and u[255] == 1


def test_create_dynamic_map_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_bits"):
        F.create_dynamic_map(total_bits=9)
    with pytest.raises(ValueError, match="max_exponent_bits"):
        F.create_dynamic_map(max_exponent_bits=8)


def test_midpoints_decide_ties_downward():
    code = unsigned_map()
    mids = midpoints(code)
    u = mids[10:12]
    q = quantize_with_absmax(u, torch.ones(1), code, 256)
    assert q.tolist() == [10, 11]


@pytest.mark.parametrize("signed", [True, False])
def test_search_points_are_the_midpoints_then_inf(signed):
    code = signed_map() if signed else unsigned_map()
    points = search_points(code)
    assert points.dtype == torch.float32 and points.shape == (256,) and points.device == code.device
    assert torch.equal(points[:255], midpoints(code)) and points[255] == float("inf")
    assert bool((points[1:] > points[:-1]).all())  # sorted: a search never passes the sentinel
    # as the CPU tables build them today (numpy), bit for bit
    padded = np.append(midpoints(code).numpy(), np.float32(np.inf)).astype(np.float32)
    assert np.array_equal(points.numpy().view(np.uint32), padded.view(np.uint32))


def test_search_points_index_the_nearest_code():
    code = signed_map()
    u = torch.linspace(-1, 1, 10001)
    index = torch.searchsorted(search_points(code), u, side="left")  # points strictly below u
    assert int(index.max()) <= 255
    assert torch.equal(index.to(torch.uint8), quantize_with_absmax(u, torch.ones(1), code, 256 * 64))
