"""Greedy or sampled generation in batches, and exact-match accuracy of answers."""
from __future__ import annotations

import torch

from peftkern.train.data import encode_prompt, left_pad
from peftkern.train.model import base_causal_lm


@torch.no_grad()
def generate(lm, tokenizer, prompts: list, max_new_tokens: int = 12, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """Completion text for each prompt (a string or a list of messages), cut at the end-of-turn token."""
    lm = base_causal_lm(lm) if not hasattr(lm, "generate") else lm
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts[i:i + batch_size]],
                             tokenizer.pad_token_id)
        out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                          do_sample=do_sample, temperature=temperature if do_sample else None, top_p=None,
                          top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    lm.train(was_training)
    return texts


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer after stripping whitespace."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / max(len(answers), 1)
