"""One causal LM advanced a token at a time over its KV cache.

The calls are the ones transformers' ``generate`` makes, so logits agree bit for bit: the prompt
(left-padded) in one forward with position ids counted from the attention mask, the mask dropped
when there is no padding, ``logits_to_keep=1``; then one token per row per step. Works on a plain
transformers ``*ForCausalLM``, a ``PeftKernModel`` (any adapters, an NF4 base) or a PEFT model.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside adapter wrappers (PeftKernModel, PEFT's PeftModel)."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def context_length(model: nn.Module) -> int | None:
    """Positions the model can attend over (``config.max_position_embeddings``; GPT-2's ``n_positions``)."""
    config = getattr(unwrap_causal_lm(model), "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def cache_keyword(module: nn.Module) -> str | None:
    """The keyword under which ``module``'s forward takes a KV cache (``cache`` in newer transformers,
    ``past_key_values`` before), or None when it takes none."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def returned_cache(output):
    """The KV cache a forward returned (``output.cache`` or ``output.past_key_values``), or None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class ModelStepper:
    """``start(input_ids, attention_mask) -> logits [B, V] fp32`` for the next token after each
    (left-padded) prompt; ``advance(tokens [B]) -> logits [B, V]`` after appending one token per row.

    ``forward_kwargs`` go to every forward call (for example ``adapter_names=[...]``, one per row);
    ``context()`` (optional) is entered around every forward call (for example the model's
    ``disable_adapter``, to run it as its base)."""

    def __init__(self, model: nn.Module, forward_kwargs: dict | None = None, context=None):
        self.model = model
        self.forward_kwargs = dict(forward_kwargs or {})
        self.context = context
        params = inspect.signature(unwrap_causal_lm(model).forward).parameters
        self._cache_key = cache_keyword(unwrap_causal_lm(model)) or "past_key_values"
        self._takes_positions = "position_ids" in params
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache = None
        self.mask = None
        self.positions = None
        self._padded = False

    def _call(self, input_ids, attention_mask, position_ids):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, return_dict=True,
                      **self._keep, **self.forward_kwargs)
        if self._takes_positions:
            kwargs["position_ids"] = position_ids
        if self.cache is not None:
            kwargs[self._cache_key] = self.cache
        with self.context() if self.context is not None else contextlib.nullcontext():
            out = self.model(**kwargs)
        self.cache = returned_cache(out)
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    @torch.no_grad()
    def start(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.cache = None
        self.mask = attention_mask
        self._padded = bool((attention_mask == 0).any())  # without padding the mask is left out, as generate does
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.positions = positions[:, -1:]
        return self._call(input_ids, attention_mask if self._padded else None, positions)

    @torch.no_grad()
    def advance(self, tokens: torch.LongTensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("advance() before start()")
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        self.positions = self.positions + 1
        return self._call(tokens[:, None], self.mask if self._padded else None, self.positions)
