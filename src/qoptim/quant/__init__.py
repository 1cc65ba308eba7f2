"""Quantization: of optimizer states (the dynamic maps, block-wise quantize/dequantize) and of
weights (master corrections, stochastic rounding).

Modules:
    maps.py       the dynamic maps (bit-identical to bitsandbytes'), their midpoints and search points
    blockwise.py  block-wise quantize/dequantize in plain torch ops, and BLOCK, the states' block size
    master.py     a 16-bit weight and the correction that holds its fp32 master; stochastic rounding
"""

from .blockwise import BLOCK, QuantState, dequantize_blockwise, quantize_blockwise
from .maps import create_dynamic_map, midpoints, search_points, signed_map, unsigned_map

__all__ = [
    "BLOCK", "QuantState", "create_dynamic_map", "dequantize_blockwise", "midpoints", "quantize_blockwise", "search_points",
    "signed_map", "unsigned_map",
]  # fmt: skip
