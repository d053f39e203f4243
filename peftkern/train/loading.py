"""The model and tokenizer a run trains, and the checks on the paths a user gives before anything
heavy starts: ``--model`` / ``--tokenizer`` / ``--reward-model`` directories, ``--data`` /
``--eval-data`` files. A path that does not exist or is not what it must be is a PathError naming
it (never a hub client's traceback about repo ids)."""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoTokenizer

from peftkern.models import build_byte_tokenizer, build_tiny_model
from peftkern.quant.layout import ModelFolderError
from peftkern.quant.shards import CheckpointFileError, weight_files
from peftkern.train.data import read_chat_template
from peftkern.train.errors import ConfigError, PathError
from peftkern.train.pretrain import build_pretrained_tiny
from peftkern.train.pretrained import DTYPES, DtypeError, check_dtype_runs, load_pretrained

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
    """``path`` is a transformers model directory (``config.json`` and weights in it)."""
    if flag == "--model" and not os.path.exists(path):
        raise PathError(f"--model {path}: no such directory; --model takes 'tiny' or a local transformers model "
                        "directory (nothing is downloaded: fetch a hub model first, e.g. huggingface-cli download)")
    _directory(flag, path, "a transformers model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise PathError(f"{flag} {path}: no config.json in it: not a transformers model directory")
    try:
        weight_files(path)
    except CheckpointFileError as exc:
        raise PathError(f"{flag} {exc}") from None


def check_adapter_dir(path: str, flag: str = "--adapter") -> None:
    """``path`` is an adapter folder (PEFT's ``adapter_config.json`` and weights)."""
    _directory(flag, path, "an adapter folder: adapter_config.json + adapter_model.safetensors")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise PathError(f"{flag} {path}: no adapter_config.json in it: not an adapter folder (PEFT's layout)")
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise PathError(f"{flag} {path}: no adapter_model.safetensors (or adapter_model.bin) in it")


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
    if cfg.adapter:
        check_adapter_dir(cfg.adapter)
    if cfg.chat_template and not os.path.isfile(cfg.chat_template):
        raise PathError(f"--chat-template {cfg.chat_template}: no such file (expected a Jinja chat template)")
    if cfg.ewc and not os.path.isfile(cfg.ewc):
        raise PathError(f"--ewc {cfg.ewc}: no such Fisher file (write one with 'peftkern fisher')")
    if kind == "ppo" and cfg.reward_model:
        check_model_dir(cfg.reward_model, "--reward-model")


def load_tokenizer(cfg):
    """The run's tokenizer (the embedded byte tokenizer for the tiny models), with ``--chat-template``
    in place of its own template when given."""
    if is_embedded(cfg.model) and cfg.tokenizer is None:
        tok = build_byte_tokenizer()
    else:
        path = cfg.tokenizer or cfg.model
        check_tokenizer_dir(path, "--tokenizer" if cfg.tokenizer else "--model")
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(cfg, "chat_template", None):
        tok.chat_template = read_chat_template(cfg.chat_template, tok)
    return tok


def run_device() -> torch.device:
    """The device this process trains on (torchrun's LOCAL_RANK picks the GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_lm(cfg, quiet: bool = False, device: torch.device | None = None) -> nn.Module:
    """The causal LM named by ``cfg.model``: ``tiny`` (the pretrained embedded default, built and cached
    on first use), ``tiny-micro`` (a random micro model, for tests) or a local directory, read one
    tensor at a time in ``cfg.dtype`` and, with ``--quant nf4``, quantized as it is read (see
    peftkern.train.pretrained). Raises PathError / ConfigError naming the file and tensor."""
    device = device or run_device()
    if is_embedded(cfg.model):
        lm = build_pretrained_tiny(quiet=quiet) if cfg.model == "tiny" else build_tiny_model("micro", seed=cfg.seed)
        if cfg.dtype != "auto":  # the embedded models are fp32
            try:
                check_dtype_runs(DTYPES[cfg.dtype], device)
            except DtypeError as exc:
                raise ConfigError(str(exc)) from None
            lm = lm.to(DTYPES[cfg.dtype])
        return lm
    check_model_dir(cfg.model)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(desc="loading" + (" (NF4)" if cfg.quant == "nf4" else ""), unit="module", leave=False)

    def progress(done, total):
        bar.total = total
        bar.update(1)

    try:
        return load_pretrained(cfg.model, cfg.dtype, device, cfg.quant, progress=progress if bar is not None else None)
    except DtypeError as exc:
        raise ConfigError(str(exc)) from None
    except (CheckpointFileError, ModelFolderError) as exc:
        raise PathError(f"--model {exc}") from None
    finally:
        if bar is not None:
            bar.close()
