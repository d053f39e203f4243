"""The tiny base shipped in the package: what it is, that a fresh install (empty cache) loads it
everywhere ``--model tiny`` is used, that the cache wins over it, and that other settings never load it."""
import hashlib
import json
import os

import pytest
import torch

from peftkern.models import base

SHIPPED = base.SHIPPED_DIR
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, base.SHIPPED_RECORD)),
                                reason="the package's tiny base weights are missing (scripts/train_tiny_base.py)")


def _record() -> dict:
    with open(os.path.join(SHIPPED, base.SHIPPED_RECORD)) as fh:
        return json.load(fh)


def test_shipped_weights_are_what_their_record_says():
    record = _record()
    weights = os.path.join(SHIPPED, "model.safetensors")
    assert os.path.getsize(weights) <= 20 * 2**20  # the pip package stays small
    with open(weights, "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == record["sha256"]
    assert record["settings"] == base.PRETRAIN and record["key"] == base.settings_key(base.PRETRAIN)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # a base PEFT can open
        assert os.path.isfile(os.path.join(SHIPPED, name)), name


def test_an_empty_cache_loads_the_shipped_base(tmp_path, monkeypatch):
    from peftkern.models import pretrained_tiny
    from peftkern.train.adapter_base import adapter_base
    from peftkern.train.config import TrainConfig
    from peftkern.train.pretrain import tiny_base_dir

    monkeypatch.setenv("PEFTKERN_CACHE", str(tmp_path))
    model = pretrained_tiny()  # no 'peftkern pretrain' first
    assert sum(p.numel() for p in model.parameters()) == _record()["parameters"]
    assert base.base_dir() == SHIPPED and tiny_base_dir() == SHIPPED
    assert adapter_base(TrainConfig(model="tiny"), str(tmp_path / "out")) == SHIPPED
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_the_cache_wins_and_other_settings_never_load_the_shipped_weights(tmp_path, monkeypatch):
    from peftkern.models import build_tiny_model, pretrained_tiny

    monkeypatch.setenv("PEFTKERN_CACHE", str(tmp_path))
    cached = base.cached_path()
    build_tiny_model("demo", seed=5).save_pretrained(cached)  # stands in for 'peftkern pretrain --fresh'
    assert base.base_dir() == cached
    assert torch.equal(pretrained_tiny().lm_head.weight, build_tiny_model("demo", seed=5).lm_head.weight)
    other = {"steps": base.PRETRAIN["steps"] + 1}
    assert base.shipped_path(other) is None and not base.is_cached(other)
    with pytest.raises(FileNotFoundError, match="'peftkern pretrain'"):
        pretrained_tiny(settings=other)
