"""How well an edit took, CounterFact's way (ROME, section 3.3).

For a request with the new object o* and the old one o:

- efficacy: on the edit prompt, P(o*) > P(o) (with no ``target_true``: the greedy continuation
  starts with o*);
- generalization: the same on each paraphrase prompt;
- specificity: on each neighbourhood prompt (another subject, answer a), P(a) > P(o*): the
  neighbour still prefers its own answer to the edit's;
- fluency: n-gram entropy of text the model samples from the request's generation prompts
  (ROME: the weighted mean of bigram and trigram entropies, weights 2/3 and 4/3, over words).

P(x) is the probability of the whole continuation (teacher-forced, all its tokens); each score
is the mean of the 0/1 outcomes over requests (and their prompts). Also reported: the mean
probabilities of o* on the edit prompt, and the neighbourhood accuracy (greedy answer = a).
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch

from peftkern.editing.hooks import eval_mode
from peftkern.editing.requests import EditRequest, as_request
from peftkern.editing.sampling import sample
from peftkern.editing.tokens import model_device, pad, target_ids

_WORD = re.compile(r"\w+|[^\w\s]")


@torch.no_grad()
def continuation_logprobs(model, tok, pairs: list[tuple[str, str]], batch_size: int = 64) -> list[float]:
    """log P(target | prompt) summed over the target's tokens, for each (prompt, target)."""
    rows, spans = [], []
    for prompt, target in pairs:
        p, t = target_ids(tok, prompt, target)
        rows.append(p + t)
        spans.append((len(p), t))
    device = model_device(model)
    out = []
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            batch = pad(tok, rows[i:i + batch_size], device)
            logp = torch.log_softmax(model(**batch.as_kwargs()).logits.float(), dim=-1)
            for j, (start, t) in enumerate(spans[i:i + batch_size]):
                idx = torch.tensor(t, device=device)
                pos = torch.arange(start - 1, start - 1 + len(t), device=device)
                out.append(float(logp[j, pos, idx].sum()))
    return out


@torch.no_grad()
def greedy_matches(model, tok, pairs: list[tuple[str, str]]) -> list[bool]:
    """Whether greedy decoding from each prompt produces the target's tokens first."""
    out = []
    device = model_device(model)
    with eval_mode(model):
        for prompt, target in pairs:
            p, t = target_ids(tok, prompt, target)
            ids = torch.tensor([p], device=device)
            ok = True
            for want in t:
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt != want:
                    ok = False
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
            out.append(ok)
    return out


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure of one text: mean over n of weight_n * entropy (bits) of its word n-grams."""
    words = _WORD.findall(text.lower())
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def evaluate_edits(model, tok, requests: list[EditRequest | dict], fluency: bool = True, fluency_tokens: int = 60,
                   seed: int = 0) -> dict:
    """Efficacy, generalization, specificity (and fluency) of ``model`` on ``requests``: a dict with
    the means and a per-request list. Run it on the model before and after an edit to compare.

    A neighbourhood prompt that is itself the edit prompt of one of ``requests`` (a batch that
    edits a subject and its neighbour) is left out: its answer is meant to change."""
    requests = [as_request(r) for r in requests]
    edited = {r.text for r in requests}
    per = []
    for r in requests:
        row: dict = {"case_id": r.case_id, "subject": r.subject, "target_new": r.target_new}
        prompts = [r.text] + list(r.paraphrase_prompts)
        new_lp = continuation_logprobs(model, tok, [(p, r.target_new) for p in prompts])
        if r.target_true is not None:
            old_lp = continuation_logprobs(model, tok, [(p, r.target_true) for p in prompts])
            wins = [n > o for n, o in zip(new_lp, old_lp)]
        else:
            wins = greedy_matches(model, tok, [(p, r.target_new) for p in prompts])
        row["efficacy"] = float(wins[0])
        row["generalization"] = _mean(float(w) for w in wins[1:])
        row["new_prob"] = math.exp(new_lp[0])
        neighbours = [n for n in r.neighborhood_prompts if n.prompt not in edited]
        if neighbours:
            own = continuation_logprobs(model, tok, [(n.prompt, n.target) for n in neighbours])
            new = continuation_logprobs(model, tok, [(n.prompt, r.target_new) for n in neighbours])
            row["specificity"] = _mean(float(a > b) for a, b in zip(own, new))
            row["neighbourhood_accuracy"] = _mean(float(x) for x in greedy_matches(
                model, tok, [(n.prompt, n.target) for n in neighbours]))
        if fluency:
            gen_prompts = list(r.generation_prompts) or [r.text]
            texts = sample(model, tok, gen_prompts, fluency_tokens, seed=seed, stop_at_eos=False)
            row["fluency"] = _mean(ngram_entropy(p + " " + t) for p, t in zip(gen_prompts, texts))
        per.append(row)
    keys = ("efficacy", "generalization", "specificity", "neighbourhood_accuracy", "fluency", "new_prob")
    summary = {k: _mean(row[k] for row in per if row.get(k) is not None) for k in keys}
    return {"n": len(requests), **summary, "per_request": per}
