"""Reward functions for the PPO tests (importable as ``tests.train.rewards:NAME``)."""


def lowercase_fraction(prompt, completion: str) -> float:
    """Share of the completion's characters that are ASCII lowercase letters (0 for an empty one)."""
    if not completion:
        return 0.0
    return sum("a" <= ch <= "z" for ch in completion) / len(completion)
