"""Active learning: which items to label first, by how unsure a reward model is about them.

A *scorer* is any callable ``scorer(prompts, completions) -> values`` with one entry per
(prompt, completion) pair: a float (one reward model: ``peftkern.evaluation.scoring``'s
``reward_model_scorer`` / ``reward_fn_scorer`` fit) or a list of M floats (an ensemble: one reward
per member). An item's uncertainty is taken over its answers' pairs (i, j):

* one model: the Bradley-Terry probability p = sigmoid(r_i - r_j) that i beats j; the uncertainty
  is 0.5 - min over pairs of |p - 0.5| (0: sure of every pair, 0.5: a coin flip on some pair);
* an ensemble: the disagreement, max over pairs of the standard deviation over members of
  sigmoid(r_i,m - r_j,m) (0 when every member gives the same probabilities).

Higher uncertainty is served first (``LabelDB.set_priorities``).
"""
from __future__ import annotations

import math
import numbers

from peftkern.labeling.items import Item


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def bt_uncertainty(rewards: list[float]) -> float:
    """0.5 - min over answer pairs of |sigmoid(r_i - r_j) - 0.5|."""
    gaps = [abs(sigmoid(rewards[i] - rewards[j]) - 0.5) for i in range(len(rewards)) for j in range(i + 1, len(rewards))]
    return 0.5 - min(gaps)


def ensemble_disagreement(rewards: list[list[float]]) -> float:
    """Max over answer pairs of the (population) standard deviation over members of the
    Bradley-Terry probability; ``rewards[k][m]``: answer k, member m."""
    members = len(rewards[0])
    worst = 0.0
    for i in range(len(rewards)):
        for j in range(i + 1, len(rewards)):
            probs = [sigmoid(rewards[i][m] - rewards[j][m]) for m in range(members)]
            mean = sum(probs) / members
            worst = max(worst, math.sqrt(sum((p - mean) ** 2 for p in probs) / members))
    return worst


def uncertainties(items: list[Item], scorer) -> dict[str, float]:
    """``{item id: uncertainty}`` (see the module docstring), scoring every answer of every item in
    one call of ``scorer``."""
    prompts = [it.prompt for it in items for _ in it.completions]
    completions = [c for it in items for c in it.completions]
    values = scorer(prompts, completions)
    values = [v.tolist() if hasattr(v, "tolist") else v for v in (values.tolist() if hasattr(values, "tolist") else values)]
    if len(values) != len(completions):
        raise ValueError(f"the scorer returned {len(values)} values for {len(completions)} answers; expected one "
                         "per (prompt, answer)")
    ensemble = _is_sequence(values[0]) if values else False
    for n, v in enumerate(values):
        if _is_sequence(v) != ensemble:
            raise ValueError(f"the scorer mixed single rewards and ensemble lists (value {n}: {v!r})")
        for x in (v if ensemble else [v]):
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
                raise ValueError(f"the scorer returned {x!r} for answer {n}; expected finite numbers")
        if ensemble and len(v) != len(values[0]):
            raise ValueError(f"ensemble value {n} has {len(v)} members, value 0 has {len(values[0])}")
    out, at = {}, 0
    for it in items:
        mine = values[at:at + it.k]
        at += it.k
        if ensemble:
            out[it.id] = ensemble_disagreement([[float(x) for x in v] for v in mine])
        else:
            out[it.id] = bt_uncertainty([float(v) for v in mine])
    return out


def _is_sequence(v) -> bool:
    return isinstance(v, (list, tuple))


def prioritize(db, scorer) -> dict[str, float]:
    """Score every item of ``db`` and store the uncertainties as serving priorities."""
    found = uncertainties(db.items(), scorer)
    db.set_priorities(found)
    return found
