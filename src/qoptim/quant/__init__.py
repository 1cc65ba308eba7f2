"""Quantization of optimizer states: the dynamic maps and block-wise quantize/dequantize."""

from .blockwise import QuantState, dequantize_blockwise, quantize_blockwise
from .maps import create_dynamic_map, midpoints, signed_map, unsigned_map

__all__ = ["QuantState", "create_dynamic_map", "dequantize_blockwise", "midpoints", "quantize_blockwise", "signed_map", "unsigned_map"]
