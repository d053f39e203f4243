"""Short seeded top-k sampling, for the prefix contexts of k* / v* and the fluency generations.

A plain loop over full forward passes (no KV cache): prefixes are ten-odd tokens and fluency texts
a few dozen, so the simplicity costs little. Deterministic for a given seed (a private generator).
"""
from __future__ import annotations

import torch

from peftkern.editing.hooks import eval_mode
from peftkern.editing.tokens import encode, model_device


@torch.no_grad()
def sample(model, tok, prompts: list[str], max_new_tokens: int, top_k: int = 5, seed: int = 0,
           stop_at_eos: bool = True) -> list[str]:
    """One continuation per prompt (the new text only, special tokens dropped)."""
    device = model_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eos = getattr(tok, "eos_token_id", None)
    out = []
    with eval_mode(model):
        for prompt in prompts:
            ids = torch.tensor([encode(tok, prompt)], device=device)
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids).logits[0, -1].float().cpu()
                values, index = logits.topk(min(top_k, logits.numel()))
                choice = index[torch.multinomial(torch.softmax(values, -1), 1, generator=gen)]
                if stop_at_eos and eos is not None and int(choice) == eos:
                    break
                ids = torch.cat([ids, choice.view(1, 1).to(device)], dim=1)
            out.append(tok.decode(ids[0, start:].tolist(), skip_special_tokens=True))
    return out


def context_prefixes(model, tok, n: int = 10, length: int = 10, starts=("The", "Therefore", "Because", "I", "You"),
                     seed: int = 0, separator: str = ". ") -> list[str]:
    """``""`` and ``n`` short texts the model writes itself from ``starts`` (``length`` tokens
    each), each ending in ``separator``: the prefixes x_j of the papers' k* and v* averages. (For a
    model trained on one sentence per document, such as the embedded tiny one, a separator that
    ends one document and starts the next, ``".<|end|><|bos|>"``, keeps the prompt in the form it
    was trained on.)"""
    prompts = [starts[i % len(starts)] for i in range(n)]
    texts = sample(model, tok, prompts, length, seed=seed)
    out = [""]
    for start, text in zip(prompts, texts):
        words = " ".join((start + text).split())
        out.append(words.rstrip(". ") + separator)
    return out
