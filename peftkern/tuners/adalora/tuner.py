"""AdaLoRA as a tuner: AdaLoraLinear layers at init_r, one trainable adapter at a time (as PEFT),
the allocation step, the orthogonality regularizer, and PEFT's rank_pattern in the files (tensors
cut to the kept triplets when saved, layers resized to them when loaded)."""
from __future__ import annotations

import torch
from torch import nn

from peftkern.tuners.adalora.allocator import RankAllocator
from peftkern.tuners.adalora.config import DEFAULT_TARGETS, AdaLoraConfig
from peftkern.tuners.adalora.layer import AdaLoraLinear
from peftkern.tuners.layers import adapter_parameters
from peftkern.tuners.lora.tuner import trained_biases
from peftkern.tuners.targeting import Target
from peftkern.tuners.tuner import Slot, Tuner, adapter_stacks


def adalora_layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraLinear]:
    """PEFT's lora_E parameter name (``<path>.lora_E.<adapter>``) -> layer, for every layer holding the adapter."""
    found = {}
    for path, stack in adapter_stacks(model):
        for layer in stack:
            if isinstance(layer, AdaLoraLinear) and adapter_name in layer.lora_A:
                found[f"{path}.lora_E.{adapter_name}"] = layer
    return found


def orthogonal_regularizer(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """mean over A and B factors of ||A A^T - I||_F and ||B^T B - I||_F (PEFT's AdaLoraModel.forward)."""
    terms = []
    for layer in adalora_layers(model, adapter_name).values():
        a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        for cov in (a @ a.t(), b.t() @ b):
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def _strip(key: str, adapter_name: str) -> str:
    return key.replace(f".{adapter_name}", "")


class AdaLoraTuner(Tuner):
    peft_type = "ADALORA"
    config_class = AdaLoraConfig
    default_targets = DEFAULT_TARGETS

    def check_new_adapter(self, wrapped, config: AdaLoraConfig, adapter_name: str) -> None:
        if config.inference_mode:
            return
        trainable = [n for n, c in wrapped.peft_config.items() if c.peft_type == "ADALORA" and not c.inference_mode]
        if trainable:
            raise ValueError(f"AdaLoRA trains one adapter at a time (as PEFT): {trainable[0]!r} is trainable already; "
                             "add the new one with inference_mode=True")

    def make_layer(self, target: Target, adapter_name: str, config: AdaLoraConfig) -> nn.Module:
        layer, result = self.layer_for(target, adapter_name, AdaLoraLinear)
        layer.update_layer(adapter_name, config.init_r, config.lora_alpha, config.lora_dropout, config.init_lora_weights)
        for p in adapter_parameters(layer, adapter_name):
            p.requires_grad_(False)
        return result

    def extra_slots(self, model: nn.Module, config, adapter_name: str) -> dict[str, Slot]:
        return {k: Slot(v) for k, v in trained_biases(self, model, config).items()}

    def extra_trainable(self, model: nn.Module, config, adapter_name: str) -> list:
        return [v for v in trained_biases(self, model, config).values() if isinstance(v, nn.Parameter)]

    # -- files: tensors cut to the kept triplets; layers resized to them on load -----------------
    def layer_slots(self, layer, path: str, adapter_name: str, config: AdaLoraConfig) -> dict[str, Slot]:
        pattern = config.rank_pattern or {}
        mask = pattern.get(f"{path}.lora_E.{adapter_name}", pattern.get(f"{path}.lora_E"))
        rank = layer.lora_A[adapter_name].shape[0]
        keep = None if mask is None or sum(mask) == rank else torch.tensor(mask, dtype=torch.bool)
        slots = {}
        for table in layer.adapter_layer_names:
            p = getattr(layer, table)[adapter_name]
            if keep is None:
                slots[f"{path}.{table}"] = Slot(p)
            else:
                cut = (lambda p=p: p[:, keep.to(p.device)]) if table == "lora_B" else (lambda p=p: p[keep.to(p.device)])
                slots[f"{path}.{table}"] = Slot(p, get=cut)
        return slots

    def config_to_save(self, wrapped, config: AdaLoraConfig, adapter_name: str) -> AdaLoraConfig:
        pattern = config.rank_pattern
        if pattern is not None:
            pattern = {_strip(k, adapter_name): list(v) for k, v in pattern.items()}
        return config.replace(inference_mode=True, rank_pattern=pattern)

    @torch.no_grad()
    def before_load(self, wrapped, config: AdaLoraConfig, adapter_name: str, tensors: dict) -> None:
        """As PEFT: with a rank_pattern, each layer is re-created at its kept rank (ranknum stays init_r)."""
        if not config.rank_pattern:
            return
        layers = adalora_layers(wrapped.model, adapter_name)
        by_stripped = {_strip(k, adapter_name): layer for k, layer in layers.items()}
        for key, mask in config.rank_pattern.items():
            layer = layers.get(key) or by_stripped.get(_strip(key, adapter_name))
            if layer is None:
                raise ValueError(f"AdaLoraConfig.rank_pattern names {key!r}, which is not an AdaLoRA layer of adapter "
                                 f"{adapter_name!r} in this model")
            layer.update_layer(adapter_name, int(sum(mask)), config.lora_alpha, config.lora_dropout,
                               config.init_lora_weights, ranknum=float(config.init_r))
            for p in adapter_parameters(layer, adapter_name):
                p.requires_grad_(False)

    # -- training ----------------------------------------------------------------------------------
    def after_forward(self, wrapped, adapter_name: str, outputs):
        """As PEFT's AdaLoraModel.forward: a loss in the outputs gets orth_reg_weight x the regularizer
        (the trainable adapter only)."""
        config = wrapped.peft_config[adapter_name]
        loss = getattr(outputs, "loss", None)
        if config.inference_mode or not isinstance(loss, torch.Tensor) or config.orth_reg_weight == 0:
            return outputs
        outputs.loss = loss + config.orth_reg_weight * orthogonal_regularizer(wrapped.model, adapter_name)
        return outputs

    def regularization(self, wrapped, adapter_name: str) -> torch.Tensor | None:
        config = wrapped.peft_config[adapter_name]
        if config.inference_mode or config.orth_reg_weight == 0:
            return None
        return config.orth_reg_weight * orthogonal_regularizer(wrapped.model, adapter_name)

    def allocator(self, wrapped, adapter_name: str) -> RankAllocator:
        allocator = wrapped.method_state.get(adapter_name)
        if allocator is None:
            allocator = RankAllocator(wrapped.peft_config[adapter_name], adapter_name,
                                      adalora_layers(wrapped.model, adapter_name))
            wrapped.method_state[adapter_name] = allocator
        return allocator

    def update_and_allocate(self, wrapped, adapter_name: str, global_step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate: after ``optimizer.step()``, before ``zero_grad()``."""
        config = wrapped.peft_config[adapter_name]
        allocator = self.allocator(wrapped, adapter_name)
        final = config.total_step - config.tfinal
        if global_step < final:
            _, pattern = allocator.update_and_allocate(global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == final:
            _, pattern = allocator.update_and_allocate(global_step, force_mask=True)
            config.rank_pattern = pattern
            allocator.reset()
        elif config.rank_pattern:
            allocator.mask_using_rank_pattern(config.rank_pattern)
