"""Reference log-prob cache: built once, loaded without the reference model, fingerprint-checked."""
import os

import pytest
import torch

from peftkern.losses import RefLogpCache


def test_build_once_then_load(tmp_path, seed):
    path = tmp_path / "ref.safetensors"
    data = [torch.randn(4), torch.randn(3)]
    calls = []

    def compute(batch):
        calls.append(1)
        assert not torch.is_grad_enabled()
        return {"chosen": batch, "rejected": batch - 1}

    cache = RefLogpCache(path, fingerprint={"model": "tiny", "data": 1})
    out = cache.load_or_build(compute, data)
    assert len(calls) == 2 and cache.exists()
    again = RefLogpCache(path, fingerprint={"model": "tiny", "data": "1"}).load_or_build(compute, data)
    assert len(calls) == 2, "the reference must not run again once the cache exists"
    torch.testing.assert_close(again["chosen"], torch.cat(data))
    torch.testing.assert_close(out["rejected"], torch.cat(data) - 1)
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    with pytest.raises(ValueError, match="was built for"):
        RefLogpCache(path, fingerprint={"model": "other"}).load()


def test_build_with_indices(tmp_path):
    batches = [(torch.tensor([2, 0]), torch.tensor([20.0, 0.0])), (torch.tensor([1]), torch.tensor([10.0]))]
    cache = RefLogpCache(tmp_path / "c.safetensors")
    out = cache.build(lambda b: {"logps": b[1]}, batches, indices=lambda b: b[0])
    torch.testing.assert_close(out["logps"], torch.tensor([0.0, 10.0, 20.0]))
    torch.testing.assert_close(cache.load()["logps"], torch.tensor([0.0, 10.0, 20.0]))


def test_bad_files_and_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        RefLogpCache(tmp_path / "missing.safetensors").load()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a peftkern"):
        RefLogpCache(tmp_path / "foreign.safetensors").load()
    with pytest.raises(ValueError, match="1-D float"):
        RefLogpCache(tmp_path / "x.safetensors").save({"x": torch.zeros(2, 2)})
