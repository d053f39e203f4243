"""Loading what the command line names: a model (``tiny``, ``tiny-micro`` or a local transformers
directory, optionally NF4) and its tokenizer, plus adapters (PEFT folders), with errors that name the
folder and what does not fit."""
from __future__ import annotations

import json
import os

import torch


class LoadError(ValueError):
    """A model or adapter folder that cannot be used; the message names it."""


def load_tokenizer(model: str, tokenizer: str | None = None):
    if model.startswith("tiny") and tokenizer is None:
        from peftkern.models import build_byte_tokenizer

        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    where = tokenizer or model
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{where}: no usable tokenizer files ({exc}); pass --tokenizer DIR") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model: str, nf4: bool = False, dtype: torch.dtype | None = None, device: str | None = None):
    """The causal LM: ``tiny`` (the embedded default, pretrained and cached), ``tiny-micro`` (random,
    for tests) or a transformers directory (an NF4 checkpoint written by ``peftkern quantize`` or
    bitsandbytes loads as NF4Linear layers). ``nf4`` quantizes the linears on load (QLoRA's base)."""
    if model == "tiny":
        from peftkern.models import pretrained_tiny

        lm = pretrained_tiny(quiet=True)
    elif model == "tiny-micro":
        from peftkern.models import build_tiny_model

        lm = build_tiny_model("micro")
    else:
        config_path = os.path.join(model, "config.json")
        if not os.path.isdir(model):
            raise LoadError(f"--model {model}: not 'tiny' and not a local model directory")
        if not os.path.isfile(config_path):
            raise LoadError(f"--model {model}: no config.json in the directory (not a transformers model)")
        with open(config_path, encoding="utf-8") as f:
            quantized = "quantization_config" in json.load(f)
        if quantized:
            from peftkern.nn.nf4 import load_pretrained_nf4

            lm = load_pretrained_nf4(model)
        else:
            from transformers import AutoModelForCausalLM

            if dtype is None:
                dtype = torch.bfloat16 if (device or "").startswith("cuda") else torch.float32
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    if nf4:
        import peftkern

        peftkern.quantize_model(lm)
    if device:
        lm = lm.to(device)
    return lm.eval()


def adapter_spec(spec: str) -> tuple[str, str]:
    """``DIR`` or ``NAME=DIR`` -> (name, dir); the name defaults to the folder's name."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, os.path.basename(os.path.normpath(spec)) or "default"
    if not name or not path:
        raise LoadError(f"--adapter {spec!r}: expected DIR or NAME=DIR")
    return name, path


def attach_adapters(lm, specs, active=None):
    """Load each adapter (``DIR`` or ``NAME=DIR``) into ``lm``; ``active`` names run (default: all of
    them, summed). Returns the PeftKernModel (or ``lm`` when there are none)."""
    from peftkern.tuners import AdapterLoadError, load_adapter

    names = []
    for spec in specs or []:
        name, path = adapter_spec(spec)
        if name in names:
            raise LoadError(f"--adapter {spec!r}: the name {name!r} is used twice; write NAME=DIR")
        base_name = _adapter_base(path)
        try:
            lm = load_adapter(lm, path, adapter_name=name)
        except (AdapterLoadError, ValueError) as exc:
            hint = f" (it was trained on {base_name!r})" if base_name else ""
            raise LoadError(f"--adapter {path} does not fit this model{hint}: {exc}") from None
        names.append(name)
    if names:
        lm.set_adapter(active if active is not None else names)
        lm.eval()
    return lm


def _adapter_base(path: str) -> str | None:
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            return json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def load_for_generation(model: str, adapters=(), tokenizer: str | None = None, nf4: bool = False,
                        device: str | None = None):
    """(model with its adapters, tokenizer), for ``peftkern generate`` / ``chat`` / ``eval``."""
    lm = attach_adapters(load_base(model, nf4=nf4, device=device), adapters)
    tok = load_tokenizer(model, tokenizer)
    vocab = lm.get_output_embeddings().weight.shape[0] if hasattr(lm, "get_output_embeddings") else None
    if vocab is not None and len(tok) > vocab:
        raise LoadError(f"the tokenizer has {len(tok)} tokens but the model's output layer only {vocab}: "
                        "they do not belong together (pass --tokenizer)")
    return lm, tok
