"""peftkern.train.multi_adapter.train_adapters: K adapters trained together end where K separate
runs end (same seeds), and each is saved in PEFT's files."""
import json

import pytest
import torch

from peftkern import LoraConfig, load_adapter
from peftkern.train.multi_adapter import MultiAdapterSettings, train_adapters
from tests.tuners.tiny_models import VOCAB, tiny_model

CONFIGS = {
    "math": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "chat": LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "up_proj"]),
    "code": LoraConfig(r=8, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
}


def _dataset(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _lora_weights(model, name):
    return {k: v.detach().clone() for k, v in model.named_parameters() if f".{name}." in k}


def test_joint_run_equals_separate_runs(tmp_path):
    datasets = {name: _dataset(i) for i, name in enumerate(CONFIGS)}
    settings = MultiAdapterSettings(steps=4, batch_size=2, lr=2e-2, max_grad_norm=0.5, seed=3)
    joint, joint_losses = train_adapters(tiny_model("llama"), datasets, CONFIGS, settings, out=tmp_path)
    for name in CONFIGS:
        alone, alone_losses = train_adapters(tiny_model("llama"), {name: datasets[name]}, CONFIGS[name], settings)
        got, expected = _lora_weights(joint, name), _lora_weights(alone, name)
        assert got.keys() == expected.keys() and got
        for key in expected:
            assert (got[key] - expected[key]).abs().max().item() < 1e-5, (name, key)
        assert any(k.endswith("lora_B." + name + ".weight") and v.abs().max() > 1e-3 for k, v in got.items()), name
        assert joint_losses[name] == pytest.approx(alone_losses[name], rel=1e-5)
        # saved in PEFT's files, loadable on a fresh base
        files = tmp_path / name
        assert json.loads((files / "adapter_config.json").read_text())["r"] == CONFIGS[name].r
        loaded = load_adapter(tiny_model("llama"), files, adapter_name=name)
        reloaded = _lora_weights(loaded, name)
        for key in expected:
            assert torch.equal(reloaded[key], got[key]), key


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        train_adapters(tiny_model("llama"), {"a": _dataset(0)}, CONFIGS["math"], MultiAdapterSettings(batch_size=0))
    with pytest.raises(ValueError, match="no LoraConfig for adapter"):
        train_adapters(tiny_model("llama"), {"a": _dataset(0)}, {"b": CONFIGS["math"]})
    with pytest.raises(ValueError, match="pass a tokenizer"):
        train_adapters(tiny_model("llama"), {"a": [{"prompt": "x", "completion": "y"}]}, CONFIGS["math"])


def test_resume_after_an_interruption_ends_as_the_uninterrupted_run(tmp_path):
    """Checkpoints hold the adapters, AdamW, the data streams and the RNG (dropout draws from it):
    2 steps, stop, resume to 4 == 4 steps straight (losses and weights)."""
    configs = {n: LoraConfig(r=c.r, lora_alpha=c.lora_alpha, target_modules=c.target_modules, lora_dropout=0.1)
               for n, c in CONFIGS.items()}
    datasets = {name: _dataset(i, n=3) for i, name in enumerate(configs)}  # 3 examples, 2 a step: epochs turn over

    def settings(steps):
        return MultiAdapterSettings(steps=steps, batch_size=2, lr=2e-2, seed=3, save_every=2)

    straight, straight_losses = train_adapters(tiny_model("llama"), datasets, configs, settings(4),
                                               checkpoints=tmp_path / "straight")
    train_adapters(tiny_model("llama"), datasets, configs, settings(2), checkpoints=tmp_path / "cut")
    torch.manual_seed(1234)  # whatever the process did in between
    resumed, resumed_losses = train_adapters(tiny_model("llama"), datasets, configs, settings(4),
                                             checkpoints=tmp_path / "cut", resume=True)
    assert resumed_losses == straight_losses and len(resumed_losses["math"]) == 4
    for name in configs:
        got, expected = _lora_weights(resumed, name), _lora_weights(straight, name)
        assert got and all(torch.equal(got[k], expected[k]) for k in expected), name
    with pytest.raises(ValueError, match="holds adapters"):
        train_adapters(tiny_model("llama"), {"math": datasets["math"]}, configs["math"], settings(4),
                       checkpoints=tmp_path / "cut", resume=True)
