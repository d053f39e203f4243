"""Reward functions of the online trainers (GRPO, RLOO): loading ``module:function`` specs, calling
them in TRL's convention with checks that name the function and the records, and the bundled
verifiable rewards of the embedded tasks.

TRL's convention, kept so TRL reward functions run unchanged::

    def reward(prompts, completions, completion_ids, **columns) -> list[float | None]

one value per completion (G per prompt, the prompt repeated G times); ``completions`` are strings,
or ``[{"role": "assistant", "content": text}]`` when the prompts are conversational; ``columns``
are the data's other fields (``answer``, ...), one entry per completion. ``None`` marks a completion
the function cannot score (it then gets no advantage); anything else must be a finite number.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable

import torch

from peftkern.models import tasks
from peftkern.train.config import parse_floats, split_list
from peftkern.train.errors import ConfigError
from peftkern.train.ppo import load_reward_fn


class RewardError(ConfigError):
    """A reward function that raised, or returned the wrong number or kind of values."""


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float


def _completion_text(completion) -> str:
    """The text of a completion given as a string or as a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def _question(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def exact_answer(prompts, completions, answer=None, **columns) -> list[float]:
    """1 when the completion (stripped) is the right answer, else 0. The answer comes from the data's
    ``answer`` column, or, for the bundled tasks' questions, from their rule; otherwise None."""
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        right = answer[i] if answer is not None and answer[i] is not None else tasks.answer_for(_question(prompt))
        out.append(None if right is None else float(_completion_text(completion).strip() == str(right)))
    return out


_ONE_WORD = re.compile(r"[A-Za-z]+|-?\d+")


def answer_format(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """1 when the completion is what "You answer with the answer only" asks: one word of letters or
    one integer, nothing around it; else 0."""
    return [float(_ONE_WORD.fullmatch(_completion_text(c).strip() or " ") is not None) for c in completions]


BUNDLED = (Reward("exact_answer", exact_answer, 1.0), Reward("answer_format", answer_format, 0.2))


def load_rewards(cfg, embedded: bool) -> list[Reward]:
    """The reward functions a run scores with: ``--reward-fn`` (repeatable) with ``--reward-weights``,
    or (``--model tiny``, neither given) the bundled exact-answer and format rewards (weights 1 and
    0.2). ``--reward-model`` is handled by the trainer."""
    specs = split_list(cfg.reward_fn)
    weights = parse_floats(cfg.reward_weights, "reward_weights")
    if not specs:
        if cfg.reward_model:
            rewards = []
        elif embedded:
            rewards = [Reward(r.name, r.fn, r.weight) for r in BUNDLED]
            if weights is not None:
                for r, w in zip(rewards, weights):
                    r.weight = w
        else:
            raise ConfigError("this trainer needs --reward-fn module:function (repeat for several) or --reward-model")
    else:
        rewards = [Reward(spec, load_reward_fn(spec), 1.0) for spec in specs]
    count = len(rewards) or 1
    if weights is not None and len(weights) != count:
        raise ConfigError(f"--reward-weights has {len(weights)} values for {count} reward function(s)")
    if weights is not None and specs:
        for r, w in zip(rewards, weights):
            r.weight = w
    return rewards


def call_rewards(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict, where: list[str]) -> torch.Tensor:
    """[N, F] fp32: reward function f's value for completion n (NaN where it returned None). Every
    failure is a RewardError naming the function and the records: an exception inside it, a result that
    is not one value per completion, a value that is not a number, NaN or infinite."""
    n = len(completions)
    out = torch.empty(n, len(rewards), dtype=torch.float32)
    for j, r in enumerate(rewards):
        try:
            values = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as exc:  # the user's function: report it with the records it was given
            raise RewardError(f"reward function {r.name} raised {type(exc).__name__}: {exc} (on the completions "
                              f"of {_records(where)})") from exc
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().reshape(-1).tolist()
        elif type(values).__module__ == "numpy":
            values = values.reshape(-1).tolist()
        if not isinstance(values, (list, tuple)):
            raise RewardError(f"reward function {r.name} returned {type(values).__name__}; expected a list of one "
                              f"number (or None) per completion ({n} here)")
        if len(values) != n:
            raise RewardError(f"reward function {r.name} returned {len(values)} values for {n} completions "
                              f"(G per prompt, of {_records(where)}); expected one per completion")
        for i, v in enumerate(values):
            if v is None:
                out[i, j] = float("nan")
                continue
            if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RewardError(f"reward function {r.name} returned {type(v).__name__} {v!r} for completion {i} "
                                  f"(of {where[i]}); expected a number or None")
            if not math.isfinite(float(v)):
                raise RewardError(f"reward function {r.name} returned {float(v)} for completion {i} (of "
                                  f"{where[i]}); rewards must be finite (return None for a completion it cannot "
                                  "score)")
            out[i, j] = float(v)
    return out


def _records(where: list[str]) -> str:
    unique = list(dict.fromkeys(where))
    shown = ", ".join(unique[:4])
    return shown + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
