"""peftkern's registered ops: each picks its face (torch, Triton, CUDA C++) per call."""
from peftkern.ops.adamw import adamw8bit_step, adamw_step
from peftkern.ops.logprobs import fused_linear_logprobs
from peftkern.ops.dora import dora_linear
from peftkern.ops.lora import lora_linear
from peftkern.ops.multi_lora import multi_lora_linear
from peftkern.ops.nf4 import nf4_dequantize, nf4_linear

__all__ = ["adamw_step", "adamw8bit_step", "dora_linear", "fused_linear_logprobs", "lora_linear", "multi_lora_linear", "nf4_dequantize",
           "nf4_linear"]
