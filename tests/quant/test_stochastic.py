"""Stochastic rounding of a state to its map's codes (``quant.blockwise.quantize_stochastic``, the
4-bit second moment's rounding, ``quant.formats``): right on average, always one of the two codes
around the value, the floor and the ceiling of the map at its ends, NaN to the last code, and
draws that are the low halves of the hashes whose high halves round the weights."""

from __future__ import annotations

import math

import pytest
import torch

from qoptim.quant.blockwise import quantize_stochastic, quantize_with_absmax, stochastic_steps
from qoptim.quant.formats import FORMATS, STOCHASTIC_ROUNDING, state_map
from qoptim.quant.master import Draw, lowbias32, random_bits, state_random_bits

MAPS = FORMATS[4].map_names


def codes_of(x, name, key=0x1234567, first=0, scale=1.0):
    code = state_map(name)
    absmax = torch.full((x.numel(),), scale)
    return quantize_stochastic(x, absmax, code, 1, Draw(key, first)), code


def test_the_four_bit_format_rounds_its_second_moment_stochastically():
    assert FORMATS[4].unsigned_rounding == STOCHASTIC_ROUNDING and FORMATS[8].unsigned_rounding != STOCHASTIC_ROUNDING


@pytest.mark.parametrize("name", MAPS)
def test_every_value_takes_one_of_the_two_codes_around_it(name):
    code = state_map(name)
    x = torch.rand(20000) * 2 - 1
    q, _ = codes_of(x, name)
    inside = (x >= code[0]) & (x <= code[-1])
    k = torch.bucketize(x, code[1:], right=True)  # the last code at or below x
    assert bool(((q.long() == k) | (q.long() == k + 1))[inside].all())
    assert bool((code[q.long()][x < code[0]] == code[0]).all())  # below the first code: the first
    assert bool((q[x >= code[-1]] == code.numel() - 1).all())


@pytest.mark.parametrize("name", MAPS)
def test_the_codes_are_right_on_average(name):
    """Each value drawn 40,000 times (40,000 indices): the mean of its codes is the value, to
    four standard errors of a two-point draw; round to nearest is off by up to half a gap."""
    code = state_map(name)
    lo, hi = code[5], code[6]
    for t in (0.1, 0.37, 0.5, 0.93):
        value = lo + t * (hi - lo)
        q, _ = codes_of(value.repeat(40000), name, key=int(t * 1000))
        mean = code[q.long()].double().mean()
        sigma = (hi - lo) * math.sqrt(t * (1 - t) / 40000)
        assert abs(mean - value) < 4 * sigma + 1e-9, (t, float(mean), float(value))


def test_codes_exactly_on_the_map_stay_and_the_edges_are_fixed():
    code = state_map("linear4")
    q, _ = codes_of(code.clone(), "linear4")
    assert torch.equal(q.long(), torch.arange(16))
    specials = torch.tensor([0.0, -0.0, 1e-30, -1.0, 2.0, math.inf, -math.inf, math.nan])
    q, _ = codes_of(specials, "linear4")
    assert q.tolist() == [0, 0, 0, 0, 15, 15, 0, 15]  # the floor, the ceiling; NaN to the last, as nearest
    nearest = quantize_with_absmax(specials, torch.ones(8), code, 1)
    assert q[-1] == nearest[-1]


def test_a_zero_scale_gives_the_first_code():
    q = quantize_stochastic(torch.tensor([0.0, 0.0]), torch.zeros(1), state_map("linear4"), 128, Draw(5))
    assert q.tolist() == [0, 0]


def test_the_draws_are_keyed_by_key_and_index_and_only_by_them():
    x = torch.full((4096,), 0.3)
    a, _ = codes_of(x, "linear4", key=1, first=10)
    assert torch.equal(a, codes_of(x, "linear4", key=1, first=10)[0])
    assert not torch.equal(a, codes_of(x, "linear4", key=2, first=10)[0])
    shifted, _ = codes_of(x[:4000], "linear4", key=1, first=106)
    assert torch.equal(a[96:], shifted)  # element i of a tensor from index f draws index f + i: shards agree


def test_state_and_weight_draws_are_the_two_halves_of_one_hash():
    index = torch.arange(100000)
    key = 0xC0FFEE
    whole = lowbias32(index ^ key)
    assert torch.equal(random_bits(key, index) * 65536 + state_random_bits(key, index), whole)
    high, low = random_bits(key, index).double(), state_random_bits(key, index).double()
    assert abs(torch.corrcoef(torch.stack([high, low]))[0, 1]) < 0.02  # not correlated


def test_the_steps_table():
    code = state_map("linear4")
    steps = stochastic_steps(code)
    assert steps.dtype == torch.float32 and steps[:-1].eq(2.0**20).all() and steps[-1] == 0  # 65536 / (1/16)
