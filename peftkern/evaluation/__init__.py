"""Evaluation harness: suites (instruction following, held-out task accuracy, perplexity, preference
accuracy against a reward, safety probes), ``evaluate(model, tokenizer, suites) -> dict``, side-by-side
comparison of adapters. See docs/evaluation.md."""
from peftkern.evaluation.harness import default_suites, evaluate, evaluate_columns
from peftkern.evaluation.report import format_table
from peftkern.evaluation.rules import check, is_refusal
from peftkern.evaluation.scoring import reward_fn_scorer, reward_model_scorer
from peftkern.evaluation.suites import NAMES as SUITE_NAMES
from peftkern.evaluation.suites import Suite, resolve

__all__ = ["evaluate", "evaluate_columns", "default_suites", "format_table", "check", "is_refusal", "Suite",
           "resolve", "SUITE_NAMES", "reward_fn_scorer", "reward_model_scorer"]
