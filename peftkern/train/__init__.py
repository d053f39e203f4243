"""Trainers and what they share (data, loop, checkpoints, model loading). ``peftkern.train.<module>``
and the names below import on first use (PEP 562), so ``import peftkern.train`` stays light."""
from __future__ import annotations

import importlib
import pkgutil

_NAMES = {
    "TrainConfig": "config", "build_trainer": "run", "Trainer": "loop", "SFTTrainer": "sft", "DPOTrainer": "dpo",
    "KTOTrainer": "kto", "PPOTrainer": "ppo", "RewardTrainer": "rm", "load_pretrained": "pretrained",
    "load_lm": "loading", "load_tokenizer": "loading",
}
MODULES = tuple(m.name for m in pkgutil.iter_modules(__path__))

__all__ = [*_NAMES]


def __getattr__(name: str):
    if name in MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(MODULES))
