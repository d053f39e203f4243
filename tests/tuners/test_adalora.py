"""AdaLoRA against the real peft: the same gradients (with the orthogonality regularizer), the same
rank masks after N allocation steps on the same gradients, PEFT's files both ways (rank_pattern
and cut tensors), PEFT's logits."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkern import AdaLoraConfig, LoraConfig, get_peft_model, load_adapter, save_adapter
from tests.tuners.tiny_models import FAMILIES, logits, perturb_trainable, tiny_model, token_ids

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5


def _kw(family):
    targets = ["c_attn", "mlp.c_proj"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    return dict(init_r=6, target_r=2, total_step=10, tinit=1, tfinal=2, lora_alpha=8, target_modules=targets,
                task_type="CAUSAL_LM", orth_reg_weight=0.3)


def _twins(family, **changes):
    """PEFT's AdaLoRA model and ours holding the very same weights."""
    base = tiny_model(family)
    kw = dict(_kw(family), **changes)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kw))
    perturb_trainable(theirs, scale=0.1)
    ours = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**kw))
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    result = ours.model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return base, theirs, ours


def _grads(model, prefix):
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _train_in_step(theirs, ours, steps, lr=0.5):
    """Both models take the same SGD steps on their own gradients and allocate after each; the
    gradients and rank patterns must agree at every step."""
    ids = token_ids()
    theirs.train()
    ours.train()
    for step in range(steps):
        loss_t = theirs(input_ids=ids, labels=ids).loss
        loss_o = ours(input_ids=ids, labels=ids).loss
        assert abs(loss_t.item() - loss_o.item()) < 1e-5
        loss_t.backward()
        loss_o.backward()
        g_t, g_o = _grads(theirs, "base_model.model."), _grads(ours, "model.")
        assert g_t.keys() == g_o.keys()
        for name in g_t:
            assert torch.allclose(g_o[name], g_t[name], rtol=1e-4, atol=1e-7), (step, name)
        with torch.no_grad():
            for model in (theirs, ours):
                for p in model.parameters():
                    if p.requires_grad:
                        p.sub_(lr * p.grad)
        theirs.base_model.update_and_allocate(step)
        ours.update_and_allocate(step)
        for model in (theirs, ours):
            model.zero_grad(set_to_none=True)
        assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern, step
        e_t = {n: p for n, p in _named(theirs, "base_model.model.").items() if "lora_E" in n}
        e_o = {n: p for n, p in _named(ours, "model.").items() if "lora_E" in n}
        for name in e_t:
            assert torch.equal(e_o[name] == 0, e_t[name] == 0), (step, name)


def _named(model, prefix):
    return {n.removeprefix(prefix): p for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_and_rank_masks_match_peft(family):
    _, theirs, ours = _twins(family)
    _train_in_step(theirs, ours, steps=10)
    pattern = ours.peft_config["default"].rank_pattern
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept == 2 * len(pattern)  # the final budget: target_r per layer on average


@pytest.mark.parametrize("family", FAMILIES)
def test_files_both_ways_with_peft_after_allocation(tmp_path, family):
    base, theirs, ours = _twins(family)
    _train_in_step(theirs, ours, steps=9)
    ids = token_ids()
    theirs.eval()
    ours.eval()
    expected = logits(theirs, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3
    assert (logits(ours, ids) - expected).abs().max().item() < ATOL
    theirs.save_pretrained(tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
    for key in peft_file:
        assert torch.allclose(ours_file[key], peft_file[key], atol=1e-6), key
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_json = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_json) == set(peft_json) - {"peft_version"}
    for key in ("init_r", "target_r", "tinit", "tfinal", "total_step", "rank_pattern", "lora_alpha", "peft_type"):
        assert ours_json[key] == peft_json[key], key

    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (logits(loaded, ids) - expected).abs().max().item() < ATOL
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (logits(back, ids) - expected).abs().max().item() < ATOL
    merged = copy.deepcopy(loaded).merge_and_unload()
    assert (logits(merged, ids) - expected).abs().max().item() < ATOL


def test_orth_regularizer_in_the_loss_and_one_trainable_adapter():
    _, theirs, ours = _twins("qwen2")
    ids = token_ids()
    loss_t = theirs(input_ids=ids, labels=ids).loss
    loss_o = ours(input_ids=ids, labels=ids).loss
    plain = ours.get_base_model()(input_ids=ids, labels=ids).loss
    assert abs(loss_o.item() - loss_t.item()) < 1e-5 and loss_o.item() > plain.item() + 1e-3
    with pytest.raises(ValueError, match="AdaLoRA trains one adapter at a time"):
        ours.add_adapter("second", AdaLoraConfig(**_kw("qwen2")))
    ours.add_adapter("frozen", AdaLoraConfig(**_kw("qwen2"), inference_mode=True))
    with pytest.raises(RuntimeError, match="has no gradient; call it after backward"):
        ours.update_and_allocate(1)
    lora = get_peft_model(tiny_model("qwen2"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no trainable AdaLoRA adapter"):
        lora.update_and_allocate(0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(total_step=None), "total_step is required"),
    (dict(total_step=0), "total_step must be a positive integer"),
    (dict(tinit=8, tfinal=2), r"tinit \(8\) must be < total_step - tfinal"),
    (dict(target_r=7), r"target_r \(7\) must not exceed init_r \(6\)"),
    (dict(beta1=1.0), "beta1 must be < 1"),
    (dict(orth_reg_weight=-1), "orth_reg_weight must be >= 0"),
    (dict(deltaT=0), "deltaT must be a positive integer"),
    (dict(init_lora_weights="gaussian"), "init_lora_weights must be True or False"),
    (dict(rank_pattern={"x.lora_E": [True]}), r"rank_pattern\['x.lora_E'\] has 1 entries"),
    (dict(lora_dropout="0.1"), "lora_dropout must be a finite number"),
])
def test_bad_config_values_name_the_field(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        AdaLoraConfig(**dict(_kw("llama"), **kwargs))


def test_lora_fields_adalora_ignores_are_refused_from_files(tmp_path):
    model = get_peft_model(tiny_model("llama"), AdaLoraConfig(**_kw("llama")))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["use_rslora"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'use_rslora' = True is a PEFT feature peftkern does not implement for ADALORA"):
        load_adapter(tiny_model("llama"), tmp_path)
