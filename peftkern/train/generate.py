"""The trainers' generation: a thin call into peftkern.generate (greedy or sampled, batched, the KV
cache), kept so trainer code reads ``generate(lm, tok, prompts)``; exact match is peftkern.generate's."""
from __future__ import annotations

from peftkern.generate import generate_text
from peftkern.generate.metrics import exact_match  # noqa: F401  (re-exported for the trainers)
from peftkern.train.model import base_causal_lm


def generate(lm, tokenizer, prompts: list, max_new_tokens: int = 12, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """Completion text for each prompt (a string or a list of messages), cut at the end-of-turn token."""
    lm = base_causal_lm(lm) if not hasattr(lm, "generate") else lm
    return generate_text(lm, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=do_sample, temperature=temperature)
