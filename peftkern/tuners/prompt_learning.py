"""What the three soft-prompt methods share (prompt tuning, prefix tuning, P-tuning): PEFT's
``PromptLearningConfig`` fields, the model sizes they are filled from, the encoder table on the
model, PEFT's one-tensor file (``prompt_embeddings``) and the input rewriting around the forward.

A soft-prompt adapter adds no layer: its encoder (``model.prompt_encoder[<adapter>]``, PEFT's
attribute name) produces either ``num_virtual_tokens`` input embeddings put before the input
(prompt tuning, P-tuning) or a key/value prefix for every attention layer put in the cache before
the input (prefix tuning). The tuner's ``before_forward`` rewrites the forward's keyword arguments;
the same rewrite runs on the inputs ``generate()`` prepares for each step and in the trainers'
hidden-state path (``PeftKernModel.model_inputs``).

Whether a call starts a sequence or continues one is read from the cache it is given: an empty or
missing cache starts one (the virtual tokens are added), a non-empty one already holds them (only
the attention mask and position ids are shifted by the virtual positions).
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkern.tuners.config import PeftConfig, check_int
from peftkern.tuners.tuner import Injection, Slot, Tuner

ENCODERS = "prompt_encoder"  # the ModuleDict on the model, keyed by adapter name (PEFT's attribute name)
FILE_KEY = "prompt_embeddings"  # PEFT's one key: the encoder's output, folded
IGNORE_INDEX = -100
CACHE_KEYS = ("cache", "past_key_values")  # transformers >= 5.2x calls it cache; older ones past_key_values


@dataclass
class PromptLearningConfig(PeftConfig):
    """PEFT's fields shared by the soft-prompt methods. ``num_virtual_tokens`` is required; the
    model sizes (``token_dim``, ``num_layers``, ``num_attention_heads``,
    ``num_transformer_submodules``) are filled from the model's config as PEFT fills them when left
    None, and checked against the model when given."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    UNSUPPORTED_AT_DEFAULT: ClassVar[dict] = {"modules_to_save": None}

    def validate_method(self) -> None:
        if self.num_virtual_tokens is None:
            raise ValueError(f"{self.field_name('num_virtual_tokens')} is required (the number of virtual tokens, "
                             "a positive integer)")
        check_int(self, "num_virtual_tokens", minimum=1)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            check_int(self, name, minimum=1, allow_none=True)
        check_int(self, "num_transformer_submodules", minimum=1, allow_none=True)
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"{self.field_name('num_transformer_submodules')} = {self.num_transformer_submodules}: "
                             "peftkern's soft prompts are for decoder-only causal LMs (1 submodule); encoder-decoder "
                             "models (2) are not supported")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{self.field_name('task_type')} = {self.task_type!r}: peftkern's soft prompts are for "
                             "causal language models (task_type 'CAUSAL_LM' or None)")


# -- the model's sizes ----------------------------------------------------------------------------

def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"soft prompts need a transformers model with a .config; {type(model).__name__} has none")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_sizes(model: nn.Module) -> dict:
    """hidden size, layers, attention heads, KV heads and head size of ``model`` (PEFT's lookups)."""
    config = text_config(model)
    hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads"))
    layers = _first(config, ("num_hidden_layers", "num_layers", "n_layer"))
    kv_heads = _first(config, ("num_key_value_heads",))
    head_dim = _first(config, ("head_dim",))
    if head_dim is None and hidden and heads:
        head_dim = hidden // heads
    return {"hidden": hidden, "heads": heads, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim}


