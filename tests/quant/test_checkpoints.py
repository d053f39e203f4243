"""``peftkern quantize`` writes what transformers + bitsandbytes write (the same tensors byte for
byte, the same quantization_config), transformers loads it with bitsandbytes, and our loader reads
checkpoints transformers quantized itself, with no requantization."""
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkern.cli import main
from peftkern.nn import NF4Linear
from peftkern.quant.shards import ShardWriter, parse_size
from peftkern.train.pretrained import load_pretrained
from tests.helpers import rel_error
from tests.train.checkpoints import VOCAB, files, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")


def _tensors(folder) -> dict:
    out = {}
    for name in files(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(str(folder / name)))
    return out


def _bnb_quantized(src, out):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    model.save_pretrained(out)
    return model


@pytest.mark.peers
@pytest.mark.parametrize("tied", [False, True])
def test_quantize_writes_what_transformers_and_bitsandbytes_write(tmp_path, tied):
    pytest.importorskip("bitsandbytes")
    tiny_llama(tmp_path / "src", tied=tied, shard="80KB")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "ours"), "--no-progress"]) == 0
    _bnb_quantized(tmp_path / "src", tmp_path / "theirs")
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert config["quantization_config"] == expected["quantization_config"]
    assert {k: v for k, v in config.items() if k != "transformers_version"} == \
        {k: v for k, v in expected.items() if k != "transformers_version"}
    assert "tokenizer.json" in files(tmp_path / "ours")


@pytest.mark.peers
def test_transformers_loads_our_checkpoint_with_bitsandbytes(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    tiny_llama(tmp_path / "src", dtype=torch.float32)
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--no-progress", "--compute-dtype",
                 "fp32", "--max-shard-size", "100KB"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    ours = load_pretrained(str(tmp_path / "q"), "fp32", "cpu")
    for name, module in ours.named_modules():
        if isinstance(module, NF4Linear):
            layer = theirs.get_submodule(name)
            assert type(layer).__name__ == "Linear4bit", name
            # the same codes: bitsandbytes dequantizes them to our weights exactly (before its CPU kernel
            # repacks them for its own matmul on the first forward)
            w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            assert torch.equal(w.float(), module.dequantize(torch.float32)), name
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert rel_error(b, a) < 2e-2  # bitsandbytes' CPU 4-bit kernel computes in bf16


@pytest.mark.peers
def test_a_checkpoint_transformers_quantized_loads_as_ours(tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny_llama(tmp_path / "src")
    _bnb_quantized(tmp_path / "src", tmp_path / "theirs")
    loaded = load_pretrained(str(tmp_path / "theirs"), "bf16", "cpu")
    ours = load_pretrained(str(tmp_path / "src"), "bf16", "cpu", quant="nf4")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_quantize_gpt2_conv1d_and_bad_input(tmp_path, capsys):
    tiny_gpt2(tmp_path / "gpt2")
    assert main(["quantize", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--no-progress"]) == 0
    stored = _tensors(tmp_path / "q")
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (192 * 64 // 2, 1)
    assert "lm_head.weight" not in stored  # tied to the input embedding: stored once, as transformers does
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "q2"), "--no-progress"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "gpt2"), str(tmp_path / "q"), "--no-progress"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "gpt2" / "config.json").read_text())
    assert main(["quantize", str(tmp_path / "empty"), str(tmp_path / "q3"), "--no-progress"]) == 2
    assert "no model weights in it" in capsys.readouterr().err
    assert not (tmp_path / "q3").exists()


def test_shard_writer_names_and_sizes(tmp_path):
    writer = ShardWriter(str(tmp_path), parse_size("1KB"))
    for i in range(5):
        writer.add(f"t{i}", torch.zeros(100, dtype=torch.float32))  # 400 bytes each
    writer.add("big", torch.zeros(1000))
    names = writer.close()
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400 + 4000
    assert index["weight_map"]["t2"] == "model-00002-of-00004.safetensors"
    assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6
    with pytest.raises(ValueError, match="expected a number of bytes"):
        parse_size("lots")
