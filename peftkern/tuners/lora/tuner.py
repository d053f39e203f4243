"""LoRA (and DoRA, ``use_dora=True``) as a tuner: targets with per-module r / alpha, LoRALinear /
DoRALinear layers, PEFT's key for DoRA's magnitude, and the biases ``bias=`` trains and saves."""
from __future__ import annotations

from torch import nn

from peftkern.tuners.lora.config import DEFAULT_TARGETS, LoraConfig
from peftkern.tuners.lora.layer import is_lora_layer, make_lora_layer
from peftkern.tuners.state_dict import method_view_state
from peftkern.tuners.targeting import Target, pattern_value
from peftkern.tuners.tuner import Slot, Tuner, adapter_stacks

MAGNITUDE = "lora_magnitude_vector"


class LoraTuner(Tuner):
    peft_type = "LORA"
    config_class = LoraConfig
    default_targets = DEFAULT_TARGETS

    def target_options(self, config: LoraConfig, name: str) -> dict:
        return {"r": pattern_value(config.rank_pattern, name, config.r),
                "lora_alpha": pattern_value(config.alpha_pattern, name, config.lora_alpha)}

    def make_layer(self, target: Target, adapter_name: str, config: LoraConfig) -> nn.Module:
        return make_lora_layer(target.module, self.own_layer(target.module), adapter_name, target.options["r"],
                               target.options["lora_alpha"], config)

    def checkpoint_key(self, key: str) -> str:
        """PEFT stores DoRA's magnitude as ``lora_magnitude_vector`` (no ``.weight``)."""
        suffix = f".{MAGNITUDE}.weight"
        return key[: -len(".weight")] if key.endswith(suffix) else key

    def extra_slots(self, model: nn.Module, config, adapter_name: str) -> dict[str, Slot]:
        return {k: Slot(v) for k, v in trained_biases(self, model, config).items()}

    def extra_trainable(self, model: nn.Module, config, adapter_name: str) -> list:
        return [v for v in trained_biases(self, model, config).values() if isinstance(v, nn.Parameter)]


def trained_biases(tuner: Tuner, model: nn.Module, config) -> dict[str, object]:
    """The biases ``config.bias`` trains in place and saves, as PEFT (LoRA and AdaLoRA): "all": every
    bias of the model; "lora_only": those of the modules this method adapts. Keys as PEFT's."""
    if config.bias == "none":
        return {}
    state = method_view_state(model, tuner.peft_type)
    if config.bias == "all":
        return {k: v for k, v in state.items() if k == "bias" or k.endswith(".bias")}
    keys = {}
    for path, stack in adapter_stacks(model):
        if tuner.own_layer(stack[0]) is not None and f"{path}.base_layer.bias" in state:  # any adapter's, as PEFT
            keys[f"{path}.base_layer.bias"] = state[f"{path}.base_layer.bias"]
    return keys


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) of every LoRA-family layer (the path of the module it adapts)."""
    found = []
    for path, stack in adapter_stacks(model):
        found.extend((path, m) for m in stack if is_lora_layer(m))
    return found
