"""LoRA and DoRA: config, layers (peftkern.nn's LoRALinear / DoRALinear), tuner, weighted combinations."""
from peftkern.tuners.lora.config import LoraConfig
from peftkern.tuners.lora.tuner import LoraTuner

__all__ = ["LoraConfig", "LoraTuner"]
