"""peftkern: fused kernels for parameter-efficient fine-tuning (LoRA, DoRA, QLoRA), 8-bit and paged
AdamW, and chunked log-prob losses, each op with a pure-PyTorch reference.

``import peftkern`` loads nothing heavy: every subpackage (``peftkern.losses``, ``peftkern.train``,
``peftkern.nn``, ...) and every name below is imported on first use (PEP 562).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

SUBPACKAGES = ("backend", "ops", "reference", "quant", "nn", "tuners", "losses", "optim", "train", "generate",
               "evaluation", "editing", "data", "models", "kernels", "labeling")
_NAMES = {
    "DoRALinear": "peftkern.nn", "LoRALinear": "peftkern.nn", "NF4Linear": "peftkern.nn",
    "quantize_model": "peftkern.nn",
    "LoraConfig": "peftkern.tuners", "IA3Config": "peftkern.tuners", "AdaLoraConfig": "peftkern.tuners",
    "BitFitConfig": "peftkern.tuners", "BottleneckConfig": "peftkern.tuners", "PeftKernModel": "peftkern.tuners",
    "get_peft_model": "peftkern.tuners",
    "load_adapter": "peftkern.tuners", "save_adapter": "peftkern.tuners",
    "PromptTuningConfig": "peftkern.tuners", "PrefixTuningConfig": "peftkern.tuners",
    "PromptEncoderConfig": "peftkern.tuners",
}

__all__ = ["__version__", *SUBPACKAGES, *_NAMES]


def __getattr__(name: str):
    if name in SUBPACKAGES:
        module = importlib.import_module(f"peftkern.{name}")
    elif name in _NAMES:
        module = getattr(importlib.import_module(_NAMES[name]), name)
    else:
        raise AttributeError(f"module 'peftkern' has no attribute {name!r}")
    globals()[name] = module  # later lookups skip this function
    return module


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
