"""Adapters move between the real peft package and peftkern with no conversion: PEFT-trained
adapters load here with PEFT's logits, peftkern-saved adapters load in PEFT with ours, the files
hold the same keys, merging and weighted combinations agree."""
import copy
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from peftkern import LoraConfig, get_peft_model, load_adapter, save_adapter  # noqa: E402
from tests.tuners.tiny_models import (FAMILIES, assert_training_gradients_match, logits,  # noqa: E402
                                     perturb_trainable, tiny_model, token_ids)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5


def lora_kwargs(family: str, variant: str) -> dict:
    """One LoraConfig (as keyword arguments valid for both packages) per feature under test."""
    gpt2 = family == "gpt2"
    targets = ["c_attn", "c_proj"] if gpt2 else ["q_proj", "v_proj", "down_proj"]
    kw = dict(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    if variant == "rslora":
        kw.update(use_rslora=True, lora_alpha=6)
    elif variant == "bias_all":
        kw.update(bias="all")
    elif variant == "modules_to_save":
        kw.update(modules_to_save=["ln_f"] if gpt2 else ["lm_head"], bias="lora_only")
    elif variant == "rank_pattern":
        kw.update(target_modules="all-linear", rank_pattern={"c_attn" if gpt2 else "q_proj": 2,
                                                              "h.1.mlp.c_fc" if gpt2 else "layers.1.mlp.up_proj": 6},
                  alpha_pattern={"c_proj" if gpt2 else "k_proj": 3})
    elif variant == "regex_layers":
        kw.update(target_modules=r".*\.1\..*(c_fc|c_attn)" if gpt2 else r".*\.1\..*(gate_proj|o_proj)")
    elif variant == "layers_to_transform":
        kw.update(layers_to_transform=[1], layers_pattern="h" if gpt2 else "layers")
    return kw


# Every family with rsLoRA, bias="all", modules_to_save, and rank/alpha patterns ("all-linear") under a
# non-default adapter name; regex targets and layers_to_transform on one RoPE family and GPT-2.
CASES = ([(f, v, "default") for f in FAMILIES for v in ("rslora", "bias_all", "modules_to_save")]
         + [(f, "rank_pattern", "other") for f in FAMILIES]
         + [(f, v, "default") for f in ("llama", "gpt2") for v in ("regex_layers", "layers_to_transform")])


def adapter_path(root, name):
    return root if name == "default" else os.path.join(root, name)


@pytest.mark.parametrize("family,variant,adapter_name", CASES)
def test_adapter_round_trip_with_peft(tmp_path, family, variant, adapter_name):
    base = tiny_model(family)
    ids = token_ids()
    kw = lora_kwargs(family, variant)
    base_logits = logits(base, ids)

    # PEFT -> peftkern
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=adapter_name)
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), adapter_path(tmp_path / "peft", adapter_name), adapter_name=adapter_name)
    expected = logits(theirs, ids)
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter should change the output"
    assert (logits(ours, ids) - expected).abs().max().item() < ATOL
    assert ours.get_nb_trainable_parameters()[0] == 0 and not ours.training  # loaded for inference, as PEFT

    # peftkern -> PEFT
    mine = get_peft_model(copy.deepcopy(base), LoraConfig(**kw), adapter_name=adapter_name)
    perturb_trainable(mine, seed=3)
    save_adapter(mine, tmp_path / "ours")
    folder = adapter_path(tmp_path / "ours", adapter_name)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, adapter_name=adapter_name)
    assert (logits(loaded, ids) - logits(mine, ids)).abs().max().item() < ATOL

    # the same config gives the same files: key names, shapes, trainable set
    peft_file = load_file(os.path.join(adapter_path(tmp_path / "peft", adapter_name), "adapter_model.safetensors"))
    our_file = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in our_file.items()} == {k: tuple(v.shape) for k, v in peft_file.items()}
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    with open(os.path.join(folder, "adapter_config.json")) as fh:
        ours_json = json.load(fh)
    with open(os.path.join(adapter_path(tmp_path / "peft", adapter_name), "adapter_config.json")) as fh:
        peft_json = json.load(fh)
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in ("r", "lora_alpha", "bias", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern",
                "modules_to_save", "layers_to_transform", "task_type", "inference_mode"):
        assert ours_json[key] == peft_json[key], key
    as_set = (lambda t: t if isinstance(t, str) else set(t))
    assert as_set(ours_json["target_modules"]) == as_set(peft_json["target_modules"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_matches_peft(tmp_path, family):
    base = tiny_model(family)
    kw = lora_kwargs(family, "modules_to_save")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    ids = token_ids()
    before = logits(ours, ids)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert type(merged_ours) is type(base)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged_ours.named_modules())
    sd_ours, sd_theirs = merged_ours.state_dict(), merged_theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for key in sd_ours:
        assert (sd_ours[key] - sd_theirs[key]).abs().max().item() < 1e-6, key
    assert (logits(merged_ours, ids) - before).abs().max().item() < ATOL


def _two_adapter_models(tmp_path, family, ranks):
    """The same two random adapters in PEFT and (loaded from PEFT's files) in peftkern."""
    base = tiny_model(family)
    kws = [dict(lora_kwargs(family, "rslora"), r=r, use_rslora=False) for r in ranks]
    kws[1]["target_modules"] = kws[1]["target_modules"][:1]  # the second adapter on fewer modules
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kws[0]), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**kws[1]))
    for name, seed in (("a", 5), ("b", 6)):
        theirs.set_adapter(name)
        perturb_trainable(theirs, seed=seed)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    load_adapter(ours, tmp_path / "b", adapter_name="b")
    return theirs, ours


