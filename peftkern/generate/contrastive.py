"""Contrastive decoding: score tokens by how much more an expert likes them than an amateur.

    score = (1 + beta) log p_E(x) - beta log p_A(x)    for x with p_E(x) >= alpha * max_y p_E(y)
    score = -inf                                       otherwise (the plausibility cut)

(Li et al., 2023, "Contrastive Decoding"; the beta form of O'Brien & Lewis, 2023. beta = 0 is the
expert alone under the cut.) The scores then go through the usual processors, greedy or sampled.

The amateur is one of:
* ``"__base__"``: the expert model with its adapters off;
* an adapter name: the same base with that adapter (the expert keeps its own);
* another model (a smaller local one sharing the tokenizer).

For the first two, expert and amateur share the frozen base weights: with a model that accepts
per-row ``adapter_names`` (PEFT's mixed-batch forward), both run as the two halves of one batch
(``one_batch``), else one after the other on the same weights.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import torch
from torch import nn

from peftkern.generate.forward import ModelStepper

BASE = "__base__"


def contrastive_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = 0.1,
                       beta: float = 0.5) -> torch.Tensor:
    """[B, V] fp32 contrastive scores from the two models' next-token logits [B, V]."""
    if expert_logits.shape != amateur_logits.shape:
        raise ValueError(f"expert logits {tuple(expert_logits.shape)} and amateur logits "
                         f"{tuple(amateur_logits.shape)} differ: the two models must share one vocabulary")
    expert = torch.log_softmax(expert_logits.float(), dim=-1)
    amateur = torch.log_softmax(amateur_logits.float(), dim=-1)
    plausible = expert >= expert.amax(dim=-1, keepdim=True) + math.log(alpha)
    return ((1.0 + beta) * expert - beta * amateur).masked_fill(~plausible, float("-inf"))


def check_strengths(alpha: float, beta: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(f"contrastive alpha (plausibility cut) must be in (0, 1], got {alpha!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0.0):
        raise ValueError(f"contrastive beta (strength) must be a finite number >= 0, got {beta!r}")


class TwoPassScorer:
    """Expert and amateur each with their own KV cache, run one after the other every step."""

    def __init__(self, expert: ModelStepper, amateur: ModelStepper, alpha: float, beta: float):
        self.expert, self.amateur, self.alpha, self.beta = expert, amateur, alpha, beta

    def start(self, input_ids, attention_mask):
        e = self.expert.start(input_ids, attention_mask)
        return contrastive_scores(e, self.amateur.start(input_ids, attention_mask), self.alpha, self.beta)

    def advance(self, tokens):
        e = self.expert.advance(tokens)
        return contrastive_scores(e, self.amateur.advance(tokens), self.alpha, self.beta)


class OneBatchScorer:
    """Expert rows and amateur rows in one forward over the shared base weights: the batch is the
    prompts twice, rows [0, B) with the expert's adapter(s), rows [B, 2B) with the amateur's."""

    def __init__(self, model: nn.Module, expert: str | list[str], amateur: str, alpha: float, beta: float):
        self.stepper = ModelStepper(model)
        self.expert, self.amateur, self.alpha, self.beta = expert, amateur, alpha, beta

    def _split(self, logits):
        half = logits.shape[0] // 2
        return contrastive_scores(logits[:half], logits[half:], self.alpha, self.beta)

    def start(self, input_ids, attention_mask):
        b = input_ids.shape[0]
        self.stepper.forward_kwargs["adapter_names"] = [self.expert] * b + [self.amateur] * b
        return self._split(self.stepper.start(torch.cat([input_ids, input_ids]),
                                              torch.cat([attention_mask, attention_mask])))

    def advance(self, tokens):
        return self._split(self.stepper.advance(torch.cat([tokens, tokens])))


def takes_adapter_names(model: nn.Module) -> bool:
    """Whether ``model(..., adapter_names=[...])`` runs each row with its own adapter."""
    forward = getattr(model, "forward", None)
    if forward is None:
        return False
    if getattr(model, "supports_adapter_names", False):
        return True
    try:
        return "adapter_names" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def adapters_active(model, names):
    """Run ``model`` (a PeftKernModel or PEFT model) with adapter(s) ``names`` active; BASE: none."""
    if names == BASE:
        with model.disable_adapter():
            yield
        return
    before = list(model.active_adapters) if isinstance(model.active_adapters, (list, tuple)) \
        else [model.active_adapters]
    model.set_adapter(names)
    try:
        yield
    finally:
        model.set_adapter(before if len(before) > 1 else before[0])


class Contrastive:
    """``scorer=`` for :func:`peftkern.generate.generate`: contrastive decoding of ``model`` (the
    expert, with its active adapters) against ``amateur``.

    ``amateur``: ``"__base__"`` (default: the expert's base, adapters off), an adapter name of the
    same model, or another ``nn.Module`` causal LM. ``one_batch``: None = when the model supports
    per-row ``adapter_names``; True requires it; False runs the two one after the other."""

    def __init__(self, amateur=BASE, alpha: float = 0.1, beta: float = 0.5, one_batch: bool | None = None):
        check_strengths(alpha, beta)
        self.amateur, self.alpha, self.beta, self.one_batch = amateur, alpha, beta, one_batch

    def __call__(self, model: nn.Module):
        if isinstance(self.amateur, nn.Module):
            if self.one_batch:
                raise ValueError("one_batch needs the amateur to be the same model with other adapters "
                                 "('__base__' or an adapter name), not a separate model")
            return TwoPassScorer(ModelStepper(model), ModelStepper(self.amateur), self.alpha, self.beta)
        if not isinstance(self.amateur, str):
            raise TypeError(f"amateur must be '__base__', an adapter name or a model, got {type(self.amateur).__name__}")
        if not hasattr(model, "peft_config"):
            raise ValueError(f"amateur {self.amateur!r} needs a model with adapters (a PeftKernModel or PEFT model)")
        if self.amateur != BASE and self.amateur not in model.peft_config:
            raise ValueError(f"amateur adapter {self.amateur!r} is not loaded; adapters: {list(model.peft_config)}")
        expert = list(model.active_adapters) if isinstance(model.active_adapters, (list, tuple)) \
            else [model.active_adapters]
        one_batch = takes_adapter_names(model) if self.one_batch is None else self.one_batch
        if one_batch:
            if not takes_adapter_names(model):
                raise ValueError("one_batch=True needs a model whose forward takes per-row adapter_names")
            if len(expert) != 1:
                raise ValueError(f"one_batch runs one adapter per row; the expert has {len(expert)} active: {expert}")
            return OneBatchScorer(model, expert[0], self.amateur, self.alpha, self.beta)
        return TwoPassScorer(ModelStepper(model), ModelStepper(model, context=lambda: adapters_active(model, self.amateur)),
                             self.alpha, self.beta)
