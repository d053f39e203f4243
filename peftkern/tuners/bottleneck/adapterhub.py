"""AdapterHub's saved bottleneck adapters (``adapters`` package: ``adapter_config.json`` +
``pytorch_adapter.bin``) into peftkern's bottleneck tuner, for the placements both share:

    AdapterHub config                                   peftkern
    double_seq_bn (mh_adapter + output_adapter)         placement "houlsby"
    seq_bn (output_adapter, original_ln_before=True)    placement "pfeiffer"
    seq_bn with original_ln_before=False                placement "pfeiffer", original_ln_before=False

On a pre-norm decoder (Llama, GPT-2) AdapterHub computes, per adapted sub-block with output h and
residual r, h + A(h) + r (Houlsby) and (h + r) + A(h + r) (Pfeiffer), the same functions the
tuner's layers compute. Its parallel adapter (``par_bn``) reads the block's pre-norm residual
stream, where peftkern's parallel placement reads the feed-forward input (He et al.): a different
function, refused with that reason, as are the options peftkern does not implement (adapter layer
norms, gating, PHM layers, invertible adapters, learned scaling, dropout).
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from peftkern.tuners.bottleneck.config import BottleneckConfig
from peftkern.tuners.bottleneck.tuner import find_blocks
from peftkern.tuners.config import read_config_file
from peftkern.tuners.files import AdapterLoadError
from peftkern.tuners.placing import load_tensors
from peftkern.tuners.model import PeftKernModel
from peftkern.tuners.tuner import PEFT_PREFIX

WEIGHTS_NAME = "pytorch_adapter.bin"
# BnConfig fields that must hold these values (features peftkern does not implement)
REQUIRED = {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False, "inv_adapter": None,
            "is_parallel": False, "residual_before_ln": True, "original_ln_after": True, "dropout": 0.0,
            "stochastic_depth": 0.0}
_KEY = re.compile(r"^(?P<block>.+)\.(?P<where>attention_adapters|output_adapters)\.adapters\.(?P<name>[^.]+)\."
                  r"adapter_(?P<part>down\.0|up)\.(?P<kind>weight|bias)$")


def config_from_adapterhub(data: dict, source: str) -> tuple[BottleneckConfig, list[int]]:
    """(the BottleneckConfig, the blocks left out) an AdapterHub ``adapter_config.json`` describes; a ValueError
    naming the file and the field for what peftkern does not implement."""
    bn = data.get("config") if isinstance(data, dict) else None
    if not isinstance(bn, dict) or bn.get("architecture", "bottleneck") not in ("bottleneck", None):
        raise ValueError(f"{source}: not an AdapterHub bottleneck adapter config (no 'config' object with a "
                         f"bottleneck architecture)")
    if bn.get("is_parallel"):
        raise ValueError(f"{source}: AdapterHub's parallel adapter (is_parallel) reads the block's pre-norm residual "
                         "stream; peftkern's 'parallel' placement reads the feed-forward input (He et al.), a "
                         "different function, so it is not loaded")
    for key, want in REQUIRED.items():
        if bn.get(key, want) != want:
            raise ValueError(f"{source}: config field {key!r} = {bn[key]!r} is not supported (only {want!r})")
    scaling = bn.get("scaling", 1.0)
    if isinstance(scaling, str):
        raise ValueError(f"{source}: config field 'scaling' = {scaling!r}: learned scalings are not supported")
    mh, out = bool(bn.get("mh_adapter")), bool(bn.get("output_adapter"))
    before = bool(bn.get("original_ln_before", False))
    if mh and out:
        placement = "houlsby"
    elif out and not mh:
        placement = "pfeiffer"
    else:
        raise ValueError(f"{source}: mh_adapter={mh}, output_adapter={out}: only Houlsby (both) and Pfeiffer "
                         "(output only) placements are supported")
    factor = bn.get("reduction_factor")
    if isinstance(factor, dict):
        if set(factor) != {"default"}:
            raise ValueError(f"{source}: per-layer reduction factors {factor!r} are not supported")
        factor = factor["default"]
    leave_out = bn.get("leave_out") or []
    try:
        return BottleneckConfig(placement=placement, reduction_factor=factor, non_linearity=bn.get("non_linearity"),
                                scaling=scaling, original_ln_before=before, init_weights="bert",
                                target_layers=None, task_type="CAUSAL_LM"), sorted(set(leave_out))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def _our_key(model: nn.Module, config: BottleneckConfig, block: str, where: str, part: str, kind: str) -> str:
    if where == "output_adapters":
        module = block if (config.placement == "pfeiffer" and config.serial_input_includes_residual) else f"{block}.mlp"
    else:
        attn = next(n for n in ("self_attn", "attn") if hasattr(model.get_submodule(block), n))
        module = f"{block}.{attn}"
    table = "adapter_down" if part.startswith("down") else "adapter_up"
    return f"{PEFT_PREFIX}{module}.{table}.{kind}"


def load_adapterhub(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                    is_trainable: bool = False) -> PeftKernModel:
    """Load AdapterHub's ``save_adapter`` folder (``adapter_config.json``, ``pytorch_adapter.bin`` read
    with ``torch.load(weights_only=True)``) into ``model`` as bottleneck adapter ``adapter_name``.
    Every key and shape is checked before the model changes (as :func:`peftkern.load_adapter`)."""
    folder = os.fspath(directory)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    config_path, data = read_config_file(folder)  # adapter_config.json: AdapterHub uses PEFT's file name
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r} (an AdapterHub adapter folder)")
    config, leave_out = config_from_adapterhub(data, config_path)
    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it
        raise AdapterLoadError(f"{weights_path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{weights_path}: expected a dict of tensors, got {type(raw).__name__}")
    plain = model.model if isinstance(model, PeftKernModel) else model
    _, blocks = find_blocks(plain)
    if leave_out:
        config = config.replace(target_layers=[i for i in range(len(blocks)) if i not in leave_out])
    tensors, names = {}, set()
    for key, tensor in raw.items():
        match = _KEY.match(key)
        if match is None or not isinstance(tensor, torch.Tensor):
            raise AdapterLoadError(f"{weights_path}: key {key!r} is not a bottleneck adapter weight AdapterHub writes")
        names.add(match["name"])
        tensors[_our_key(plain, config, match["block"], match["where"], match["part"], match["kind"])] = tensor
    if len(names) > 1:
        raise AdapterLoadError(f"{weights_path}: holds several adapters {sorted(names)}; save them one per folder")
    return load_tensors(model, config, tensors, adapter_name, is_trainable, weights_path)
