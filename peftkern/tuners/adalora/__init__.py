"""AdaLoRA: config, AdaLoraLinear (SVD form through the fused LoRA op), rank allocator, tuner."""
from peftkern.tuners.adalora.config import AdaLoraConfig
from peftkern.tuners.adalora.layer import AdaLoraLinear
from peftkern.tuners.adalora.tuner import AdaLoraTuner

__all__ = ["AdaLoraConfig", "AdaLoraLinear", "AdaLoraTuner"]
