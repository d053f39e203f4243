"""AI feedback: two sampled answers per prompt compared under a principle by a labeller, giving soft
preference labels (the probability that A is the better answer) and preference pairs for DPO or a
reward model.

Labellers:

* :class:`ModelLabeller` (the policy itself, or another local model): the comparison text (the
  constitution's template with the principle, the prompt and both answers) as a user turn, then the
  log-probability of the assistant answering ``(A)`` and of ``(B)``; p(A) = softmax over the two.
  Asked in both orders and averaged, ``p = (p_AB(A) + 1 - p_BA(A)) / 2``, which cancels position bias
  and makes swapping A and B give exactly ``1 - p``.
* :class:`RewardLabeller` (a reward function, a reward model, or the constitution's rule checks):
  ``p = sigmoid((r_A - r_B) / temperature)``, symmetric by construction.

A pair record (TRL's preference format plus the label)::

    {"prompt": [messages], "chosen": [assistant], "rejected": [assistant], "confidence": max(p, 1 - p),
     "p_a": p, "principle": name}
"""
from __future__ import annotations

import math
import random

from peftkern.alignment.constitution import Constitution, Principle, check_rule, user_text
from peftkern.evaluation.scoring import completion_logprobs
from peftkern.generate import generate
from peftkern.generate.prompts import as_messages


def comparison_text(constitution: Constitution, principle: Principle, prompt, a: str, b: str) -> str:
    template = principle.comparison or constitution.comparison
    return template.format(principle=principle.critique_request, prompt=user_text(prompt), a=a, b=b)


class ModelLabeller:
    """p(A better) from a causal LM's log-probs of answering ``(A)`` vs ``(B)``."""

    def __init__(self, model, tokenizer, constitution: Constitution, batch_size: int = 16):
        self.model, self.tokenizer, self.constitution, self.batch_size = model, tokenizer, constitution, batch_size

    def one_order(self, prompts, a, b, principles) -> list[float]:
        """p(A) with the answers in the order given (position bias included)."""
        asks = [[{"role": "user", "content": comparison_text(self.constitution, p, q, x, y)}]
                for q, x, y, p in zip(prompts, a, b, principles)]
        la = completion_logprobs(self.model, self.tokenizer, asks, ["(A)"] * len(asks), self.batch_size)
        lb = completion_logprobs(self.model, self.tokenizer, asks, ["(B)"] * len(asks), self.batch_size)
        return [1.0 / (1.0 + math.exp(y[0] - x[0])) for x, y in zip(la, lb)]

    def prob_a(self, prompts, a, b, principles) -> list[float]:
        """p(A better), both orders averaged."""
        forward = self.one_order(prompts, a, b, principles)
        swapped = self.one_order(prompts, b, a, principles)
        return [(f + 1.0 - s) / 2.0 for f, s in zip(forward, swapped)]


class RewardLabeller:
    """p(A better) = sigmoid((r_A - r_B) / temperature) from ``scores(prompts, completions) -> [float]``."""

    def __init__(self, scores, temperature: float = 0.25):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.scores, self.temperature = scores, temperature

    def prob_a(self, prompts, a, b, principles=None) -> list[float]:
        ra, rb = self.scores(prompts, list(a)), self.scores(prompts, list(b))
        return [1.0 / (1.0 + math.exp(-(x - y) / self.temperature)) for x, y in zip(ra, rb)]


def rules_scorer(constitution: Constitution):
    """scores(prompts, completions): the share of the constitution's rule checks each completion passes."""
    checks = [(p, r) for p in constitution.principles for r in p.checks]
    if not checks:
        raise ValueError(f"{constitution.path or constitution.name}: no principle has rule checks; the 'rules' "
                         "labeller needs them")
    def scores(prompts, completions):
        out = []
        for q, c in zip(prompts, completions):
            text = c if isinstance(c, str) else c[-1]["content"]
            out.append(sum(check_rule(text, r, q) for _, r in checks) / len(checks))
        return out
    return scores


def sample_pairs(model, tokenizer, prompts, max_new_tokens: int = 16, temperature: float = 1.0, seed: int = 0,
                 batch_size: int = 16) -> list[tuple[list[dict], str, str]]:
    """(prompt, answer A, answer B): two answers sampled from ``model`` per prompt (one batched call)."""
    convs = [as_messages(p) for p in prompts]
    rows = [c for c in convs for _ in range(2)]
    outs = generate(model, tokenizer, rows, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                    seed=seed, batch_size=batch_size)
    return [(c, outs[2 * i].text, outs[2 * i + 1].text) for i, c in enumerate(convs)]


def label_pairs(labeller, pairs, constitution: Constitution, seed: int = 0) -> list[dict]:
    """One record per pair: both answers, the sampled principle, p_a (nothing dropped yet)."""
    rng = random.Random(seed)
    principles = [rng.choice(constitution.principles) for _ in pairs]
    prompts = [p for p, _, _ in pairs]
    probs = labeller.prob_a(prompts, [a for _, a, _ in pairs], [b for _, _, b in pairs], principles) if pairs else []
    return [{"prompt": p, "a": a, "b": b, "principle": pr.name, "p_a": float(q)}
            for (p, a, b), pr, q in zip(pairs, principles, probs)]


def preference_records(labelled: list[dict], threshold: float = 0.5) -> list[dict]:
    """TRL preference records from labelled pairs with confidence max(p, 1 - p) >= ``threshold`` (and
    two different, non-empty answers); ``threshold`` in [0.5, 1]."""
    if not 0.5 <= threshold <= 1.0:
        raise ValueError(f"label threshold must be in [0.5, 1], got {threshold}")
    out = []
    for r in labelled:
        p, a, b = r["p_a"], r["a"], r["b"]
        confidence = max(p, 1.0 - p)
        if a.strip() == b.strip() or not a.strip() or not b.strip() or confidence < threshold or p == 0.5:
            continue
        chosen, rejected = (a, b) if p > 0.5 else (b, a)
        out.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}], "confidence": confidence,
                    "p_a": p, "principle": r["principle"]})
    return out


def label_accuracy(labeller, known: list[tuple], constitution: Constitution, seed: int = 0) -> dict:
    """How often the soft label picks the known better answer of (prompt, better, worse) triples, half of
    them shown as A and half as B: ``accuracy`` (p on the right side of 1/2; a tie counts 1/2),
    ``mean_p_better``, and for a ModelLabeller the single-order figures (``position_bias``: mean p(A)
    in one order minus 1/2)."""
    prompts = [k[0] for k in known]
    a = [k[1] if i % 2 == 0 else k[2] for i, k in enumerate(known)]
    b = [k[2] if i % 2 == 0 else k[1] for i, k in enumerate(known)]
    rng = random.Random(seed)
    principles = [rng.choice(constitution.principles) for _ in known]
    probs = labeller.prob_a(prompts, a, b, principles)
    p_better = [p if i % 2 == 0 else 1.0 - p for i, p in enumerate(probs)]
    out = {"pairs": len(known), "accuracy": sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in p_better)
           / max(len(known), 1), "mean_p_better": sum(p_better) / max(len(known), 1)}
    if isinstance(labeller, ModelLabeller):
        one = labeller.one_order(prompts, a, b, principles)
        one_better = [p if i % 2 == 0 else 1.0 - p for i, p in enumerate(one)]
        out["one_order_accuracy"] = sum(p > 0.5 for p in one_better) / max(len(known), 1)
        out["position_bias"] = sum(one) / max(len(one), 1) - 0.5
    return out
