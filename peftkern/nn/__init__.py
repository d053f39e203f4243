"""Drop-in modules built on peftkern's ops."""
from peftkern.nn.dora import DoRALinear
from peftkern.nn.lora import LoRALinear
from peftkern.nn.nf4 import NF4Linear, merge_nf4_lora, quantize_model

__all__ = ["DoRALinear", "LoRALinear", "NF4Linear", "quantize_model", "merge_nf4_lora"]
