"""Loading a transformers folder tensor by tensor (peftkern.train.pretrained): the same model as
transformers' from_pretrained in every --dtype, sharded and tied checkpoints, NF4 quantized while
read (the same codes as quantizing the loaded model), 4-bit checkpoints read back without
requantizing, and bad input named by file and tensor."""
import json
import os

import pytest
import torch

from peftkern.nn import NF4Linear, quantize_model
from peftkern.quant import quantize_nf4
from peftkern.quant.shards import CheckpointFileError, CheckpointReader, ShardWriter
from peftkern.quant.streaming import quantize_sliced
from peftkern.train import pretrained
from peftkern.train.pretrained import DtypeError, load_pretrained
from tests.train.checkpoints import VOCAB, files, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16"])
def test_sharded_checkpoint_loads_as_transformers_does(tmp_path, tied, dtype):
    tiny_llama(tmp_path, tied=tied, shard="80KB")
    assert "model.safetensors.index.json" in files(tmp_path)
    want = {"auto": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ours = load_pretrained(str(tmp_path), dtype, "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=want)
    assert ours.lm_head.weight.dtype == want and not ours.training
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    ids = torch.randint(0, VOCAB, (2, 11))
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))


def test_nf4_quantized_while_read_equals_quantizing_the_loaded_model(tmp_path):
    tiny_llama(tmp_path, tied=True, shard="80KB")
    ours = load_pretrained(str(tmp_path), "fp32", "cpu", quant="nf4")
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    expected = quantize_model(dense, compute_dtype=torch.float32)
    layers = [n for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14 and type(ours.lm_head).__name__ == "Linear"  # the head (tied) stays 16-bit
    for name in layers:
        assert torch.equal(ours.get_submodule(name).weight, expected.get_submodule(name).weight), name
        assert torch.equal(ours.get_submodule(name).absmax, expected.get_submodule(name).absmax), name
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(_logits(ours, ids), _logits(expected, ids))


def test_gpt2_conv1d_quantized_transposed_and_checkpoint_without_prefix(tmp_path):
    model = tiny_gpt2()
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)  # as GPT-2 on the hub: the bare decoder's names
    plain = load_pretrained(str(tmp_path), "fp32", "cpu")
    ids = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(_logits(plain, ids), _logits(model.eval(), ids))
    q = load_pretrained(str(tmp_path), "fp32", "cpu", quant="nf4")
    attn = q.transformer.h[0].attn.c_attn
    assert isinstance(attn, NF4Linear) and (attn.out_features, attn.in_features) == (192, 64)
    w = model.transformer.h[0].attn.c_attn.weight.detach().t()
    assert torch.equal(attn.weight, quantize_nf4(w).packed)
    assert torch.allclose(_logits(q, ids), _logits(model, ids), rtol=0.2, atol=0.2)


def test_pytorch_bin_checkpoint_loads(tmp_path):
    model = tiny_llama()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    ours = load_pretrained(str(tmp_path), "auto", "cpu")
    ids = torch.randint(0, VOCAB, (1, 7))
    assert ours.lm_head.weight.dtype == torch.bfloat16  # the tensors' dtype (the config names none)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, use_safetensors=False)
    assert torch.equal(_logits(ours, ids), _logits(theirs, ids))


@pytest.mark.parametrize("n, blocksize, slice_elements", [(1000 * 64 + 37, 64, 4096), (4097, 128, 256), (130, 32, 64)])
def test_sliced_quantization_is_byte_identical(n, blocksize, slice_elements):
    w = torch.randn(n, dtype=torch.bfloat16)
    a, b = quantize_sliced(w, blocksize, True, slice_elements), quantize_nf4(w, blocksize, True)
    for key in ("packed", "absmax", "nested_absmax", "nested_code"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.offset == b.offset and a.shape == b.shape and a.dtype == b.dtype


def test_four_bit_checkpoint_loads_its_codes_without_requantizing(tmp_path, monkeypatch):
    from peftkern.cli import main

    tiny_llama(tmp_path / "src", tied=False)
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--no-progress", "--max-shard-size",
                 "40KB"]) == 0
    assert "model.safetensors.index.json" in files(tmp_path / "q")
    expected = load_pretrained(str(tmp_path / "src"), "bf16", "cpu", quant="nf4")

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a 4-bit checkpoint must load its stored codes")

    monkeypatch.setattr(pretrained, "quantize_sliced", no_requantizing)
    loaded = load_pretrained(str(tmp_path / "q"), "bf16", "cpu")  # --quant none: the checkpoint says 4-bit
    ids = torch.randint(0, VOCAB, (2, 6))
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, NF4Linear)
    assert torch.equal(_logits(loaded, ids), _logits(expected, ids))


