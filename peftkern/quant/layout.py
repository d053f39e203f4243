"""What a checkpoint's model looks like before any weight is read: its transformers config, an
instance with every parameter on the meta device (buffers such as rotary frequencies are real,
computed from the config), which linears are quantized, and the ``quantization_config`` that
transformers + bitsandbytes write for NF4.

Only models whose class ships with transformers load (``trust_remote_code=False``).
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
from torch import nn

_patch_lock = threading.Lock()


class ModelFolderError(ValueError):
    """A model folder whose config cannot be used; the message names the folder and the problem."""


def read_config(model_dir: str):
    """The folder's transformers config (``config.json``), never running code from the folder."""
    from transformers import AutoConfig

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{model_dir}: no config.json in it: not a transformers model folder")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text or "does not recognize this architecture" in text:
            raise ModelFolderError(f"{path}: its model type needs code from outside transformers "
                                   "(trust_remote_code), which peftkern never runs") from None
        raise ModelFolderError(f"{path}: {text.splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: not a readable config ({exc})") from None


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside create their parameters on the meta device (no memory, no init cost)
    while their buffers stay real, so values a module computes in ``__init__`` (RoPE's inverse
    frequencies) survive; the loader then puts each real parameter in place."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    with _patch_lock:
        nn.Module.register_parameter = register
        try:
            yield
        finally:
            nn.Module.register_parameter = original


def empty_causal_lm(config, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_config(config)`` in ``dtype`` with its parameters on meta."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        except ValueError as exc:
            raise ModelFolderError(f"model type {getattr(config, 'model_type', '?')!r}: no causal-LM class in "
                                   f"transformers for it ({str(exc).splitlines()[0]})") from None


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head (``get_output_embeddings()``; else modules named lm_head / score)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.split(".")[-1] in ("lm_head", "score")}


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantized_linears(model: nn.Module, skip: tuple[str, ...] = (), quantize_head: bool = False) -> dict[str, bool]:
    """{module name: whether its weight is stored transposed (Conv1D)} of the linears NF4 replaces,
    as transformers + bitsandbytes choose them: every ``nn.Linear`` and ``Conv1D`` except the output
    head, linears whose weight is tied to another, the module of the model's last parameter,
    the model's ``_keep_in_fp32_modules`` and names ending with one in ``skip``."""
    keep = set(skip) | set(getattr(model, "_keep_in_fp32_modules", None) or ())
    excluded = set() if quantize_head else output_head_names(model)
    if not quantize_head:
        params = list(model.named_parameters())  # tied parameters appear once: under their first name
        if params:
            excluded.add(params[-1][0].rpartition(".")[0])
        seen: dict[int, str] = {}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                if id(weight) in seen:
                    excluded |= {name, seen[id(weight)]}
                seen.setdefault(id(weight), name)
    out = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or name in excluded:
            continue
        if any(name == k or name.endswith("." + k) for k in keep):
            continue
        out[name] = is_conv1d(module)
    return out


def bnb_nf4_config(double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str] | None = None):
    """transformers' ``BitsAndBytesConfig`` for NF4 (what ``config.json`` carries as
    ``quantization_config``): ``skip_modules`` None means transformers' default (the head)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def stored_quantization(config) -> dict | None:
    """The config's ``quantization_config`` as a dict when it is bitsandbytes NF4, None when it has
    none; any other quantization raises ModelFolderError."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    method, kind = qconfig.get("quant_method"), qconfig.get("bnb_4bit_quant_type", "nf4")
    if method not in (None, "bitsandbytes") or not qconfig.get("load_in_4bit", True) or kind != "nf4":
        raise ModelFolderError(f"quantization_config {{quant_method: {method!r}, load_in_4bit: "
                               f"{qconfig.get('load_in_4bit')!r}, bnb_4bit_quant_type: {kind!r}}}: peftkern reads "
                               "bitsandbytes NF4 4-bit checkpoints only")
    return qconfig


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the config says the weights were saved in (``dtype`` / ``torch_dtype``), if any."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
