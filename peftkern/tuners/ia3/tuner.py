"""(IA)^3 as a tuner: PEFT's default targets and feed-forward modules per model type, IA3Linear
layers, the feed-forward rule per target."""
from __future__ import annotations

import re

from torch import nn

from peftkern.tuners.ia3.config import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS, IA3Config
from peftkern.tuners.ia3.layer import IA3Linear
from peftkern.tuners.layers import adapter_parameters
from peftkern.tuners.targeting import Target, model_type
from peftkern.tuners.tuner import Tuner


def is_feedforward(config: IA3Config, name: str) -> bool:
    """PEFT's rule: a regex ``fullmatch``es the module name, or the name ends with a listed entry."""
    ff = config.feedforward_modules or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(entry) for entry in ff)


class IA3Tuner(Tuner):
    peft_type = "IA3"
    config_class = IA3Config
    default_targets = DEFAULT_TARGETS

    def prepare_config(self, model: nn.Module, config: IA3Config) -> IA3Config:
        """As PEFT: with no feedforward_modules, the model type's default ones."""
        if config.feedforward_modules is None:
            kind = model_type(model)
            if kind not in DEFAULT_FEEDFORWARD:
                raise ValueError(f"IA3Config.feedforward_modules is None and peftkern knows no default for model type "
                                 f"{kind!r}; pass feedforward_modules (a list, possibly empty)")
            config = config.replace(feedforward_modules=list(DEFAULT_FEEDFORWARD[kind]))
        return super().prepare_config(model, config)

    def target_options(self, config: IA3Config, name: str) -> dict:
        return {"is_feedforward": is_feedforward(config, name)}

    def make_layer(self, target: Target, adapter_name: str, config: IA3Config) -> nn.Module:
        ff = target.options["is_feedforward"]
        layer, result = self.layer_for(target, adapter_name, lambda module: IA3Linear(module, ff))
        if layer.is_feedforward != ff:
            raise ValueError(f"{target.name!r} already holds (IA)^3 adapters that scale its "
                             f"{'input' if layer.is_feedforward else 'output'}; adapter {adapter_name!r} "
                             f"would scale its {'input' if ff else 'output'} (feedforward_modules differ)")
        layer.update_layer(adapter_name, config.init_ia3_weights)
        for p in adapter_parameters(layer, adapter_name):
            p.requires_grad_(False)
        return result
