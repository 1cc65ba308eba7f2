"""bitsandbytes.functional's quantization names, so ``qoptim.functional`` can stand in for it."""

from .quant.blockwise import QuantState, dequantize_blockwise, quantize_blockwise
from .quant.maps import create_dynamic_map

__all__ = ["QuantState", "create_dynamic_map", "dequantize_blockwise", "quantize_blockwise"]
