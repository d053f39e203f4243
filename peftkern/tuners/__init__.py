"""PEFT-compatible tuners: one package per method (lora/, ia3/, adalora/, bitfit/, bottleneck/, and the soft prompts prompt/, prefix/, ptuning/) over a small
shared base; get_peft_model, load_adapter and save_adapter take any method, PEFT's files both ways."""
from peftkern.tuners.adalora import AdaLoraConfig
from peftkern.tuners.bitfit import BitFitConfig
from peftkern.tuners.bottleneck import BottleneckConfig
from peftkern.tuners.config import PeftConfig
from peftkern.tuners.files import AdapterLoadError
from peftkern.tuners.ia3 import IA3Config
from peftkern.tuners.io import load_adapter, save_adapter
from peftkern.tuners.lora import LoraConfig
from peftkern.tuners.methods import TUNERS, config_from_dict, read_config
from peftkern.tuners.model import PeftKernModel, get_peft_model
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper
from peftkern.tuners.prefix import PrefixTuningConfig
from peftkern.tuners.prompt import PromptTuningConfig
from peftkern.tuners.ptuning import PromptEncoderConfig

__all__ = ["PeftConfig", "LoraConfig", "IA3Config", "AdaLoraConfig", "BitFitConfig", "BottleneckConfig", "get_peft_model", "PeftKernModel", "ModulesToSaveWrapper", "save_adapter",
           "load_adapter", "AdapterLoadError", "TUNERS", "config_from_dict", "read_config",
           "PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"]
