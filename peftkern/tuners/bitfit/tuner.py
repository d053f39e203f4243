"""BitFit as a tuner: every biased module (or the chosen ones) gets a BitFitLayer; files hold the
full trained biases under ``base_model.model.<module>.bias``."""
from __future__ import annotations

from torch import nn

from peftkern.tuners.bitfit.config import BitFitConfig
from peftkern.tuners.bitfit.layer import BitFitLayer, bias_size
from peftkern.tuners.layers import adapter_parameters, is_linear_like, plain_base
from peftkern.tuners.targeting import Target, candidate_modules
from peftkern.tuners.tuner import Slot, Tuner


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(plain_base(module), "bias", None), nn.Parameter)


class BitFitTuner(Tuner):
    peft_type = "BITFIT"
    config_class = BitFitConfig
    layer_kind = "modules with a bias (or linear modules, which get one)"

    def prepare_config(self, model: nn.Module, config: BitFitConfig) -> BitFitConfig:
        """target_modules None: every module that holds a bias, by its full name."""
        if config.target_modules is None:
            names = sorted(n for n, m in candidate_modules(model) if has_bias(m) and self.accepts(m))
            if not names:
                raise ValueError(f"BitFitConfig.target_modules is None (every module with a bias) but "
                                 f"{type(model).__name__} has no biases; name the linear modules to give one")
            config = config.replace(target_modules=names)
        return super().prepare_config(model, config)

    def accepts(self, module: nn.Module) -> bool:
        base = plain_base(module)
        if isinstance(base, (nn.modules.conv._ConvNd, nn.Embedding)):
            return False  # their bias is not on the last dimension / they have none
        return (has_bias(module) or is_linear_like(module)) and bias_size(base) is not None

    def make_layer(self, target: Target, adapter_name: str, config: BitFitConfig) -> nn.Module:
        layer, result = self.layer_for(target, adapter_name, BitFitLayer)
        layer.update_layer(adapter_name)
        for p in adapter_parameters(layer, adapter_name):
            p.requires_grad_(False)
        return result

    def layer_slots(self, layer: BitFitLayer, path: str, adapter_name: str, config) -> dict[str, Slot]:
        return {f"{path}.bias": Slot(layer.bitfit_bias[adapter_name])}
