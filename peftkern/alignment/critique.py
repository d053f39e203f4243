"""Self-critique: the policy critiques and revises its own outputs ``rounds`` times, at inference (a
decoding mode: the final revisions are the answers) or as a data step (the chains become SFT records).
It is :func:`peftkern.alignment.cai.run_chains` with ``revisions = rounds``; greedy by default, as
decoding is."""
from __future__ import annotations

import dataclasses

from peftkern.alignment.cai import ChainSettings, run_chains, sft_records
from peftkern.alignment.constitution import Constitution


def self_critique(model, tokenizer, prompts, constitution: Constitution, rounds: int = 1,
                  settings: ChainSettings | None = None) -> list[dict]:
    """Chain records (see peftkern.alignment.cai) after ``rounds`` critique -> revision steps."""
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    base = settings or ChainSettings(temperature=0.0)
    return run_chains(model, tokenizer, prompts, constitution, dataclasses.replace(base, revisions=rounds))


def self_critique_answers(model, tokenizer, prompts, constitution: Constitution, rounds: int = 1,
                          settings: ChainSettings | None = None) -> list[str]:
    """The decoding mode: one final answer per prompt."""
    return [c["final"] for c in self_critique(model, tokenizer, prompts, constitution, rounds, settings)]


def self_critique_records(chains: list[dict], keep: str = "auto") -> list[dict]:
    """The data step: TRL ``messages`` records of the final revisions (see cai.sft_records)."""
    return sft_records(chains, keep)
