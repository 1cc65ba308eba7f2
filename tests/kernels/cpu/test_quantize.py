"""The kernels' table lookups (dequantizing) and their exact quantizer (qoptim.kernels.cpu.quantize),
on each path, against the map itself and ``torch.bucketize``."""

import numpy as np
import torch

from qoptim.kernels.cpu.quantize import lookup, quantize
from qoptim.kernels.cpu.tables import tables_for
from qoptim.quant.maps import midpoints, signed_map, unsigned_map


def test_quantizer_matches_bucketize_on_every_kind_of_float(path):
    """The table quantizer itself, on random bit patterns (NaN, inf, subnormals, -0 included),
    on every midpoint and its float neighbours; sizes that leave every kind of remainder to
    the scalar tail of a vectorized path."""
    rng = np.random.default_rng(0)
    crowded = torch.cat([torch.linspace(-1, 1, 200), 0.5 + torch.linspace(1e-5, 5e-4, 56)]).sort().values
    infinite = torch.cat([torch.full((2,), -float("inf")), torch.linspace(-1, 1, 252), torch.full((2,), float("inf"))])
    zeros = torch.cat([torch.full((3,), -0.0), torch.zeros(1), torch.linspace(1e-3, 1, 252)])  # midpoints -0.0 and 0.0
    for code in (signed_map(), unsigned_map(), torch.linspace(-1, 1, 256), crowded, infinite, zeros):
        tables = tables_for(code)
        mids = midpoints(code).numpy()
        edges = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]).astype(np.float32)
        specials = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45], dtype=np.float32)
        noise = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
        values = np.concatenate([edges, specials, noise, rng.standard_normal(50_000).astype(np.float32)])
        for inv, size in ((1.0, values.size), (3.7, values.size), (1.0, 255), (1.0, 7)):
            inv = np.float32(inv)
            out = np.empty(size, dtype=np.uint8)
            quantize(values[:size], inv, False, tables, out, path)
            with np.errstate(over="ignore", invalid="ignore"):
                scaled = values[:size] * inv
            expected = torch.bucketize(torch.from_numpy(scaled), midpoints(code)).numpy()
            assert np.array_equal(out, expected)


def test_lookup_matches_the_map(path):
    """Dequantizing: every code, in runs that leave every kind of remainder to the scalar tail."""
    rng = np.random.default_rng(0)
    for code in (signed_map(), unsigned_map()):
        tables = tables_for(code)
        q = np.concatenate([np.arange(256, dtype=np.uint8), rng.integers(0, 256, 5000).astype(np.uint8)])
        for size in (q.size, 256, 255, 63, 1):
            out = np.empty(size, dtype=np.float32)
            lookup(q[:size], tables, out, path)
            assert np.array_equal(out.view(np.uint32), tables.code[q[:size]].view(np.uint32))
