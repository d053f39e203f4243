"""Constitutional AI's supervised stage: for each prompt the model answers, critiques its answer
against a sampled principle, and revises it; the (prompt, final revision) pairs are SFT data.

All generation goes through :func:`peftkern.generate.generate` (batched, KV cache). A chain record::

    {"prompt": [messages], "answer": str, "final": str, "follows": bool | None,
     "steps": [{"principle", "critic", "critique", "candidates": [str], "revision"}]}

Critics: ``model`` (the model writes the critique after the critique request), ``rules`` (the
principle's rule checks say which of them the answer fails; no model call), ``auto`` (rules where
the principle has checks). Revision prompts: ``chain`` (the whole conversation: question, answer,
critique request, critique, revision request; the constitution's examples first, as CAI's few-shot
turns), ``fresh`` (the question asked again with the revision request added to the system turn) or
``resample`` (the question asked again as it was: the model does not read the critique, it offers
new candidates and the rule critic chooses; what a model too small to follow any instruction it
was not trained on can still use). With checks, ``candidates``
revisions are sampled per step and the first that passes the principle's checks is kept (one that
also passes every other principle's checks first).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from peftkern.alignment.constitution import Constitution, Principle
from peftkern.generate import generate
from peftkern.generate.prompts import as_messages

CRITICS = ("auto", "model", "rules")
CONTEXTS = ("chain", "fresh", "resample")


@dataclass
class ChainSettings:
    revisions: int = 1            # critique -> revision steps per prompt, each under a newly sampled principle
    critic: str = "auto"
    context: str = "chain"
    candidates: int = 1           # revisions sampled per step (the first that passes the checks is kept)
    max_new_tokens: int = 64      # per answer and revision
    critique_tokens: int = 64
    temperature: float = 0.7      # answers and revisions (0: greedy); critiques are greedy
    batch_size: int = 16
    seed: int = 0

    def check(self) -> "ChainSettings":
        if self.critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {self.critic!r}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        for name in ("revisions", "candidates", "max_new_tokens", "critique_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "revisions" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'revisions' else 1}, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _sample_kw(settings: ChainSettings, seed: int) -> dict:
    if settings.temperature > 0:
        return {"do_sample": True, "temperature": settings.temperature, "seed": seed}
    return {"do_sample": False}


def _few_shot(constitution: Constitution, principle: Principle) -> list[dict]:
    turns = []
    for ex in constitution.examples:
        turns += [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["answer"]},
                  {"role": "user", "content": principle.critique_request},
                  {"role": "assistant", "content": ex["critique"]},
                  {"role": "user", "content": principle.revision_request},
                  {"role": "assistant", "content": ex["revision"]}]
    return turns


def _with_system(messages: list[dict], extra: str) -> list[dict]:
    """``messages`` with ``extra`` added to the system turn (one is put first if there is none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']} {extra}"}] + messages[1:]
    return [{"role": "system", "content": extra}] + messages


def rule_critique(principle: Principle, answer: str, prompt) -> str:
    failed = principle.failed(answer, prompt)
    if not failed:
        return f"The answer follows the principle '{principle.name}'."
    return f"The answer breaks the principle '{principle.name}': it fails {', '.join(failed)}."


def _critic(settings: ChainSettings, principle: Principle) -> str:
    if settings.critic == "rules" and not principle.checks:
        raise ValueError(f"critic 'rules' needs rule checks, and principle {principle.name!r} has none")
    if settings.critic == "auto":
        return "rules" if principle.checks else "model"
    return settings.critic


def run_chains(model, tokenizer, prompts, constitution: Constitution, settings: ChainSettings | None = None,
               seed: int | None = None) -> list[dict]:
    """One chain record per prompt (strings or message lists). ``seed`` (default: settings.seed) fixes the
    sampled principles and every sampled answer, critique and revision."""
    settings = (settings or ChainSettings()).check()
    seed = settings.seed if seed is None else seed
    rng = random.Random(seed)
    convs = [as_messages(p) for p in prompts]
    if not convs:
        return []
    chat = {"batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens}
    answers = [c.text for c in generate(model, tokenizer, convs, **chat, **_sample_kw(settings, seed))]
    current = list(answers)
    steps = [[] for _ in convs]
    for step in range(settings.revisions):
        principles = [rng.choice(constitution.principles) for _ in convs]
        critics = [_critic(settings, p) for p in principles]
        critiques = [None] * len(convs)
        model_rows = [i for i, c in enumerate(critics) if c == "model"]
        asks = {}
        for i in model_rows:
            asks[i] = (_few_shot(constitution, principles[i]) + convs[i]
                       + [{"role": "assistant", "content": current[i]},
                          {"role": "user", "content": principles[i].critique_request}])
        if model_rows:
            outs = generate(model, tokenizer, [asks[i] for i in model_rows], batch_size=settings.batch_size,
                            max_new_tokens=settings.critique_tokens, do_sample=False)
            for i, c in zip(model_rows, outs):
                critiques[i] = c.text
        for i, c in enumerate(critics):
            if c == "rules":
                critiques[i] = rule_critique(principles[i], current[i], convs[i])
        # a rule critic that finds nothing wrong leaves the answer as it is
        revise = [i for i in range(len(convs)) if not (critics[i] == "rules" and principles[i].follows(current[i], convs[i]))]
        revision_prompts = []
        for i in revise:
            if settings.context == "resample":
                revision_prompts.append(convs[i])
            elif settings.context == "fresh":
                revision_prompts.append(_with_system(convs[i], principles[i].revision_request))
            else:
                revision_prompts.append(asks.get(i, _few_shot(constitution, principles[i]) + convs[i] + [
                    {"role": "assistant", "content": current[i]},
                    {"role": "user", "content": principles[i].critique_request}])
                    + [{"role": "assistant", "content": critiques[i]},
                       {"role": "user", "content": principles[i].revision_request}])
        k = settings.candidates
        candidates = {i: [] for i in revise}
        if revise:
            outs = generate(model, tokenizer, [p for p in revision_prompts for _ in range(k)], **chat,
                            **_sample_kw(settings, seed + 7919 * (step + 1)))
            for j, i in enumerate(revise):
                candidates[i] = [c.text for c in outs[j * k:(j + 1) * k]]
        for i in range(len(convs)):
            if i in candidates:
                cands = candidates[i]
                passing = [c for c in cands if principles[i].follows(c, convs[i])] if principles[i].checks else []
                best = [c for c in passing if constitution.follows(c, convs[i])]  # breaks no other principle
                revision = (best or passing or cands)[0]
            else:
                cands, revision = [], current[i]
            steps[i].append({"principle": principles[i].name, "critic": critics[i], "critique": critiques[i],
                             "candidates": cands, "revision": revision})
            current[i] = revision
    return [{"prompt": conv, "answer": a, "final": f, "follows": constitution.follows(f, conv), "steps": s}
            for conv, a, f, s in zip(convs, answers, current, steps)]


def sft_records(chains: list[dict], keep: str = "auto") -> list[dict]:
    """TRL ``messages`` records (prompt + final revision as the assistant turn). ``keep``: ``all``,
    ``following`` (finals that pass every check) or ``auto`` (``following`` when the chains were
    checked, else ``all``); an empty final is never kept."""
    if keep not in ("auto", "all", "following"):
        raise ValueError(f"keep must be auto, all or following, got {keep!r}")
    checked = any(c["follows"] is not None for c in chains)
    only_following = keep == "following" or (keep == "auto" and checked)
    return [{"messages": c["prompt"] + [{"role": "assistant", "content": c["final"]}]}
            for c in chains if c["final"].strip() and (not only_following or c["follows"])]


def prompts_of(records: list[dict], where: str = "prompts") -> list:
    """The prompts of records with ``prompt`` (a string or messages) or ``messages`` (the turns before
    the last assistant turn)."""
    out = []
    for i, r in enumerate(records):
        if "prompt" in r:
            out.append(r["prompt"])
        elif "messages" in r and isinstance(r["messages"], list):
            msgs = r["messages"]
            out.append(msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs)
        else:
            raise ValueError(f"{r.get('_where', f'{where} record {i}')}: needs 'prompt' or 'messages' "
                             f"(has {sorted(r)})")
    return out
