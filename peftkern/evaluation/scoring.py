"""Log-probabilities of texts and completions under a model, and reward scorers, for the suites.

Log-probs come from peftkern's trainer path (``LMWithHeads``: the last hidden states through the fused
log-prob op, never the [tokens, vocab] logits), so they are the numbers DPO's evaluation sees."""
from __future__ import annotations

import torch

from peftkern.generate.forward import context_length, model_device
from peftkern.train.data import encode_prompt_completion, encode_sequence, pad_batch
from peftkern.train.model import LMWithHeads


def as_completion(prompt, text):
    """A completion in the prompt's format: a string, or one assistant message for a conversation."""
    if isinstance(text, list) or isinstance(prompt, str):
        return text
    return [{"role": "assistant", "content": text}]


@torch.no_grad()
def _sum_logps(model, tokenizer, examples: list[dict], batch_size: int) -> list[tuple[float, int]]:
    wrapper = LMWithHeads(model)
    device = model_device(model)
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = pad_batch(examples[i:i + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = wrapper(batch["input_ids"], batch["attention_mask"], batch["labels"])["logps"]
            counts = (batch["labels"][:, 1:] != -100).sum(dim=1)
            out += [(float(s), int(c)) for s, c in zip(logps.sum(dim=1).tolist(), counts.tolist())]
    finally:
        model.train(was)
    return out


def completion_logprobs(model, tokenizer, prompts, completions, batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of log p(completion tokens | prompt), number of tokens) per pair; completions end with EOS
    (TRL's encoding: the chat template's end of turn for conversations)."""
    limit = context_length(model) or 1 << 30
    examples = []
    for p, c in zip(prompts, completions):
        prompt_ids, completion_ids = encode_prompt_completion(tokenizer, p, as_completion(p, c))
        examples.append(encode_sequence(prompt_ids, completion_ids, limit))
    return _sum_logps(model, tokenizer, examples, batch_size)


def text_logprobs(model, tokenizer, texts, batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of log p(token | previous tokens) over every token but the first, count) per text (the
    tokenizer's special tokens included, so a BOS-using model predicts the first word too)."""
    limit = context_length(model) or 1 << 30
    examples = []
    for t in texts:
        ids = list(tokenizer(t)["input_ids"])[:limit]
        if len(ids) < 2:
            raise ValueError(f"text {t[:40]!r} has fewer than 2 tokens: nothing to predict")
        examples.append(encode_sequence(ids[:1], ids[1:], limit))
    return _sum_logps(model, tokenizer, examples, batch_size)


def reward_model_scorer(path: str, tokenizer, device=None, what: str = "scores"):
    """scores(prompts, completions) -> [N] from a reward model written by ``peftkern rm`` (calibrated when
    it has a ``calibration.json``). ``what="disagreement"``: an ensemble's uncertainty instead, the std of
    its heads' scores per completion (0 for one head), e.g. to pick the next items to label."""
    from peftkern.train.rm import load_reward_model

    if what not in ("scores", "disagreement"):
        raise ValueError(f"reward_model_scorer: what must be 'scores' or 'disagreement', got {what!r}")
    rm = load_reward_model(path)
    if device is not None:
        rm = rm.to(device)

    @torch.no_grad()
    def score(prompts, completions):
        limit = context_length(rm.lm) or 1 << 30
        examples = [encode_sequence(*encode_prompt_completion(tokenizer, p, as_completion(p, c)), limit)
                    for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(examples), 16):
            batch = pad_batch(examples[i:i + 16], tokenizer.pad_token_id)
            dev = model_device(rm)
            out += rm(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))[what].tolist()
        return out
    return score


def reward_fn_scorer(fn):
    """scores(prompts, completions) from ``fn(prompt, completion_text) -> float``."""
    def score(prompts, completions):
        return [float(fn(p, c if isinstance(c, str) else c[-1]["content"])) for p, c in zip(prompts, completions)]
    return score
