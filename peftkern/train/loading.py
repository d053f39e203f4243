"""The model and tokenizer a run trains, and the checks on the paths a user gives before anything
heavy starts: ``--model`` / ``--tokenizer`` / ``--reward-model`` directories, ``--data`` /
``--eval-data`` files. A path that does not exist or is not what it must be is a PathError naming
it (never a hub client's traceback about repo ids)."""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkern.models import build_byte_tokenizer, build_tiny_model
from peftkern.train.errors import PathError
from peftkern.train.pretrain import build_pretrained_tiny

EMBEDDED = ("tiny", "tiny-micro")
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_embedded(model: str) -> bool:
    """Whether ``--model`` names the embedded default (``tiny``) or its test size (``tiny-micro``)."""
    return model in EMBEDDED


def _directory(flag: str, path: str, what: str) -> None:
    if not os.path.exists(path):
        raise PathError(f"{flag} {path}: no such directory (expected {what})")
    if not os.path.isdir(path):
        raise PathError(f"{flag} {path}: is a file, expected a directory ({what})")


def check_model_dir(path: str, flag: str = "--model") -> None:
    """``path`` is a transformers model directory (``config.json`` in it)."""
    if flag == "--model" and not os.path.exists(path):
        raise PathError(f"--model {path}: no such directory; --model takes 'tiny' or a local transformers model "
                        "directory (nothing is downloaded: fetch a hub model first, e.g. huggingface-cli download)")
    _directory(flag, path, "a transformers model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise PathError(f"{flag} {path}: no config.json in it: not a transformers model directory")


def check_tokenizer_dir(path: str, flag: str = "--tokenizer") -> None:
    _directory(flag, path, "a tokenizer directory")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        raise PathError(f"{flag} {path}: no tokenizer files in it (looked for {', '.join(TOKENIZER_FILES)})")


def check_data_file(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise PathError(f"{flag} {path}: no such data file")
    if os.path.isdir(path):
        raise PathError(f"{flag} {path}: is a directory, expected a JSONL data file")


def data_paths(spec: str, flag: str, kind: str) -> list[str]:
    """The files of a ``--data`` / ``--eval-data`` value: one path, or (SFT) several with weights."""
    if kind != "sft" or os.path.exists(spec):
        return [spec]
    from peftkern.train.mixing import parse_data_spec

    return [source.path for source in parse_data_spec(spec, flag)]


def check_paths(cfg, kind: str) -> None:
    """Every path in ``cfg`` that this run reads exists and is what it must be (PathError otherwise)."""
    if not is_embedded(cfg.model):
        check_model_dir(cfg.model)
        if cfg.tokenizer is None:
            check_tokenizer_dir(cfg.model, "--model")
    if cfg.tokenizer is not None:
        check_tokenizer_dir(cfg.tokenizer)
    for flag, spec in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if spec:
            for path in data_paths(spec, flag, kind):
                check_data_file(path, flag)
    if cfg.rehearsal_data:
        check_data_file(cfg.rehearsal_data, "--rehearsal-data")
    if cfg.ewc and not os.path.isfile(cfg.ewc):
        raise PathError(f"--ewc {cfg.ewc}: no such Fisher file (write one with 'peftkern fisher')")
    if kind == "ppo" and cfg.reward_model:
        check_model_dir(cfg.reward_model, "--reward-model")


def load_tokenizer(cfg):
    if is_embedded(cfg.model) and cfg.tokenizer is None:
        return build_byte_tokenizer()
    path = cfg.tokenizer or cfg.model
    check_tokenizer_dir(path, "--tokenizer" if cfg.tokenizer else "--model")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(cfg, quiet: bool = False) -> nn.Module:
    """The causal LM named by ``cfg.model``: ``tiny`` (the pretrained embedded default, built and cached
    on first use), ``tiny-micro`` (a random micro model, for tests) or a local directory."""
    if cfg.model == "tiny":
        return build_pretrained_tiny(quiet=quiet)
    if cfg.model == "tiny-micro":
        return build_tiny_model("micro", seed=cfg.seed)
    check_model_dir(cfg.model)

    return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
