"""peftkern's registered ops: each picks its face (torch, Triton, CUDA C++) per call."""
from peftkern.ops.logprobs import fused_linear_logprobs
from peftkern.ops.lora import lora_linear

__all__ = ["fused_linear_logprobs", "lora_linear"]
