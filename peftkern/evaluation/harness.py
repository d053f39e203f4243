"""The evaluation API: ``evaluate(model, tokenizer, suites) -> dict`` for one model as it is, and
``evaluate_columns`` for several adapter settings of one model side by side (the alignment-tax view).

Result layout (JSON-ready)::

    {"suites": {suite name: {"kind": ..., "metrics": {metric: value}, "n": items, "samples": [...]}},
     "seconds": float}
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

from peftkern.evaluation import suites as suite_defs
from peftkern.evaluation.runners import RUNNERS, EvalContext


def default_suites(model_name: str | None) -> tuple[str, ...]:
    """The bundled-task suites for the embedded model, the general ones otherwise."""
    return suite_defs.EMBEDDED_DEFAULT if (model_name or "").startswith("tiny") else suite_defs.GENERAL_DEFAULT


def evaluate(model, tokenizer, suites=None, *, reward=None, limit: int | None = None, batch_size: int = 16,
             max_new_tokens: int | None = None, progress=None) -> dict:
    """Run ``suites`` (names, file paths or ``suites.Suite`` objects; default: the embedded model's) on
    ``model`` with its adapters as they are set.

    ``reward``: ``scores(prompts, completions) -> list[float]`` (``scoring.reward_model_scorer`` /
    ``reward_fn_scorer``) for preference suites (default: the suite's own, the task reward for the
    bundled one). ``limit``: items per suite. ``progress(name)`` is
    called before each suite."""
    wanted = [suite_defs.resolve(s, limit) if isinstance(s, str) else s
              for s in (suites or suite_defs.EMBEDDED_DEFAULT)]
    names = [s.name for s in wanted]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise ValueError(f"suite(s) {duplicate} given twice")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (set tokenizer.pad_token)")
    ctx = EvalContext(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, reward=reward)
    started = time.time()
    out = {}
    for suite in wanted:
        if progress is not None:
            progress(suite.name)
        t = time.time()
        own = ctx if ctx.reward is not None or suite.reward is None else dataclasses.replace(ctx, reward=suite.reward)
        result = RUNNERS[suite.kind](own, suite.items)
        out[suite.name] = {"kind": suite.kind, **result, "seconds": round(time.time() - t, 2)}
    return {"suites": out, "seconds": round(time.time() - started, 2)}


@contextlib.contextmanager
def column(model, adapters):
    """Run ``model`` with ``adapters`` active (a list of names) or with none (``[]``: the base)."""
    if not adapters:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield
        else:
            yield
        return
    before = list(model.active_adapters)
    model.set_adapter(list(adapters))
    try:
        yield
    finally:
        model.set_adapter(before)


def evaluate_columns(model, tokenizer, columns: dict[str, list[str]], suites=None, **kwargs) -> dict:
    """``evaluate`` once per column: ``{label: adapter names}`` (``[]`` = the base, adapters off;
    several names run together, their deltas summed). Returns ``{"columns": {label: result}}``."""
    wanted = [suite_defs.resolve(s, kwargs.get("limit")) if isinstance(s, str) else s
              for s in (suites or suite_defs.EMBEDDED_DEFAULT)]
    results = {}
    for label, adapters in columns.items():
        with column(model, adapters):
            results[label] = {"adapters": list(adapters), **evaluate(model, tokenizer, wanted, **kwargs)}
    return {"columns": results}
