"""Candidate answers for preference labelling: K different answers per prompt from a model (and its
adapters), through ``peftkern.generate.generate`` (the one decoding loop).

Strategies:
* ``sample``: K draws per prompt with the decoding settings (temperature, top-p, top-k, min-p);
* ``best-of-n``: N draws per prompt scored by a reward model or reward function, keeping the K
  best (``keep="top"``) or K spread evenly over the scores from best to worst (``keep="spread"``,
  which gives raters clear and close pairs alike);
* ``diverse``: answer slot s of each prompt drawn at ``temperatures[s % T]`` with its own seed.

Answers equal after normalisation (lower case, whitespace collapsed; ``dedup="exact"``) or with a
character-5-gram Jaccard similarity >= ``near_threshold`` (``dedup="near"``) to one already kept are
dropped, as are empty ones, and drawn again, up to ``max_rounds`` rounds; a prompt that still has
fewer than K distinct answers keeps what it has (``short`` says how many are missing).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from peftkern.data.dedup import jaccard, normalize_text, shingles
from peftkern.generate.settings import DecodingSettings
from peftkern.generate.text import generate

STRATEGIES = ("sample", "best-of-n", "diverse")
DEDUP = ("exact", "near", "none")


@dataclass
class SamplingPlan:
    k: int = 4
    strategy: str = "sample"
    n: int | None = None                       # best-of-n: draws per prompt (default 4 K)
    keep: str = "top"                          # best-of-n: top | spread
    temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)  # diverse
    dedup: str = "exact"
    near_threshold: float = 0.9
    max_rounds: int = 3
    extra: dict = field(default_factory=dict)

    def check(self, has_scorer: bool) -> SamplingPlan:
        if not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"k must be an integer >= 2 (answers per prompt to compare), got {self.k!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.dedup not in DEDUP:
            raise ValueError(f"dedup {self.dedup!r} is not one of {', '.join(DEDUP)}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near_threshold must be in (0, 1], got {self.near_threshold}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds must be an integer >= 1, got {self.max_rounds!r}")
        if self.strategy == "best-of-n":
            if not has_scorer:
                raise ValueError("best-of-n needs a reward model or a reward function to rank the draws")
            if self.n is None:
                self.n = 4 * self.k
            if not isinstance(self.n, int) or self.n < self.k:
                raise ValueError(f"best-of-n: n ({self.n!r}) must be an integer >= k ({self.k})")
            if self.keep not in ("top", "spread"):
                raise ValueError(f"keep must be top or spread, got {self.keep!r}")
        if self.strategy == "diverse":
            if not self.temperatures or any(not t > 0 for t in self.temperatures):
                raise ValueError(f"diverse sampling needs temperatures > 0, got {self.temperatures!r}")
        return self


class _Pool:
    """The distinct answers kept for one prompt."""

    def __init__(self, dedup: str, threshold: float):
        self.dedup, self.threshold = dedup, threshold
        self.texts, self.infos, self.keys = [], [], []
        self.dropped = 0

    def offer(self, text: str, info: dict) -> bool:
        if not text.strip():
            self.dropped += 1
            return False
        key = normalize_text(text) if self.dedup == "exact" else shingles(text) if self.dedup == "near" else None
        if self.dedup == "exact" and key in self.keys:
            self.dropped += 1
            return False
        if self.dedup == "near" and any(jaccard(key, k) >= self.threshold for k in self.keys):
            self.dropped += 1
            return False
        self.texts.append(text)
        self.infos.append(info)
        self.keys.append(key)
        return True


def sample_candidates(model, tokenizer, prompts: list, plan: SamplingPlan, settings: DecodingSettings | None = None,
                      scorer=None, batch_size: int = 16, chat: bool = False, system: str | None = None,
                      processors=(), step_scorer=None, where=None) -> list[dict]:
    """One record per prompt: ``{"prompt", "completions": [K texts], "candidates": [{"temperature",
    "top_p", "seed", "round", "finish_reason", "reward"?}], "strategy", "duplicates_dropped", "short"}``.

    ``scorer(prompts, completions) -> [rewards]`` (``peftkern.evaluation.scoring``'s scorers) ranks
    best-of-n draws; with the other strategies it only adds a ``reward`` to every kept answer.
    ``processors`` / ``step_scorer`` / ``chat`` / ``system`` / ``batch_size`` go to ``generate``.
    """
    plan.check(scorer is not None)
    settings = (settings or DecodingSettings()).replace(do_sample=True)
    base_seed = settings.seed if settings.seed is not None else random.randrange(1 << 30)
    labels = list(where) if where is not None else [f"prompt {i}" for i in range(len(prompts))]
    target = plan.n if plan.strategy == "best-of-n" else plan.k
    pools = [_Pool(plan.dedup, plan.near_threshold) for _ in prompts]

    def draw(rows: list[int], temperature: float, seed: int, round_: int) -> None:
        if not rows:
            return
        run = settings.replace(temperature=temperature, seed=seed)
        outs = generate(model, tokenizer, [prompts[i] for i in rows], run, batch_size=batch_size, chat=chat,
                        system=system, processors=processors, scorer=step_scorer, where=[labels[i] for i in rows])
        for i, c in zip(rows, outs):
            if len(pools[i].texts) < target:
                pools[i].offer(c.text, {"temperature": temperature, "top_p": run.top_p, "seed": seed,
                                        "round": round_, "finish_reason": c.finish_reason})

    for round_ in range(plan.max_rounds):
        need = [max(target - len(p.texts), 0) for p in pools]
        if not any(need):
            break
        if plan.strategy == "diverse":
            by_slot: dict[int, list[int]] = {}
            for i, m in enumerate(need):
                for s in range(len(pools[i].texts), len(pools[i].texts) + m):
                    by_slot.setdefault(s, []).append(i)
            for s, rows in sorted(by_slot.items()):
                draw(rows, plan.temperatures[s % len(plan.temperatures)], base_seed + 1000 * round_ + s, round_)
        else:
            rows = [i for i, m in enumerate(need) for _ in range(m)]
            draw(rows, settings.temperature, base_seed + 1000 * round_, round_)

    rewards = _score(pools, prompts, scorer) if scorer is not None else None
    out = []
    for i, pool in enumerate(pools):
        chosen = list(range(len(pool.texts)))
        if rewards is not None:
            for j in chosen:
                pool.infos[j]["reward"] = rewards[i][j]
            if plan.strategy == "best-of-n":
                chosen = _keep(sorted(chosen, key=lambda j: -rewards[i][j]), plan.k, plan.keep)
        out.append({"prompt": prompts[i], "completions": [pool.texts[j] for j in chosen],
                    "candidates": [pool.infos[j] for j in chosen], "strategy": plan.strategy,
                    "duplicates_dropped": pool.dropped, "short": max(plan.k - len(chosen), 0)})
    return out


def _score(pools: list[_Pool], prompts: list, scorer) -> list[list[float]]:
    flat_prompts = [prompts[i] for i, p in enumerate(pools) for _ in p.texts]
    flat = [t for p in pools for t in p.texts]
    values = [float(v) for v in scorer(flat_prompts, flat)] if flat else []
    if len(values) != len(flat):
        raise ValueError(f"the reward scorer returned {len(values)} values for {len(flat)} answers")
    out, at = [], 0
    for p in pools:
        out.append(values[at:at + len(p.texts)])
        at += len(p.texts)
    return out


def _keep(ranked: list[int], k: int, keep: str) -> list[int]:
    """``k`` of ``ranked`` (best first): the first k, or k spread evenly from best to worst."""
    if len(ranked) <= k or keep == "top":
        return ranked[:k]
    last = len(ranked) - 1
    picks = sorted({round(s * last / (k - 1)) for s in range(k)})
    return [ranked[p] for p in picks]
