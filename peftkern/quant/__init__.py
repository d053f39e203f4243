"""4-bit NF4 weights in bitsandbytes' format: quantize, dequantize, import/export."""
from peftkern.quant.nf4 import NF4Weight, quantize_nf4

__all__ = ["NF4Weight", "quantize_nf4"]
