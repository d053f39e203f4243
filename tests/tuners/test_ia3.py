"""(IA)^3 against the real peft: PEFT's files both ways with PEFT's logits, the same keys and config,
PEFT's gradients for every trainable tensor, merge_and_unload as PEFT merges."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from peftkern import IA3Config, get_peft_model, load_adapter, save_adapter
from peftkern.tuners.ia3 import IA3Linear
from tests.tuners.tiny_models import (FAMILIES, assert_training_gradients_match, logits, perturb_trainable,
                                     tiny_model, token_ids)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5


def _config(family, variant):
    kw = dict(task_type="CAUSAL_LM")
    if variant == "explicit":
        if family == "gpt2":
            kw.update(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                      modules_to_save=["ln_f"])
        else:
            kw.update(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"],
                      modules_to_save=["lm_head"])
    elif variant == "regex":
        kw.update(target_modules=r".*\.(k_proj|v_proj|down_proj|c_attn|c_proj)",
                  feedforward_modules=r".*\.(down_proj|mlp\.c_proj)")
    return kw


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["default", "explicit", "regex"])
def test_files_both_ways_with_peft(tmp_path, family, variant):
    base = tiny_model(family)
    ids = token_ids()
    kw = _config(family, variant)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kw))
    perturb_trainable(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    expected = logits(theirs, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3
    assert (logits(ours, ids) - expected).abs().max().item() < ATOL
    assert any(isinstance(m, IA3Linear) for m in ours.modules())

    mine = get_peft_model(copy.deepcopy(base), IA3Config(**kw))
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert (logits(mine, ids) - logits(base, ids)).abs().max().item() < ATOL  # vectors start at 1
    perturb_trainable(mine, scale=0.3, seed=3)
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (logits(back, ids) - logits(mine, ids)).abs().max().item() < ATOL

    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in ("peft_type", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "task_type"):
        assert ours_json[key] == peft_json[key], key
    as_set = (lambda t: t if isinstance(t, str) else set(t))
    for key in ("target_modules", "feedforward_modules"):
        assert as_set(ours_json[key]) == as_set(peft_json[key]), key


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_training_gradients_match_peft(tmp_path, family):
    base = tiny_model(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**_config(family, "explicit")))
    perturb_trainable(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert_training_gradients_match(theirs, ours, token_ids())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_matches_peft(tmp_path, family):
    base = tiny_model(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**_config(family, "explicit")))
    perturb_trainable(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    ids = token_ids()
    before = logits(ours, ids)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_ours) is type(base)
    sd_ours, sd_theirs = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for key in sd_ours:
        assert (sd_ours[key] - sd_theirs[key]).abs().max().item() < 1e-6, key
    assert (logits(merged_ours, ids) - before).abs().max().item() < ATOL


def test_two_adapters_multiply_and_switch(tmp_path):
    base = tiny_model("llama")
    kw = _config("llama", "default")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kw), adapter_name="a")
    theirs.add_adapter("b", peft.IA3Config(**kw))
    for name, seed in (("a", 4), ("b", 5)):
        theirs.set_adapter(name)
        perturb_trainable(theirs, scale=0.3, seed=seed)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    load_adapter(ours, tmp_path / "b", adapter_name="b")
    ids = token_ids()
    for names in ("a", "b", ["a", "b"]):
        theirs.base_model.set_adapter(names)
        ours.set_adapter(names)
        assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL, names
    with torch.no_grad():
        mixed = ours.eval()(input_ids=token_ids(batch=3), adapter_names=["b", "__base__", "a"]).logits
    ours.set_adapter("a")
    assert (mixed[2] - logits(ours, token_ids(batch=3))[2]).abs().max().item() < ATOL


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]), "feedforward_modules must be a subset"),
    (dict(target_modules=["k_proj"], init_ia3_weights="yes"), "IA3Config.init_ia3_weights must be a bool"),
    (dict(target_modules=["k_proj"], fan_in_fan_out=1), "IA3Config.fan_in_fan_out must be a bool"),
    (dict(target_modules=7), "IA3Config.target_modules must be a list"),
    (dict(target_modules=["k_proj"], modules_to_save="lm_head"), "IA3Config.modules_to_save must be a list"),
    (dict(task_type="LM"), "IA3Config.task_type"),
])
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        IA3Config(**kwargs)


def test_unknown_keys_warn_and_feedforward_mismatch_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), IA3Config(target_modules=["k_proj", "down_proj"]))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["a_future_knob"] = 3
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="a_future_knob"):
        load_adapter(tiny_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="scale its input; adapter 'b' would scale its output"):
        model.add_adapter("b", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))
    assert list(model.peft_config) == ["default"] and os.path.exists(tmp_path / "adapter_model.safetensors")


def test_adapter_layers_compile_fullgraph():
    """Every adapter layer's forward asks for mixed-batch rows: that read must not break the graph."""
    from torch import nn

    from peftkern.nn import LoRALinear

    ia3 = IA3Linear(nn.Linear(16, 8), is_feedforward=False)
    ia3.update_layer("a")
    ia3.set_adapter("a")
    lora = LoRALinear.from_linear(nn.Linear(16, 8), r=4, lora_alpha=8)
    x = torch.randn(3, 16)
    for layer in (ia3, lora):
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        y.square().sum().backward()
        torch.testing.assert_close(y, layer(x))
    assert ia3.ia3_l["a"].grad is not None
