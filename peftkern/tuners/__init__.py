"""PEFT-compatible tuners: LoraConfig, get_peft_model, and PEFT's adapter files both ways."""
from peftkern.tuners.config import LoraConfig
from peftkern.tuners.io import AdapterLoadError, load_adapter, save_adapter
from peftkern.tuners.model import PeftKernModel, get_peft_model
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper

__all__ = ["LoraConfig", "get_peft_model", "PeftKernModel", "ModulesToSaveWrapper", "save_adapter", "load_adapter",
           "AdapterLoadError"]
