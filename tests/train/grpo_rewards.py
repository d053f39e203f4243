"""Reward functions for the GRPO / RLOO tests, in TRL's convention (importable as
``tests.train.grpo_rewards:NAME``)."""
import math


def _text(c):
    return c if isinstance(c, str) else "".join(m["content"] for m in c)


def lowercase_share(prompts, completions, **columns):
    """Share of each completion's characters that are ASCII lowercase letters (0 for an empty one)."""
    out = []
    for c in completions:
        t = _text(c)
        out.append(sum("a" <= ch <= "z" for ch in t) / len(t) if t else 0.0)
    return out


def short(prompts, completions, **columns):
    """1 / (1 + characters): shorter is better."""
    return [1.0 / (1 + len(_text(c))) for c in completions]


def raises(prompts, completions, **columns):
    raise KeyError("no such column 'solution'")


def one_too_few(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)


def nan_reward(prompts, completions, **columns):
    return [math.nan if i == 3 else 0.5 for i in range(len(completions))]


def abstains(prompts, completions, **columns):
    """None (cannot score) for every completion but the first of each prompt's group of 4."""
    return [1.0 if i % 4 == 0 else None for i in range(len(completions))]
