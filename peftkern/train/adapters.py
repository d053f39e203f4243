"""Adapters on a causal LM for the trainers, through ``peftkern.tuners``: build the method ``--peft``
names (LoRA / DoRA, (IA)^3, AdaLoRA, BitFit, bottleneck adapters; soft prompts: prompt tuning, prefix tuning, P-tuning), switch it off (the reference model), merge it in,
save it in PEFT's format. AdaLoRA's allocation step and orthogonality regularizer ride on the
optimizer's step hooks, so every trainer's loop runs them without knowing the method."""
from __future__ import annotations

import contextlib
import weakref
from types import SimpleNamespace

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from peftkern.tuners import (AdaLoraConfig, BitFitConfig, BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                             PromptEncoderConfig, PromptTuningConfig, get_peft_model)
from peftkern.tuners.files import write_adapter_files
from peftkern.tuners.methods import tuner_for


def uses_adapters(cfg) -> bool:
    """Whether ``cfg`` trains adapters (every method but LoRA with rank 0, which trains every weight)."""
    return cfg.peft != "lora" or cfg.lora_r > 0


def _names(text: str):
    """A comma-separated flag value as a list of names ("all-linear" stays a string)."""
    if text == "all-linear":
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def peft_config(cfg, model: nn.Module):
    """The tuner config the run's settings describe (errors name the flag)."""
    targets = _names(cfg.target_modules)
    try:
        if cfg.peft == "lora":
            return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=targets, use_dora=cfg.dora, task_type="CAUSAL_LM")
        if cfg.peft == "ia3":
            return IA3Config(task_type="CAUSAL_LM",
                             target_modules=None if cfg.ia3_target_modules == "default" else _names(cfg.ia3_target_modules),
                             feedforward_modules=None if cfg.ia3_feedforward_modules == "default"
                             else _names(cfg.ia3_feedforward_modules))
        if cfg.peft == "adalora":
            return AdaLoraConfig(task_type="CAUSAL_LM", target_modules=targets, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout, init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r,
                                 tinit=cfg.adalora_tinit, tfinal=cfg.adalora_tfinal, deltaT=cfg.adalora_delta_t,
                                 beta1=cfg.adalora_beta1, beta2=cfg.adalora_beta2,
                                 orth_reg_weight=cfg.adalora_orth_reg_weight,
                                 total_step=cfg.adalora_total_step or cfg.max_steps)
        if cfg.peft == "bitfit":
            if cfg.bitfit_target_modules != "all":
                return BitFitConfig(task_type="CAUSAL_LM", target_modules=_names(cfg.bitfit_target_modules))
            has_bias = any(n.endswith(".bias") for n, _ in model.named_parameters())
            return BitFitConfig(task_type="CAUSAL_LM", target_modules=None if has_bias else targets)
        if cfg.peft == "bottleneck":
            return BottleneckConfig(task_type="CAUSAL_LM", placement=cfg.placement,
                                    reduction_factor=cfg.reduction_factor,
                                    non_linearity=cfg.bottleneck_non_linearity, scaling=cfg.bottleneck_scaling)
        if cfg.peft in ("prompt", "prefix", "ptuning"):
            return soft_prompt_config(cfg)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"--peft {cfg.peft}: {exc}") from None
    raise ValueError(f"--peft must be one of lora, ia3, adalora, bitfit, bottleneck, prompt, prefix, ptuning; got {cfg.peft!r}")


def soft_prompt_config(cfg):
    """--peft prompt|prefix|ptuning: PEFT's config of the soft prompt (the TEXT init reads the run's tokenizer)."""
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    hidden = dict(encoder_hidden_size=cfg.encoder_hidden_size or None)
    if cfg.peft == "prompt":
        text = cfg.prompt_tuning_init == "TEXT"
        if cfg.prompt_tuning_init_text and not text:
            raise ValueError("--prompt-tuning-init-text is for --prompt-tuning-init TEXT")
        return PromptTuningConfig(**common, prompt_tuning_init=cfg.prompt_tuning_init,
                                  prompt_tuning_init_text=cfg.prompt_tuning_init_text if text else None,
                                  tokenizer_name_or_path=(cfg.tokenizer or cfg.model) if text else None)
    if cfg.peft == "prefix":
        return PrefixTuningConfig(**common, **hidden, prefix_projection=cfg.prefix_projection)
    return PromptEncoderConfig(**common, **hidden, encoder_reparameterization_type=cfg.ptuning_encoder_type,
                               encoder_num_layers=cfg.ptuning_encoder_num_layers)


def add_adapters(model: nn.Module, cfg) -> nn.Module:
    """Freeze ``model`` and add one trainable adapter ("default") of the method ``cfg.peft`` names."""
    wrapped = get_peft_model(model, peft_config(cfg, model))
    if cfg.peft == "adalora":
        attach_adalora_steps(wrapped)
    return wrapped


def add_lora(model: nn.Module, r: int, alpha: float, target_modules, dropout: float = 0.0,
             dora: bool = False) -> nn.Module:
    """Freeze ``model`` and add one trainable LoRA (or DoRA) adapter ("default") of rank ``r``.
    ``target_modules``: "all-linear" (every linear but the output head), or comma-separated names."""
    return add_adapters(model, SimpleNamespace(peft="lora", lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                                               target_modules=target_modules, dora=dora))


# -- AdaLoRA in any trainer: the optimizer's step hooks -----------------------------------------------

def attach_adalora_steps(wrapped: nn.Module) -> None:
    """Around every ``optimizer.step()`` over this model's AdaLoRA parameters: before it, the
    orthogonality regularizer's gradient (orth_reg_weight x d/dθ of PEFT's regularizer) is added to
    the gradients (PEFT adds the term to the loss; here it joins after gradient clipping); after it,
    ``update_and_allocate(step)`` runs (before ``zero_grad``, as PEFT asks), with step the number of
    optimizer steps taken before this one, read from the optimizer's state so a resumed run continues
    the schedule."""
    names = [n for n, c in wrapped.peft_config.items() if c.peft_type == "ADALORA" and not c.inference_mode]
    if not names:
        return
    owner = weakref.ref(wrapped)
    ids = {id(p) for p in wrapped.parameters() if p.requires_grad}
    counter = {"steps": 0}

    def ours(optimizer) -> bool:
        return any(id(p) in ids for group in optimizer.param_groups for p in group["params"])

    def before(optimizer, args, kwargs):
        model = owner()
        if model is None:
            handles[0].remove()
            return
        if not ours(optimizer):
            return
        with torch.enable_grad():
            for name in names:
                term = tuner_for(model.peft_config[name]).regularization(model, name)
                if term is not None:
                    term.backward()

    def after(optimizer, args, kwargs):
        model = owner()
        if model is None:
            handles[1].remove()
            return
        if not ours(optimizer):
            return
        step = _steps_taken(optimizer, ids)
        counter["steps"] = counter["steps"] + 1 if step is None else step
        model.update_and_allocate(counter["steps"] - 1)

    handles = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]


def _steps_taken(optimizer, ids: set[int]) -> int | None:
    """The optimizer's own step count for one of our parameters (after this step), if it keeps one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in ids and "step" in optimizer.state.get(p, {}):
                step = optimizer.state[p]["step"]
                return int(step.item() if isinstance(step, torch.Tensor) else step)
    return None


# -- the reference model, merging, saving ---------------------------------------------------------

def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries adapters of any method (a PeftKernModel)."""
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
