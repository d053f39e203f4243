"""Bad configs and bad adapter files give errors that name the problem, and a failed load leaves the
model exactly as it was."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkern import LoraConfig, get_peft_model, load_adapter, save_adapter
from peftkern.tuners import AdapterLoadError, PeftKernModel
from tests.tuners.tiny_models import logits, perturb_trainable, tiny_model, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def snapshot(model):
    """Everything a failed load must leave untouched: module types, values, requires_grad."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Llama adapter on q_proj/v_proj with lm_head in modules_to_save, saved by peftkern."""
    root = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            modules_to_save=["lm_head"]))
    perturb_trainable(model)
    save_adapter(model, root)
    return root, logits(model, token_ids())


def copy_adapter(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    with open(os.path.join(src, "adapter_config.json")) as fh:
        config = json.load(fh)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(dst, "adapter_config.json"), "w") as fh:
        json.dump(config, fh)
    return dst


@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r must be a positive integer"),
    ("lora_dropout", 1.5, "lora_dropout"),
    ("bias", "some", "bias must be one of"),
    ("init_lora_weights", "pissa", "init_lora_weights"),
    ("target_modules", 3, "target_modules"),
    ("rank_pattern", {"q_proj": -1}, "rank_pattern['q_proj']"),
    ("lora_alpha", float("nan"), "lora_alpha"),
    ("task_type", "CAUSAL", "task_type"),
])
def test_invalid_config_values_name_the_field(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        LoraConfig(**{field: value})


def test_unknown_keys_warn_and_unsupported_features_error(saved, tmp_path):
    root, expected = saved
    folder = copy_adapter(root, tmp_path / "a", edit_config=lambda c: c.update(future_knob=1, other_tool="x"))
    with pytest.warns(UserWarning, match=r"\['future_knob', 'other_tool'\]"):
        model = load_adapter(tiny_model("llama"), folder)
    assert (logits(model, token_ids()) - expected).abs().max() < 1e-6
    folder = copy_adapter(root, tmp_path / "b", edit_config=lambda c: c.update(lora_bias=True))
    with pytest.raises(ValueError, match="'lora_bias'"):
        load_adapter(tiny_model("llama"), folder)
    folder = copy_adapter(root, tmp_path / "c", edit_config=lambda c: c.update(r="four"))
    with pytest.raises(ValueError, match="adapter_config.json: .*r must be"):
        load_adapter(tiny_model("llama"), folder)


def test_target_matching_nothing_lists_the_modules_and_changes_nothing():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['c_attn'\] matched no module.*q_proj"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ValueError, match="is a LlamaRMSNorm"):
        get_peft_model(model, LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(ValueError, match=r"modules_to_save: \['score'\] matched no module"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    assert_unchanged(model, before)


def _load_fails(folder, match, model=None, exc=AdapterLoadError, adapter_name="default"):
    model = model if model is not None else tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        load_adapter(model, folder, adapter_name=adapter_name)
    assert_unchanged(model, before)


def test_missing_files(saved, tmp_path):
    root, _ = saved
    _load_fails(tmp_path / "nowhere", "does not exist", exc=FileNotFoundError)
    folder = copy_adapter(root, tmp_path / "noweights")
    os.remove(folder / "adapter_model.safetensors")
    _load_fails(folder, "no adapter_model.safetensors", exc=FileNotFoundError)
    folder = copy_adapter(root, tmp_path / "noconfig")
    os.remove(folder / "adapter_config.json")
    _load_fails(folder, "no adapter_config.json", exc=FileNotFoundError)


def test_truncated_or_corrupted_weights(saved, tmp_path):
    root, _ = saved
    folder = copy_adapter(root, tmp_path / "truncated")
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _load_fails(folder, "adapter_model.safetensors: not a readable safetensors file")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _load_fails(folder, "adapter_model.safetensors: not a readable safetensors file")
    path.write_bytes(b"")
    _load_fails(folder, "not a readable safetensors file")


def test_key_that_fits_no_module_or_wrong_shape(saved, tmp_path):
    root, _ = saved
    stray = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    folder = copy_adapter(root, tmp_path / "stray", edit_tensors=lambda t: t.update({stray: torch.ones(4, 32)}))
    _load_fails(folder, "up_proj.lora_A.weight' fits no module")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    folder = copy_adapter(root, tmp_path / "shape", edit_tensors=lambda t: t.update({key: torch.ones(16, 3)}))
    _load_fails(folder, r"v_proj.lora_B.weight' has shape \(16, 3\) but .* is \(16, 4\)")
    folder = copy_adapter(root, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    _load_fails(folder, "adapter weights missing for .*v_proj.lora_B.weight")
    folder = copy_adapter(root, tmp_path / "rank", edit_config=lambda c: c.update(r=8))
    _load_fails(folder, "has shape")


def test_failed_load_into_adapted_model_keeps_its_adapters(saved, tmp_path):
    root, expected = saved
    model = load_adapter(tiny_model("llama"), root)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    folder = copy_adapter(root, tmp_path / "bad", edit_tensors=lambda t: t.update({key: torch.ones(5, 32)}))
    _load_fails(folder, "has shape", model=model, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert (logits(model, token_ids()) - expected).abs().max() < 1e-6


def test_pickled_bin_loads_only_as_weights(saved, tmp_path):
    root, expected = saved
    folder = copy_adapter(root, tmp_path / "bin")
    tensors = load_file(folder / "adapter_model.safetensors")
    os.remove(folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    assert (logits(load_adapter(tiny_model("llama"), folder), token_ids()) - expected).abs().max() < 1e-6

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled > /dev/null",))
    torch.save({"x": Payload()}, folder / "adapter_model.bin", _use_new_zipfile_serialization=True)
    _load_fails(folder, "torch.load\\(weights_only=True\\)")


def test_use_dora_without_dora_module_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_dora(name, *args, **kwargs):
        if name == "peftkern.nn.dora":
            raise ImportError("simulated: no DoRA in this install")
        return real_import(name, *args, **kwargs)
    import sys
    monkeypatch.delitem(sys.modules, "peftkern.nn.dora", raising=False)
    monkeypatch.setattr("importlib.import_module", lambda name, *a: no_dora(name))
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="use_dora=True needs peftkern.nn.dora.DoRALinear"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert_unchanged(model, before)


def test_defaults_trainability_and_api_shape(capsys):
    base = tiny_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, bias="lora_only"))  # PEFT default: c_attn
    assert isinstance(model, PeftKernModel) and model.peft_config["default"].target_modules == ["c_attn"]
    assert model.peft_config["default"].fan_in_fan_out  # Conv1D, as PEFT sets it
    trainable = sorted(n for n, p in model.model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"transformer.h.{i}.attn.c_attn.{k}" for i in range(2)
                               for k in ("base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"))
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 704 || all params: ")
    assert model.config is base.config or model.config.model_type == "gpt2"  # attributes pass through
    out = model.generate(token_ids(1, 3), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 5)
    unloaded = model.unload()
    assert type(unloaded).__name__ == "GPT2LMHeadModel"
    assert (logits(unloaded, token_ids()) - logits(base, token_ids())).abs().max() == 0
