"""LoRA / DoRA on a causal LM for the trainers, through ``peftkern.tuners``: add adapters, switch
them off (the reference model), merge them in, save them in PEFT's format."""
from __future__ import annotations

import contextlib

from torch import nn


def add_lora(model: nn.Module, r: int, alpha: float, target_modules, dropout: float = 0.0,
             dora: bool = False) -> nn.Module:
    """Freeze ``model`` and add one trainable adapter ("default") of rank ``r`` to each target.
    ``target_modules``: "all-linear" (every linear but the output head), or comma-separated names."""
    from peftkern.tuners import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, use_dora=dora,
                        task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, config)
    if not wrapped.lora_layers():
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer of the model")
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model runs as its base (the reference policy of DPO / KTO / PPO)."""
    if has_lora(model):
        with model.disable_adapter():
            yield
    else:
        yield


def merge(model: nn.Module) -> nn.Module:
    """The base model with the adapters added into its weights (the adapters removed)."""
    return model.merge_and_unload() if has_lora(model) else model


def save_adapter(model: nn.Module, out_dir: str, base_name: str = "", write: bool = True) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout) in ``out_dir``. Sharded
    (FSDP2) parameters are gathered first, so every process calls this; only those with ``write`` write."""
    from peftkern.tuners.io import write_adapter_files

    if not has_lora(model):
        raise ValueError("this model has no adapters to save")
    name = "default" if "default" in model.peft_config else next(iter(model.peft_config))
    tensors = {}
    for key, t in model.adapter_state_dict(name).items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    if not write:
        return
    config = model.config_to_save(name)
    if base_name and not config.base_model_name_or_path:
        config.base_model_name_or_path = base_name
    write_adapter_files(out_dir, config.to_json(), tensors)
