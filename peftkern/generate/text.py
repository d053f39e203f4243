"""Text in, text out: ``generate(model, tokenizer, prompts, ...)`` batches the prompts (left padding),
decodes with the KV cache, applies stop strings, and returns one ``Completion`` per prompt."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftkern.generate.forward import ModelStepper, context_length, model_device
from peftkern.generate.loop import decode
from peftkern.generate.prompts import PromptError, as_messages, encode_prompt, left_pad
from peftkern.generate.settings import DecodingSettings, settings_from


@dataclass
class Completion:
    text: str                # decoded, special tokens skipped, cut before the first stop string
    token_ids: list[int]     # generated ids (the end-of-sequence token included when one ended it)
    finish_reason: str       # "eos", "stop" or "length"
    prompt_tokens: int


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config, else the tokenizer's eos token."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_id(tokenizer, eos: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return eos[0] if eos else 0


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops) -> int:
    """Length of the longest end of ``text`` that could still grow into a stop string (not shown yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Streamer:
    """Turns each step's tokens into text deltas per row, never showing a partial character or the
    start of what may become a stop string."""

    def __init__(self, tokenizer, stops, rows: int, on_text):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids = [[] for _ in range(rows)]
        self.shown = [0] * rows
        self.done = [False] * rows

    def __call__(self, tokens: torch.Tensor, ended: torch.Tensor) -> None:
        for row, (tok, end) in enumerate(zip(tokens.tolist(), ended.tolist())):
            if self.done[row]:
                continue
            self.ids[row].append(tok)
            text, stopped = cut_at_stop(self.tokenizer.decode(self.ids[row], skip_special_tokens=True), self.stops)
            if not (end or stopped):
                text = text[:len(text) - _held_back(text, self.stops)]
                text = text.rstrip("\ufffd")
            if len(text) > self.shown[row]:
                self.on_text(row, text[self.shown[row]:])
                self.shown[row] = len(text)
            self.done[row] = bool(end)


def check_fits(n_tokens: int, max_new_tokens: int, context: int | None, where: str) -> None:
    if context is None:
        return
    if n_tokens > context:
        raise PromptError(f"{where}: the prompt has {n_tokens} tokens, longer than the model's context of "
                          f"{context} positions (config.max_position_embeddings)")
    if n_tokens + max_new_tokens > context:
        raise PromptError(f"{where}: the prompt's {n_tokens} tokens + max_new_tokens {max_new_tokens} exceed the "
                          f"model's context of {context} positions; shorten the prompt or lower max_new_tokens")


@torch.no_grad()
def generate(model, tokenizer, prompts, settings: DecodingSettings | None = None, *, processors=(),
             batch_size: int = 16, chat: bool = False, system: str | None = None, scorer=None, on_text=None,
             where=None, adapter_names: list[str] | None = None, **overrides) -> list[Completion]:
    """One Completion per prompt.

    ``prompts``: strings (sent as they are, or as a user turn through the chat template when ``chat``,
    after ``system``) or message lists (always through the chat template). ``settings`` /
    ``overrides``: any DecodingSettings field (``max_new_tokens=32, do_sample=True, top_p=0.9, ...``).
    ``processors``: extra logits processors (constraints, guidance), built for this tokenizer.
    ``scorer(model) -> scorer`` replaces the plain model stepper (contrastive decoding).
    ``on_text(prompt_index, text)`` receives the text as it is generated (streaming).
    ``where``: labels of the prompts for error messages (default "prompt i").
    ``adapter_names``: one adapter name per prompt (``"__base__"``: none), each row run through its
    own adapter in the same batch (a model whose forward takes per-row ``adapter_names``).
    """
    settings = settings_from(settings, **overrides)
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        raise TypeError("prompts must be a list of prompts (strings or message lists); wrap a single one in a list")
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    labels = list(where) if where is not None else [f"prompt {i}" for i in range(len(prompts))]
    if adapter_names is not None:
        if len(adapter_names) != len(prompts):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts")
        if scorer is not None:
            raise ValueError("adapter_names (one adapter per prompt) cannot be combined with a scorer")
    encoded = []
    context = context_length(model)
    for p, label in zip(prompts, labels):
        ids = encode_prompt(tokenizer, as_messages(p, system) if (chat and isinstance(p, str)) else p, label)
        check_fits(len(ids), settings.max_new_tokens, context, label)
        encoded.append(ids)

    eos = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None
    stop_check = None
    if settings.stop:
        def stop_check(row, ids):
            return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), settings.stop)[1]

    was_training = model.training
    model.eval()
    out: list[Completion] = []
    try:
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            ids, mask = left_pad(rows, pad)
            for p in processors:
                if hasattr(p, "prepare"):
                    p.prepare(eos, settings.max_new_tokens)
                if hasattr(p, "reset"):
                    p.reset()
            on_step = None
            if on_text is not None:
                on_step = _Streamer(tokenizer, settings.stop, len(rows), lambda r, t, s=start: on_text(s + r, t))
            if scorer is not None:
                stepper = scorer(model)
            elif adapter_names is not None:
                stepper = ModelStepper(model, {"adapter_names": list(adapter_names[start:start + batch_size])})
            else:
                stepper = ModelStepper(model)
            result = decode(stepper, ids.to(device), mask.to(device), settings, eos_token_ids=eos, pad_token_id=pad,
                            processors=processors, stop_check=stop_check, on_step=on_step, generator=generator)
            for r, row in enumerate(rows):
                gen = result.tokens[r, :result.lengths[r]].tolist()
                text, _ = cut_at_stop(tokenizer.decode(gen, skip_special_tokens=True), settings.stop)
                out.append(Completion(text, gen, result.finish_reasons[r], len(row)))
    finally:
        model.train(was_training)
    return out


def generate_text(model, tokenizer, prompts, settings: DecodingSettings | None = None, **kwargs) -> list[str]:
    """Just the texts of :func:`generate`."""
    return [c.text for c in generate(model, tokenizer, prompts, settings, **kwargs)]
