"""``--init-adapter DIR``: train on top of an earlier adapter (an SFT run's, say). The adapter is merged
into the model before the run's own adapter is added, so the merged model is both the base the new
adapter trains on and the reference (adapters off). The merged base is written to ``<out>/base_model``
(what the new adapter names as its base) once the run holds ``--out``."""
from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from peftkern.train.adapters import merge
from peftkern.train.atomic import atomic_dir
from peftkern.train.errors import ConfigError
from peftkern.tuners import load_adapter


@dataclass
class PendingBase:
    """The merged model to write to ``path``: its module, the state dict taken right after the merge
    (the same tensors the frozen base layers keep; nothing is copied) and the tokenizer."""

    path: str
    model: nn.Module
    state: dict
    tokenizer: object

    def write(self) -> None:
        if os.path.isfile(os.path.join(self.path, "config.json")):  # a resumed run wrote it already
            return
        with atomic_dir(self.path) as tmp:
            self.model.save_pretrained(tmp, state_dict=self.state)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)


def merge_init_adapter(cfg, lm: nn.Module, tokenizer) -> tuple[nn.Module, PendingBase]:
    """(the model with ``cfg.init_adapter`` merged in, the base to write for the new adapter)."""
    try:
        lm = merge(load_adapter(lm, cfg.init_adapter, is_trainable=False))
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise ConfigError(f"--init-adapter {cfg.init_adapter}: does not fit --model {cfg.model}: {exc}") from None
    state = {k: v for k, v in lm.state_dict().items()}
    return lm, PendingBase(os.path.abspath(os.path.join(cfg.out, "base_model")), lm, state, tokenizer)


def write_pending_base(trainer) -> None:
    """Write the trainer's ``--init-adapter`` base (the main process; after the run took --out)."""
    base = getattr(trainer, "pending_base", None)
    if base is not None and trainer.dist.main:
        base.write()
    trainer.pending_base = None  # the state dict may hold tensors the run no longer uses (an NF4 base)
