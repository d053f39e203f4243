"""Decoding settings: one dataclass, checked once, with the meanings transformers' ``generate`` gives
the same names (so the same settings give the same tokens in both)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class DecodingSettings:
    """How to pick each next token.

    ``do_sample=False`` is greedy (temperature, top-k, top-p and min-p are then unused, as in
    transformers). With sampling, the scores pass through, in this order: repetition penalty, any
    extra processors (constraints, guidance), temperature, top-k, top-p, min-p; then one
    ``torch.multinomial`` draw per row from ``seed`` (or the global RNG when ``seed`` is None).
    ``stop`` strings end a row when they appear in its generated text (the text returned stops before
    them); ``max_new_tokens`` bounds every row.
    """
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    min_p: float = 0.0             # 0.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the prompt or output
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def check(self) -> "DecodingSettings":
        """Raise ValueError naming the first bad field; return self."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p!r}")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0: off), got {self.min_p!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off), got {self.repetition_penalty!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        return self

    def replace(self, **changes) -> "DecodingSettings":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown decoding setting(s) {unknown}; known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes).check()

    def transformers_kwargs(self) -> dict:
        """The keyword arguments that make transformers' ``generate`` decode the same way (all sampling
        knobs given explicitly, so no generation-config default such as top_k=50 slips in)."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                      repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                          min_p=self.min_p if self.min_p > 0 else None)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None, min_p=None)
        return kwargs


def settings_from(settings: DecodingSettings | None = None, **overrides) -> DecodingSettings:
    """``settings`` (or the defaults) with ``overrides`` applied and checked."""
    base = settings if settings is not None else DecodingSettings()
    return base.replace(**overrides) if overrides else dataclasses.replace(base).check()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
