"""peftkern: fused kernels for parameter-efficient fine-tuning (LoRA, DoRA, QLoRA), 8-bit and paged
AdamW, and chunked log-prob losses, each op with a pure-PyTorch reference."""
__version__ = "0.1.0"

from peftkern import backend, ops, optim, quant  # noqa: E402
from peftkern.nn import DoRALinear, LoRALinear, NF4Linear, quantize_model  # noqa: E402
from peftkern.tuners import (AdaLoraConfig, BitFitConfig, IA3Config, LoraConfig, PeftKernModel, get_peft_model, load_adapter,  # noqa: E402
                             save_adapter)

__all__ = ["__version__", "backend", "ops", "optim", "quant", "DoRALinear", "LoRALinear", "NF4Linear", "quantize_model", "LoraConfig", "IA3Config", "AdaLoraConfig", "BitFitConfig",
           "PeftKernModel", "get_peft_model", "load_adapter", "save_adapter"]