def test_weights_in_their_stored_dtype_stay_in_the_file_and_never_write_it(tmp_path):
    """--dtype = the stored dtype on the CPU: the model's tensors are the file's bytes (a private
    copy-on-write mapping), not copies; writing to them (a merge) leaves the file as it was, and they
    outlive the reader. Another dtype is a copy."""
    tiny_llama(tmp_path, shard="80KB")
    shard = sorted(f for f in files(tmp_path) if f.endswith(".safetensors"))[0]
    before = (tmp_path / shard).read_bytes()
    reader = CheckpointReader(str(tmp_path))
    name = next(n for n in reader.names() if reader.info(n).file.endswith(shard))
    view = reader.mapped(name)
    assert torch.equal(view, reader.read([name])[name])
    reader.close()
    view.add_(1.0)
    assert (tmp_path / shard).read_bytes() == before
    ours = load_pretrained(str(tmp_path), "bf16", "cpu")
    kept = ours.model.embed_tokens.weight
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert _mapped_file(kept.data_ptr()).endswith(".safetensors")
    with torch.no_grad():
        kept.mul_(2.0)
    assert torch.equal(kept, 2.0 * theirs.model.embed_tokens.weight)
    assert (tmp_path / shard).read_bytes() == before
    assert _mapped_file(load_pretrained(str(tmp_path), "fp32", "cpu").model.embed_tokens.weight.data_ptr()) is None


def _mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (Linux's /proc/self/maps), None for anonymous memory."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) > 5 else ""
                return path if path.startswith("/") else None
    return None


# -- bad input -----------------------------------------------------------------------------------
def test_folder_without_weights_names_what_was_looked_for(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointFileError, match=r"no model weights in it \(looked for model.safetensors.index.json, "
                       r"model.safetensors.*weights.pt"):
        load_pretrained(str(tmp_path), "fp32", "cpu")


def test_index_naming_a_missing_shard(tmp_path):
    tiny_llama(tmp_path, shard="80KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointFileError, match=f"names the shard {shard}"):
        CheckpointReader(str(tmp_path))


def test_wrong_shape_and_missing_tensor_name_the_file_and_tensor(tmp_path):
    model = tiny_llama()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 64, dtype=torch.bfloat16)
    writer = ShardWriter(str(tmp_path))
    for k, v in state.items():
        writer.add(k, v)
    writer.close()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointFileError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has "
                       r"shape \(5, 64\), but the model built from config.json expects \(128, 64\)"):
        load_pretrained(str(tmp_path), "fp32", "cpu", quant="nf4")
    del state["model.norm.weight"]
    os.remove(tmp_path / "model.safetensors")
    writer = ShardWriter(str(tmp_path))
    for k, v in state.items():
        writer.add(k, v)
    writer.close()
    with pytest.raises(CheckpointFileError, match=r"no tensor for \['model.norm.weight'\]"):
        load_pretrained(str(tmp_path), "fp32", "cpu")


def test_truncated_shard_is_named(tmp_path):
    tiny_llama(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointFileError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(str(tmp_path), "fp32", "cpu")


def test_remote_code_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_custom_lm", "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    from peftkern.quant.layout import ModelFolderError

    with pytest.raises(ModelFolderError, match="trust_remote_code"):
        load_pretrained(str(tmp_path), "fp32", "cpu")


def test_dtype_the_device_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(DtypeError, match=r"--dtype bf16: Tesla T4 \(compute capability 7.5\) has no bf16"):
        pretrained.check_dtype_runs(torch.bfloat16, torch.device("cuda"))
    with pytest.raises(DtypeError, match="--dtype must be one of fp32, bf16, fp16 or auto"):
        pretrained.resolve_dtype("int8", None, torch.device("cpu"))
