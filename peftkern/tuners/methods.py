"""The methods peftkern's tuners know, by PEFT's ``peft_type``: the one place a config's type picks
its tuner. A new method adds its folder under ``tuners/`` and one entry here."""
from __future__ import annotations

import os

from peftkern.tuners.config import PeftConfig, read_config_file
from peftkern.tuners.adalora import AdaLoraTuner
from peftkern.tuners.bitfit import BitFitTuner
from peftkern.tuners.bottleneck import BottleneckTuner
from peftkern.tuners.ia3 import IA3Tuner
from peftkern.tuners.lora import LoraTuner
from peftkern.tuners.prefix import PrefixTuningTuner
from peftkern.tuners.prompt import PromptTuningTuner
from peftkern.tuners.ptuning import PTuningTuner
from peftkern.tuners.tuner import Tuner

TUNERS: dict[str, Tuner] = {t.peft_type: t for t in (LoraTuner(), IA3Tuner(), AdaLoraTuner(), BitFitTuner(),
                                                   BottleneckTuner())}
TUNERS.update({t.peft_type: t for t in (PromptTuningTuner(), PrefixTuningTuner(), PTuningTuner())})


def tuner_for(config: PeftConfig) -> Tuner:
    """The tuner of ``config``'s method (a TypeError naming the known methods otherwise)."""
    tuner = TUNERS.get(getattr(config, "peft_type", None))
    if tuner is None or not isinstance(config, tuner.config_class):
        known = ", ".join(f"{t.config_class.__name__} ({k})" for k, t in TUNERS.items())
        raise TypeError(f"config must be a peftkern adapter config ({known}), got {type(config).__name__}")
    return tuner


def config_from_dict(data: dict, source: str = "config") -> PeftConfig:
    """The config ``data`` describes, of the class its ``peft_type`` names (PEFT's files carry it)."""
    if not isinstance(data, dict):
        raise TypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
    kind = data.get("peft_type")
    if kind not in TUNERS:
        raise ValueError(f"{source}: peft_type {kind!r} is not a method peftkern implements "
                         f"(known: {', '.join(TUNERS)})")
    return TUNERS[kind].config_class.from_dict(data, source)


def read_config(directory: str | os.PathLike) -> PeftConfig:
    """The config in ``directory/adapter_config.json``, whatever its method."""
    path, data = read_config_file(directory)
    return config_from_dict(data, path)
