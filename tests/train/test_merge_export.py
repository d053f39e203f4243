"""``peftkern merge`` gives a plain transformers checkpoint with the adapter model's logits (1e-5 in
fp32), for PEFT's adapters of several methods, several adapters with weights, and NF4 bases (16-bit
or requantized, with the error printed per layer); ``peftkern export`` re-shards a checkpoint."""
import json

import pytest
import torch

from peftkern.cli import main
from peftkern.nn import NF4Linear
from peftkern.train.merging import load_with_adapters
from peftkern.train.pretrained import load_pretrained
from tests.helpers import rel_error
from tests.train.checkpoints import VOCAB, files, tiny_llama
from tests.train.test_adapter_flag import _peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def _merged(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not any("lora" in n for n, _ in model.named_parameters())
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_matches_the_peft_adapter_model(tmp_path, method):
    tiny_llama(tmp_path / "base", dtype=torch.float32, tied=method == "lora")
    config = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
              "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"],
                                      use_dora=True, lora_dropout=0.0),
              "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])}[method]
    adapter_model = _peft_adapter(tmp_path / "base", tmp_path / "adapter", config).eval()
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--dtype", "fp32", "--max-shard-size", "100KB"]) == 0
    assert "model.safetensors.index.json" in files(tmp_path / "merged") and "tokenizer.json" in files(tmp_path / "merged")
    assert rel_error(_logits(_merged(tmp_path / "merged")), _logits(adapter_model)) < 1e-5


def test_two_lora_adapters_with_weights(tmp_path):
    tiny_llama(tmp_path / "base", dtype=torch.float32)
    a = _peft_adapter(tmp_path / "base", tmp_path / "a", peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj"], lora_dropout=0.0), seed=1)
    _peft_adapter(tmp_path / "base", tmp_path / "b", peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True,
                                                                   target_modules=["v_proj", "up_proj"],
                                                                   lora_dropout=0.0), seed=2)
    a.load_adapter(str(tmp_path / "b"), adapter_name="b")
    a.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    a.set_adapter("mix")
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"), "--adapter",
                 str(tmp_path / "b"), "--weights", "0.7,-0.4", "--out", str(tmp_path / "merged"), "--dtype",
                 "fp32"]) == 0
    assert rel_error(_logits(_merged(tmp_path / "merged")), _logits(a.eval())) < 1e-5
    # without weights: both adapters as the model runs them together
    both, _ = load_with_adapters(str(tmp_path / "base"), [str(tmp_path / "a"), str(tmp_path / "b")], "fp32")
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "a"), "--adapter",
                 str(tmp_path / "b"), "--out", str(tmp_path / "merged2"), "--dtype", "fp32"]) == 0
    assert rel_error(_logits(_merged(tmp_path / "merged2")), _logits(both)) < 1e-5


def test_merge_on_an_nf4_base_16_bit_and_requantized(tmp_path, capsys):
    tiny_llama(tmp_path / "base", dtype=torch.float32)
    _peft_adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "gate_proj", "down_proj"], lora_dropout=0.0))
    adapter_model, _ = load_with_adapters(str(tmp_path / "base"), [str(tmp_path / "adapter")], "fp32", quant="nf4")
    assert isinstance(adapter_model.model.model.layers[0].mlp.up_proj, NF4Linear)
    expected = _logits(adapter_model)
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--quant", "nf4",
            "--dtype", "fp32"]
    assert main(args + ["--out", str(tmp_path / "m16")]) == 0
    assert rel_error(_logits(_merged(tmp_path / "m16")), expected) < 1e-5
    assert main(args + ["--requantize", "--out", str(tmp_path / "m4")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj: " in out and "model.layers.1.mlp.down_proj: " in out
    errors = [float(line.split(": ")[1]) for line in out.splitlines() if line.startswith("  model.")]
    assert len(errors) == 6 and all(0 < e < 0.2 for e in errors)
    config = json.loads((tmp_path / "m4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    requantized = load_pretrained(str(tmp_path / "m4"), "fp32", "cpu")
    assert isinstance(requantized.model.layers[0].mlp.gate_proj, NF4Linear)
    assert rel_error(_logits(requantized), expected) < 0.1


def test_export_reshards_and_casts(tmp_path, capsys):
    tiny_llama(tmp_path / "base", dtype=torch.float32, tied=True)
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "small"), "--max-shard-size", "60KB"]) == 0
    names = files(tmp_path / "small")
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 3 and "model.safetensors.index.json" in names and "tokenizer.json" in names
    assert torch.equal(_logits(_merged(tmp_path / "small")), _logits(_merged(tmp_path / "base")))
    assert main(["export", str(tmp_path / "small"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and files(tmp_path / "bf16").count("model.safetensors") == 1
    assert main(["export", str(tmp_path / "base"), str(tmp_path / "small"), "--max-shard-size", "60KB"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_merge_bad_input(tmp_path, capsys):
    tiny_llama(tmp_path / "base", dtype=torch.float32)
    _peft_adapter(tmp_path / "base", tmp_path / "ia3", peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                    feedforward_modules=["down_proj"]))
    base = ["merge", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "m")]
    assert main(base + ["--adapter", str(tmp_path / "ia3"), "--weights", "0.5"]) == 2
    assert "--weights scales LoRA adapters only" in capsys.readouterr().err
    assert main(base + ["--adapter", str(tmp_path / "ia3"), "--weights", "0.5,1"]) == 2
    assert "2 weights for 1 adapters" in capsys.readouterr().err
    assert main(base + ["--adapter", str(tmp_path / "none")]) == 2
    assert "no such adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
