"""Bottleneck adapters as a tuner: the transformer blocks are found by their structure (a module
list whose blocks have an attention child, ``self_attn`` or ``attn``, and an ``mlp``), so Llama,
Qwen2, Mistral and GPT-2 work without a per-model table; the placement picks the sub-layers:

    houlsby:   <block>.<attention> and <block>.mlp, serial on their outputs
    pfeiffer:  <block> itself, serial on its output (the feed-forward output plus the block's
               residual, AdapterHub's original_ln_before=True); original_ln_before=False: <block>.mlp
    parallel:  <block>.mlp, reading its input (He et al.)
"""
from __future__ import annotations

from torch import nn

from peftkern.tuners.bottleneck.config import BottleneckConfig
from peftkern.tuners.bottleneck.layer import BottleneckLayer
from peftkern.tuners.layers import adapter_parameters, is_adapter_layer
from peftkern.tuners.targeting import Target
from peftkern.tuners.tuner import Tuner

ATTENTION_NAMES = ("self_attn", "attn")


def _attention_name(block: nn.Module) -> str | None:
    return next((n for n in ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(path of the module list, its blocks): the first nn.ModuleList whose every entry has an
    attention child and an ``mlp``. A ValueError naming the model when there is none."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                _attention_name(_plain(b)) is not None and isinstance(getattr(_plain(b), "mlp", None), nn.Module)
                for b in module):
            return path, list(module)
    raise ValueError(f"BottleneckConfig: cannot find the transformer blocks of {type(model).__name__}: no "
                     "nn.ModuleList of blocks with an attention child ('self_attn' or 'attn') and an 'mlp' child")


def _plain(module: nn.Module) -> nn.Module:
    """A block, or the block under this method's own layer (Pfeiffer wraps whole blocks)."""
    return module.base_layer if isinstance(module, BottleneckLayer) else module


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"BottleneckConfig: cannot read the hidden size of {type(model).__name__} "
                         "(no config.hidden_size or config.n_embd)")
    return size


def parameter_count(hidden: int, bottleneck: int, placement: str, layers: int) -> dict:
    """Adapter parameters: per adapter 2 * hidden * bottleneck + bottleneck + hidden (two linears
    with biases); Houlsby has two adapters per block, Pfeiffer and parallel one."""
    per_adapter = 2 * hidden * bottleneck + bottleneck + hidden
    per_block = per_adapter * (2 if placement == "houlsby" else 1)
    return {"per_adapter": per_adapter, "per_block": per_block, "total": per_block * layers}


class BottleneckTuner(Tuner):
    peft_type = "BOTTLENECK"
    config_class = BottleneckConfig
    layer_kind = "transformer blocks (attention, mlp)"

    def prepare_config(self, model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
        return config.replace()

    def find_targets(self, model: nn.Module, config: BottleneckConfig) -> list[Target]:
        """Every sub-layer the placement adapts, checked before the model changes: the blocks exist,
        target_layers are in range, the bottleneck is at least 1, and no target already holds
        another method's layers inside it (their paths would move)."""
        path, blocks = find_blocks(model)
        hidden = hidden_size(model)
        bottleneck = config.bottleneck_for(hidden)
        if bottleneck < 1:
            raise ValueError(f"BottleneckConfig.reduction_factor = {config.reduction_factor!r} leaves a bottleneck of "
                             f"{bottleneck} for hidden size {hidden}; use a reduction factor <= {hidden}")
        layers = config.target_layers if config.target_layers is not None else list(range(len(blocks)))
        bad = [i for i in layers if i >= len(blocks)]
        if bad:
            raise ValueError(f"BottleneckConfig.target_layers {bad} out of range: {type(model).__name__} has "
                             f"{len(blocks)} blocks ({path})")
        options = {"hidden": hidden, "bottleneck": bottleneck}
        targets = []
        for i in layers:
            block = _plain(blocks[i])
            base = f"{path}.{i}" if path else str(i)
            wraps_blocks = config.placement == "pfeiffer" and config.serial_input_includes_residual
            if block is not blocks[i] and not wraps_blocks:
                raise ValueError(f"block {base!r} is wrapped by a Pfeiffer bottleneck adapter; placement "
                                 f"{config.placement!r} adapts its sub-layers, which would move their paths: add "
                                 "it before the Pfeiffer adapter, or use one placement")
            if config.placement == "houlsby":
                names = [f"{base}.{_attention_name(block)}", f"{base}.mlp"]
            elif config.placement == "pfeiffer" and config.serial_input_includes_residual:
                names = [base]
            else:
                names = [f"{base}.mlp"]
            for name in names:
                module = model.get_submodule(name)
                inner = [n for n, m in _plain(module).named_modules() if n and is_adapter_layer(m)]
                if inner:
                    raise ValueError(f"bottleneck adapters wrap {name!r}, which already holds adapter layers of "
                                     f"another method ({', '.join(inner[:3])}); add the bottleneck adapter to "
                                     "sub-layers other methods do not adapt (e.g. placement 'parallel' with LoRA "
                                     "on attention), or add it first")
                targets.append(Target(name, module, {**options, "parallel": config.placement == "parallel"}))
        return targets

    def align_fan_in_fan_out(self, config, targets) -> None:
        return None

    def make_layer(self, target: Target, adapter_name: str, config: BottleneckConfig) -> nn.Module:
        opts = target.options
        layer, result = self.layer_for(target, adapter_name,
                                       lambda module: BottleneckLayer(module, opts["hidden"], opts["parallel"]))
        if layer.parallel != opts["parallel"]:
            raise ValueError(f"{target.name!r} already holds {'parallel' if layer.parallel else 'serial'} bottleneck "
                             f"adapters; adapter {adapter_name!r} is {'parallel' if opts['parallel'] else 'serial'} "
                             "(placements differ on one module)")
        layer.update_layer(adapter_name, opts["bottleneck"], config.scaling, config.activation, config.init_weights)
        for p in adapter_parameters(layer, adapter_name):
            p.requires_grad_(False)
        return result

    def check_mergeable(self, wrapped, adapter_name: str) -> None:
        raise ValueError(f"adapter {adapter_name!r} is a bottleneck adapter: it is non-linear and cannot be merged "
                         "into the base weights; use unload() to remove it, or keep it")

    def describe_parameters(self, wrapped, adapter_name: str) -> str:
        """One line for print_trainable_parameters: bottleneck, adapters per block, per block and total."""
        config = wrapped.peft_config[adapter_name]
        layers = [m for m in wrapped.modules() if isinstance(m, BottleneckLayer) and adapter_name in m.adapter_down]
        if not layers:
            return ""
        hidden = layers[0].hidden
        bottleneck = layers[0].adapter_down[adapter_name].out_features
        blocks = len(layers) // (2 if config.placement == "houlsby" else 1)
        count = parameter_count(hidden, bottleneck, config.placement, blocks)
        return (f"bottleneck adapter {adapter_name!r}: {config.placement}, hidden {hidden} -> bottleneck {bottleneck} "
                f"(reduction factor {hidden / bottleneck:g}), {count['per_adapter']:,d} params per adapter, "
                f"{count['per_block']:,d} per block, {count['total']:,d} over {blocks} blocks")