def fill_common(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """A copy of ``config`` with the model sizes PEFT fills when left None (errors name the field)."""
    sizes = model_sizes(model)
    changes = {}
    for field_name, key in (("num_layers", "layers"), ("token_dim", "hidden"), ("num_attention_heads", "heads")):
        if getattr(config, field_name) is None:
            if sizes[key] is None:
                raise ValueError(f"{config.field_name(field_name)} is None and {type(model).__name__}'s config does "
                                 f"not say it; set it in the config")
            changes[field_name] = sizes[key]
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 1
    return config.replace(**changes)


def cache_key(model: nn.Module) -> str | None:
    """The keyword the model's forward takes its KV cache under, or None when it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((k for k in CACHE_KEYS if k in params), None)


def cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


# -- encoders on the model ----------------------------------------------------------------------

def encoders(model: nn.Module) -> nn.ModuleDict | None:
    table = getattr(model, ENCODERS, None)
    return table if isinstance(table, nn.ModuleDict) else None


def encoder_of(model: nn.Module, adapter_name: str) -> nn.Module:
    return encoders(model)[adapter_name]


def remove_encoder(model: nn.Module, adapter_name: str) -> None:
    table = encoders(model)
    if table is not None and adapter_name in table:
        del table[adapter_name]
        if not len(table):
            delattr(model, ENCODERS)


class FoldableEncoder(nn.Module):
    """Base of the three encoders: ``output()`` [n, width] is what the adapter feeds the model and
    what PEFT's file holds; ``load_folded`` replaces a reparameterization (MLP / LSTM) by a plain
    table of its output, as PEFT saves it and builds it in inference mode. ``embedding`` (an
    ``nn.Embedding``, PEFT's name) is the table the reparameterization, if any, starts from."""

    embedding: nn.Embedding

    def output(self) -> torch.Tensor:
        raise NotImplementedError

    def output_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def load_folded(self, value: torch.Tensor) -> None:
        """Become the plain table ``value`` [n, width] (the reparameterization, if any, dropped)."""
        raise NotImplementedError


def file_slot(encoder: FoldableEncoder) -> Slot:
    """PEFT's ``prompt_embeddings``: the encoder's output, read detached; a loaded value folds the encoder."""
    shape = tuple(encoder.output_shape())
    return Slot(torch.empty(shape, device="meta"), get=lambda: encoder.output().detach(),
                put=encoder.load_folded)


# -- the tuner base -------------------------------------------------------------------------------

class SoftPromptTuner(Tuner):
    """Model-level: no targets, no layers; one encoder per adapter under ``model.prompt_encoder``."""

    layer_kind = "(none: a soft prompt adds no layer)"
    file_prefix = ""  # PEFT's key is "prompt_embeddings", without base_model.model.
    changes_inputs = True
    prepends_positions = True  # its virtual tokens come before the input in the hidden states

    def prepare_config(self, model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
        self.check_model(model)
        return fill_common(config, model)

    def check_model(self, model: nn.Module) -> None:
        if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
            raise TypeError(f"{self.config_class.__name__}: {type(model).__name__} has no input embeddings "
                            "(get_input_embeddings()); soft prompts need a transformers causal LM")
        if self.prepends_positions and "inputs_embeds" not in inspect.signature(model.forward).parameters:
            raise TypeError(f"{self.config_class.__name__}: {type(model).__name__}.forward takes no inputs_embeds; "
                            "the virtual tokens go in as input embeddings, so the model must accept them")

    def check_new_adapter(self, wrapped, config, adapter_name: str) -> None:
        if encoders(wrapped.model) is None and hasattr(wrapped.model, ENCODERS):
            raise ValueError(f"{type(wrapped.model).__name__} already has an attribute {ENCODERS!r} that is not "
                             "peftkern's soft-prompt table")

    def build_encoder(self, model: nn.Module, config) -> FoldableEncoder:
        raise NotImplementedError

    def inject(self, model: nn.Module, config, adapter_name: str) -> Injection:
        journal = Injection(model, adapter_name)
        embedding = model.get_input_embeddings().weight
        encoder = self.build_encoder(model, config).to(embedding.device)
        for p in encoder.parameters():
            p.requires_grad_(False)
        if encoders(model) is None:
            model.add_module(ENCODERS, nn.ModuleDict())
        encoders(model)[adapter_name] = encoder
        journal.undo_steps.append(lambda: remove_encoder(model, adapter_name))
        return journal

    def remove_adapter(self, model: nn.Module, adapter_name: str) -> None:
        remove_encoder(model, adapter_name)

    def find_targets(self, model, config):
        return []

    def extra_trainable(self, model: nn.Module, config, adapter_name: str) -> list[nn.Parameter]:
        table = encoders(model)
        return list(table[adapter_name].parameters()) if table is not None and adapter_name in table else []

    def extra_slots(self, model: nn.Module, config, adapter_name: str) -> dict[str, Slot]:
        return {FILE_KEY: file_slot(encoder_of(model, adapter_name))}

    def check_mergeable(self, wrapped, adapter_name: str) -> None:
        raise ValueError(f"adapter {adapter_name!r} is a soft prompt ({self.peft_type}): its virtual tokens are inputs, "
                         "not weights, and cannot be merged into the model; keep the adapter (save_pretrained), or "
                         "unload() to drop it, or merge only other adapters (merge_and_unload(adapter_names=[...]) "
                         "with this one inactive)")

    def before_forward(self, wrapped, adapter_name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        one_soft_prompt(wrapped, adapter_name)
        if args:  # positional arguments by the model's own forward signature
            names = list(inspect.signature(wrapped.model.forward).parameters)
            kwargs = {**dict(zip(names, args)), **kwargs}
        config = wrapped.peft_config[adapter_name]
        return (), self.rewrite_inputs(wrapped.model, config, encoder_of(wrapped.model, adapter_name), kwargs)

    def rewrite_inputs(self, model: nn.Module, config, encoder: FoldableEncoder, kwargs: dict) -> dict:
        """Prompt tuning and P-tuning: the encoder's output before the input embeddings."""
        return prepend_embeddings(model, encoder.output(), kwargs)

    def virtual_positions(self, config) -> int:
        """Positions this adapter puts before the input in the hidden states the model returns."""
        return config.num_virtual_tokens if self.prepends_positions else 0


# -- rewriting a forward's inputs -----------------------------------------------------------------

def batch_size(kwargs: dict) -> int:
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[0]
    if ids is not None:
        return ids.shape[0]
    raise ValueError("a soft prompt needs input_ids or inputs_embeds in the call")


def the_cache(kwargs: dict):
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:
            return key, kwargs[key]
    return None, None


def shift_mask_and_positions(kwargs: dict, n: int, lead_positions: bool) -> dict:
    """The attention mask gains ``n`` leading ones; position ids move up by ``n`` (with
    ``lead_positions``, virtual tokens in the input get positions 0..n-1 before them); ``cache_position`` is
    dropped (the model counts it from the cache, which holds the virtual positions); token type
    ids are dropped with a warning, as PEFT does."""
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("soft prompts take a 2-D attention_mask [batch, tokens] (0 = padding); got "
                             f"{type(mask).__name__}{'' if not isinstance(mask, torch.Tensor) else list(mask.shape)}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None:
        shifted = positions + n
        if lead_positions:
            lead = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            shifted = torch.cat([lead, shifted], dim=1)
        kwargs["position_ids"] = shifted
    kwargs.pop("cache_position", None)
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("token_type_ids are not used with soft prompts (as in PEFT); ignoring them", stacklevel=4)
        kwargs["token_type_ids"] = None
    return kwargs


def prepend_embeddings(model: nn.Module, prompts: torch.Tensor, kwargs: dict) -> dict:
    """Prompt tuning / P-tuning: ``prompts`` [n, hidden] before the input embeddings of each row;
    the mask, positions and labels (-100 at the virtual positions) extended to match."""
    kwargs = dict(kwargs)
    batch = batch_size(kwargs)
    n = prompts.shape[0]
    _, cache = the_cache(kwargs)
    starting = cache_length(cache) == 0
    kwargs = shift_mask_and_positions(kwargs, n, lead_positions=starting)
    if not starting:
        return kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = model.get_input_embeddings()(kwargs["input_ids"])
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), IGNORE_INDEX), labels], dim=1)
    return kwargs


def one_soft_prompt(wrapped, adapter_name: str) -> None:
    """Several soft prompts at once would need an order between them; refuse instead of guessing."""
    soft = [n for n in wrapped.active_adapters if getattr(wrapped.peft_config[n], "num_virtual_tokens", None)]
    if len(soft) > 1:
        raise ValueError(f"adapters {soft} are all soft prompts; only one soft prompt can be active at a time "
                         "(set_adapter([...]) with one of them, plus any layer adapters)")


__all__ = ["PromptLearningConfig", "SoftPromptTuner", "FoldableEncoder", "prepend_embeddings",
           "shift_mask_and_positions", "model_sizes", "fill_common", "cache_key", "cache_length", "the_cache",
           "batch_size", "encoder_of", "encoders", "one_soft_prompt", "FILE_KEY", "ENCODERS"]
