"""Drop-in modules built on peftkern's ops."""
from peftkern.nn.lora import LoRALinear

__all__ = ["LoRALinear"]
