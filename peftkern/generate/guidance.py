"""Classifier guidance (FUDGE, Yang & Klein 2021): at each step, the top-k candidate tokens of every
row are re-ranked by a classifier's (or reward model's, or reward function's) score of the text
they would make, and the rest are dropped:

    score'(x) = score(x) + weight * s(prefix + x)      for x in the top_k of score
    score'(x) = -inf                                   otherwise

With ``s`` a classifier's log-probability of the wanted attribute and weight 1, sampling from the
result is FUDGE's p(x | prefix) p(attribute | prefix + x). A ``transformers.LogitsProcessor``: it
works in ``peftkern.generate`` and in transformers' ``generate``.

``score_fn(prompt_ids, continuation_ids) -> [N] scores`` receives lists of token-id lists (prompt
without padding; the continuation including the candidate). ``text_scorer`` adapts a function of
text, ``classifier_scorer`` a transformers sequence classifier.
"""
from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor


class ClassifierGuidance(LogitsProcessor):
    def __init__(self, score_fn, weight: float = 1.0, top_k: int = 10, pad_token_id: int | None = None):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"guidance top_k must be a positive integer, got {top_k!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"guidance weight must be a finite number, got {weight!r}")
        self.score_fn, self.weight, self.top_k, self.pad_token_id = score_fn, float(weight), top_k, pad_token_id
        self.reset()

    def prepare(self, eos_token_ids=None, max_new_tokens=None) -> None:
        pass

    def reset(self) -> None:
        self._prompt_width = None
        self._last_width = None
        self._prompts = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch, width = input_ids.shape
        if self._last_width is None or width <= self._last_width or batch != len(self._prompts):
            self._prompt_width = width
            rows = input_ids.tolist()
            # the prompt without its left padding (the loop and transformers pad on the left)
            self._prompts = [self._strip(r) for r in rows]
        self._last_width = width
        k = min(self.top_k, scores.shape[-1])
        top = torch.topk(scores, k, dim=-1)
        generated = input_ids[:, self._prompt_width:].tolist()
        prompts, continuations, where = [], [], []
        for row in range(batch):
            for j in range(k):
                if torch.isinf(top.values[row, j]):
                    continue
                prompts.append(self._prompts[row])
                continuations.append(generated[row] + [int(top.indices[row, j])])
                where.append((row, j))
        out = torch.full_like(scores, float("-inf"))
        if not where:
            return out
        s = torch.as_tensor(self.score_fn(prompts, continuations), dtype=scores.dtype, device=scores.device)
        if s.shape != (len(where),):
            raise ValueError(f"guidance score_fn returned shape {tuple(s.shape)} for {len(where)} candidates")
        rows = torch.tensor([r for r, _ in where], device=scores.device)
        cols = torch.tensor([j for _, j in where], device=scores.device)
        out[rows, top.indices[rows, cols]] = top.values[rows, cols] + self.weight * s
        return out

    def _strip(self, row: list[int]) -> list[int]:
        if self.pad_token_id is None:
            return row
        i = 0
        while i < len(row) - 1 and row[i] == self.pad_token_id:
            i += 1
        return row[i:]


def text_scorer(fn, tokenizer):
    """A score_fn from ``fn(prompt_text, continuation_text) -> float`` (a reward function): the
    prompt decoded with its special tokens, the continuation without."""
    def score(prompt_ids, continuation_ids):
        prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
        texts = tokenizer.batch_decode(continuation_ids, skip_special_tokens=True)
        return torch.tensor([float(fn(p, t)) for p, t in zip(prompts, texts)])
    return score


def classifier_scorer(classifier, tokenizer, label: int, with_prompt: bool = False, max_length: int = 512):
    """A score_fn giving ``log p(label | text)`` from a transformers sequence classifier (logits
    [N, labels]) over the continuation's text (or prompt + continuation with ``with_prompt``), in
    the classifier's own ``tokenizer``."""
    def score(prompt_ids, continuation_ids):
        texts = tokenizer.batch_decode(continuation_ids, skip_special_tokens=True)
        if with_prompt:
            texts = [p + t for p, t in zip(tokenizer.batch_decode(prompt_ids, skip_special_tokens=True), texts)]
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            enc = tokenizer([t or " " for t in texts], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
        finally:
            tokenizer.padding_side = side
        device = next(classifier.parameters()).device
        with torch.no_grad():
            logits = classifier(**{k: v.to(device) for k, v in enc.items()}).logits.float()
        return torch.log_softmax(logits, dim=-1)[:, label]
    return score
