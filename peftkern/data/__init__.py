"""Instruction data tools: converters into TRL's formats, inspection, Self-Instruct generation,
augmentation, preference pairs from negative examples, and hyperparameter sweeps. See docs/data.md."""
from peftkern.data.augmentation import augment
from peftkern.data.converters import FORMATS, TARGETS, convert, normalize_all, to_trl
from peftkern.data.dedup import exact_groups, near_duplicate_pairs
from peftkern.data.diversity import distinct_n, diversity_summary, verb_object
from peftkern.data.inspection import format_report, inspect_data
from peftkern.data.io import Problem, read_records, write_jsonl
from peftkern.data.negatives import build_pairs, count_negatives, looks_like_refusal
from peftkern.data.rouge import RougePool, rouge_l
from peftkern.data.selfinstruct import SelfInstructSettings, self_instruct
from peftkern.data.sweep import load_sweep, run_sweep

__all__ = ["FORMATS", "TARGETS", "Problem", "RougePool", "SelfInstructSettings", "augment", "build_pairs", "convert",
           "count_negatives", "distinct_n", "diversity_summary", "exact_groups", "format_report", "inspect_data",
           "load_sweep", "looks_like_refusal", "near_duplicate_pairs", "normalize_all", "read_records", "rouge_l",
           "run_sweep", "self_instruct", "to_trl", "verb_object", "write_jsonl"]