def _delta(layer, name):
    return layer.get_delta_weight(name) if hasattr(layer, "get_delta_weight") else layer.delta_weight(name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapters_match_peft(tmp_path, family, combination):
    ranks = (4, 4) if combination == "linear" else (4, 2)
    theirs, ours = _two_adapter_models(tmp_path, family, ranks)
    weights = [0.7, -0.4]
    theirs.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination)
    ours.add_weighted_adapter(["a", "b"], weights, "mix", combination_type=combination)
    their_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                    if hasattr(m, "lora_A") and "mix" in m.lora_A}
    our_layers = {n: m for n, m in ours.model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A}
    assert their_layers.keys() == our_layers.keys() and our_layers
    for name, layer in our_layers.items():
        theirs_layer = their_layers[name]
        if combination != "svd":  # the factors themselves are PEFT's
            assert torch.allclose(layer.lora_A["mix"].weight, theirs_layer.lora_A["mix"].weight, atol=1e-6), name
            assert torch.allclose(layer.lora_B["mix"].weight, theirs_layer.lora_B["mix"].weight, atol=1e-6), name
        expected = _delta(theirs_layer, "mix")
        expected = expected.t() if layer.fan_in_fan_out else expected
        # svd: factors are unique only up to sign, the product to rounding
        assert (layer.delta_weight("mix") - expected).abs().max().item() < 1e-5, name
    if combination == "cat":  # cat is exact: the mix equals the weighted sum of the parts
        for layer in our_layers.values():
            parts = sum(w * layer.delta_weight(n) for n, w in zip("ab", weights) if n in layer.lora_A)
            assert (layer.delta_weight("mix") - parts).abs().max().item() < 1e-6
    ids = token_ids()
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL


def test_set_disable_delete_adapters_match_peft(tmp_path):
    theirs, ours = _two_adapter_models(tmp_path, "qwen2", (4, 4))
    ids = token_ids()
    for name in ("a", "b"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL
    theirs.base_model.set_adapter(["a", "b"])
    ours.set_adapter(["a", "b"])  # both run, summed
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL
    with theirs.disable_adapter(), ours.disable_adapter():
        assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL
        assert (logits(ours, ids) - logits(tiny_model("qwen2"), ids)).abs().max().item() < ATOL
    ours.set_adapter("b")
    ours.delete_adapter("b")
    theirs.delete_adapter("b")
    assert ours.active_adapters == ["a"] and list(ours.peft_config) == ["a"]
    theirs.set_adapter("a")
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL
    assert not any("b" in layer.lora_A for _, layer in ours.lora_layers())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_adapter_round_trip_with_peft(tmp_path, family):
    pytest.importorskip("peftkern.nn.dora")
    base = tiny_model(family)
    ids = token_ids()
    kw = dict(lora_kwargs(family, "rslora"), use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL
    save_adapter(ours, tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (logits(back, ids) - logits(theirs, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_training_gradients_match_peft(tmp_path, family):
    """A PEFT adapter loaded trainable: the same parameters train, with PEFT's gradients (the
    backward runs through peftkern.ops.lora_linear)."""
    base = tiny_model(family)
    kw = lora_kwargs(family, "modules_to_save")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert_training_gradients_match(theirs, ours, token_ids())


def test_sequence_classification_adapter_round_trip_with_peft(tmp_path):
    """task_type="SEQ_CLS": the head ("score") trains in full and is saved, as PEFT does."""
    import transformers as tf

    torch.manual_seed(0)
    base = tf.LlamaForSequenceClassification(tf.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()
    ids = token_ids()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < ATOL
    mine = get_peft_model(copy.deepcopy(base), LoraConfig(**kw))
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    perturb_trainable(mine, seed=3)
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (logits(back, ids) - logits(mine, ids)).abs().max().item() < ATOL
