"""Adapters of different methods on one model: LoRA on attention, (IA)^3 on the MLP, BitFit on every
bias, all active at once; the output equals the model built by hand from their formulas, each keeps
its own name and files (LoRA's and IA3's load alone in PEFT), and save/load restores it exactly."""
import copy

import pytest
import torch

from peftkern import BitFitConfig, IA3Config, LoraConfig, get_peft_model, load_adapter
from tests.tuners.tiny_models import logits, perturb_trainable, tiny_model, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ATOL = 1e-5

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "ia3": IA3Config(target_modules=["c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    "bitfit": BitFitConfig(),
}


def _combined():
    base = tiny_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), CONFIGS["lora"], adapter_name="lora")
    model.add_adapter("ia3", CONFIGS["ia3"])
    model.add_adapter("bitfit", CONFIGS["bitfit"])
    for i, name in enumerate(CONFIGS):
        model.set_adapter(name)
        perturb_trainable(model, scale=0.2, seed=10 + i)
    model.set_adapter(list(CONFIGS))
    return base, model


def _by_hand(base, model):
    """The plain GPT-2 whose weights hold each formula: LoRA W + s B A, IA3 rows (c_fc: weight and
    bias) or input columns (mlp.c_proj), BitFit b + delta after everything else."""
    hand = copy.deepcopy(base)
    layers = {}
    for path, layer in model.adapter_layers():
        layers.setdefault(path, {})[layer.peft_type] = layer
    with torch.no_grad():
        for path, held in layers.items():
            module = hand.get_submodule(path)  # Conv1D: weight [in, out]
            w, b = module.weight.t().clone(), module.bias.clone()
            if "LORA" in held:
                lora = held["LORA"]
                w += lora.scaling["lora"] * lora.lora_B["lora"].weight @ lora.lora_A["lora"].weight
            if "IA3" in held:
                l = held["IA3"].ia3_l["ia3"].reshape(-1)
                if held["IA3"].is_feedforward:
                    w = w * l[None, :]
                else:
                    w, b = w * l[:, None], b * l
            if "BITFIT" in held:
                b = b + held["BITFIT"].bitfit_bias["bitfit"] - held["BITFIT"].bias_ref["bitfit"]
            if hasattr(module, "nf"):
                module.weight.copy_(w.t())
            module.bias.copy_(b)
    return hand


def test_outputs_equal_the_hand_composition():
    base, model = _combined()
    ids = token_ids()
    got = logits(model, ids)
    assert (got - logits(_by_hand(base, model), ids)).abs().max().item() < ATOL
    for name in CONFIGS:  # every method matters
        model.set_adapter([n for n in CONFIGS if n != name])
        assert (logits(model, ids) - got).abs().max() > 1e-3, name
    model.set_adapter(list(CONFIGS))
    stacked = [type(m).__name__ for m in model.model.transformer.h[0].attn.c_attn.modules()
               if hasattr(m, "adapter_layer_names")]
    assert stacked == ["BitFitLayer", "LoRALinear"]
    assert sorted({p.peft_type for _, p in model.adapter_layers()}) == ["BITFIT", "IA3", "LORA"]
    tables = {"lora_A", "lora_B", "ia3_l", "bitfit_bias"}
    trainable = {part for n, p in model.named_parameters() if p.requires_grad for part in n.split(".") if part in tables}
    assert trainable == tables and all(any(t in n for t in tables) for n, p in model.named_parameters()
                                       if p.requires_grad)
    merged = copy.deepcopy(model).merge_and_unload()
    assert (logits(merged, ids) - got).abs().max().item() < ATOL


def test_save_and_load_restore_it_exactly_and_each_file_is_its_method(tmp_path):
    base, model = _combined()
    ids = token_ids()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "lora", adapter_name="lora")
    for name in ("ia3", "bitfit"):
        load_adapter(loaded, tmp_path / name, adapter_name=name)
    loaded.set_adapter(list(CONFIGS))
    assert torch.equal(logits(loaded, ids), expected)
    assert {n: c.peft_type for n, c in loaded.peft_config.items()} == {"lora": "LORA", "ia3": "IA3", "bitfit": "BITFIT"}

    peft = pytest.importorskip("peft")
    for name in ("lora", "ia3"):  # alone, each file is an ordinary PEFT adapter
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name)
        model.set_adapter(name)
        assert (logits(theirs, ids) - logits(model, ids)).abs().max().item() < ATOL, name


def test_mixed_rows_across_methods():
    base, model = _combined()
    model.eval()
    ids = token_ids(batch=4)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["ia3", "lora", "__base__", "bitfit"]).logits
    for i, name in enumerate(["ia3", "lora", None, "bitfit"]):
        if name is None:
            expected = logits(base, ids)[i]
        else:
            model.set_adapter(name)
            expected = logits(model, ids)[i]
        assert (mixed[i] - expected).abs().max().item() < ATOL, name


def test_delete_takes_empty_layers_out():
    _, model = _combined()
    model.delete_adapter("bitfit")
    assert type(model.model.transformer.h[0].attn.c_attn).__name__ == "LoRALinear"
    assert type(model.model.transformer.h[0].ln_1).__name__ == "LayerNorm"
    model.set_adapter(["lora", "ia3"])
    hand_model = copy.deepcopy(model)
    assert (logits(model, token_ids()) - logits(hand_model.merge_and_unload(), token_ids())).abs().max() < ATOL
