"""peftkern's registered ops: each picks its face (torch, Triton, CUDA C++) per call."""
from peftkern.ops.lora import lora_linear

__all__ = ["lora_linear"]
