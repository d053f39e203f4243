"""save_adapter / load_adapter: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, for
any method (the config's ``peft_type`` picks it).

Loads read and check everything before the model changes, and put the model back as it was if a
key or shape does not fit. Writes are atomic (``tuners/files.py``).
"""
from __future__ import annotations

import os

from torch import nn

from peftkern.tuners.files import (PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, AdapterLoadError, adapter_directory,
                                   find_adapter_dir, read_adapter_weights, write_adapter_files)
from peftkern.tuners.methods import read_config
from peftkern.tuners.model import PeftKernModel
from peftkern.tuners.placing import check_load_target, load_tensors
from peftkern.tuners.tuner import check_adapter_name

__all__ = ["save_adapter", "load_adapter", "load_tensors", "AdapterLoadError", "write_adapter_files", "read_adapter_weights",
           "adapter_directory", "WEIGHTS_NAME", "PICKLE_WEIGHTS_NAME"]


def save_adapter(model: PeftKernModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Save ``adapter_name`` (every adapter when None) as PEFT does: ``adapter_config.json`` and
    ``adapter_model.safetensors`` under PEFT's key names, "default" in ``directory``, others in
    ``directory/<name>``."""
    if not isinstance(model, PeftKernModel):
        raise TypeError(f"save_adapter needs the model get_peft_model/load_adapter returned, got {type(model).__name__}")
    model.save_pretrained(directory, None if adapter_name is None else [adapter_name])


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftKernModel:
    """Load an adapter folder of any method (PEFT's files) into ``model`` (a transformers model, or a
    PeftKernModel to add a further adapter to) and return the PeftKernModel.

    On a plain model the adapter becomes active; on a PeftKernModel it is added inactive, as PEFT's
    ``load_adapter`` does. Its weights train only when ``is_trainable``; otherwise the model is put
    in eval mode, as PEFT does. Any error (missing file, corrupted safetensors, unknown key, wrong
    shape) is raised before the model changes, or after putting it back as it was.
    """
    check_adapter_name(adapter_name)
    check_load_target(model, adapter_name)
    folder = find_adapter_dir(os.fspath(directory), adapter_name)
    config = read_config(folder)
    return load_tensors(model, config, read_adapter_weights(folder), adapter_name, is_trainable,
                        os.path.join(folder, WEIGHTS_NAME))
