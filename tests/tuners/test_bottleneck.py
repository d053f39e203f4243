"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on tiny Llama, Qwen2, Mistral and GPT-2: the
model unchanged at initialization, each placement's output against the formula written by hand
from the papers, save/load bit for bit, AdapterHub's files (fixtures its ``adapters`` package
wrote, tests/fixtures/adapterhub/make_fixtures.py) giving AdapterHub's logits, LoRA beside a
parallel adapter (MAM-style), mixed batches, the trainers' flags, and bad input named before the
model changes."""
import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from peftkern.reference.bottleneck import bottleneck_adapter as formula
from peftkern.tuners import BottleneckConfig, LoraConfig, get_peft_model, load_adapter
from peftkern.tuners.bottleneck import BottleneckLayer, parameter_count
from peftkern.tuners.bottleneck.adapterhub import load_adapterhub
from tests.tuners.tiny_models import FAMILIES, logits, perturb_trainable, tiny_model, token_ids

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "adapterhub")
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def _attention(block):
    return block.self_attn if hasattr(block, "self_attn") else block.attn


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_zero_up_projection_leaves_the_model_unchanged_then_saves_and_loads_exactly(family, placement, tmp_path):
    base = tiny_model(family)
    ids = token_ids()
    before = logits(base, ids)
    model = get_peft_model(base, BottleneckConfig(placement=placement, reduction_factor=4, non_linearity="gelu"))
    assert (logits(model, ids) - before).abs().max().item() <= 1e-6
    perturb_trainable(model)
    trained = logits(model, ids)
    assert (trained - before).abs().max().item() > 1e-3  # the adapter changes the output once it trains
    model.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_model(family), tmp_path)
    assert torch.equal(logits(loaded, ids), trained)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), before)
    assert torch.equal(logits(model.unload(), ids), before)


def _hand_built(family, placement, wrapped, scaling, act):
    """The model's forward with each adapter added by hand (hooks on the plain model), from the formulas:
    Houlsby h + A(h) on the attention and feed-forward outputs; Pfeiffer y + A(y) on the block output;
    parallel h + s A(x) with x the feed-forward input."""
    plain = tiny_model(family)
    handles = []
    layers = {n: m for n, m in wrapped.named_modules() if isinstance(m, BottleneckLayer)}
    for i, block in enumerate(_blocks(plain)):
        prefix = f"transformer.h.{i}" if family == "gpt2" else f"model.layers.{i}"

        def adapter(name):
            layer = layers[name]
            d, u = layer.adapter_down["default"], layer.adapter_up["default"]
            return d.weight.detach(), d.bias.detach(), u.weight.detach(), u.bias.detach()

        def serial(weights):
            def hook(module, args, out):
                h = out[0] if isinstance(out, tuple) else out
                h = formula(h, *weights, scaling, act)
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            return hook

        def parallel(weights):
            return lambda module, args, out: formula(args[0], *weights, scaling, act, residual=out)

        attn_name = "self_attn" if family != "gpt2" else "attn"
        if placement == "houlsby":
            handles.append(_attention(block).register_forward_hook(serial(adapter(f"{prefix}.{attn_name}"))))
            handles.append(block.mlp.register_forward_hook(serial(adapter(f"{prefix}.mlp"))))
        elif placement == "pfeiffer":
            handles.append(block.register_forward_hook(serial(adapter(prefix))))
        else:
            handles.append(block.mlp.register_forward_hook(parallel(adapter(f"{prefix}.mlp"))))
    return plain


@pytest.mark.parametrize("family", ("llama", "gpt2"))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_placement_computes_the_papers_formula(family, placement):
    act = {"houlsby": "silu", "pfeiffer": "relu", "parallel": "tanh"}[placement]
    model = get_peft_model(tiny_model(family), BottleneckConfig(placement=placement, bottleneck_size=5,
                                                                non_linearity=act, scaling=1.7))
    perturb_trainable(model, scale=0.3)
    ids = token_ids()
    expected = logits(_hand_built(family, placement, model.model, 1.7, act), ids)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d))))
def test_adapterhub_files_give_adapterhubs_logits(fixture):
    folder = os.path.join(FIXTURES, fixture)
    model = tiny_model(fixture.split("-")[0])
    missing, unexpected = model.load_state_dict(load_file(os.path.join(folder, "base.safetensors")), strict=False)
    assert not missing and not unexpected
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    base = logits(model, expected["input_ids"])
    if fixture.endswith("par_bn"):
        with pytest.raises(ValueError, match="reads the block's pre-norm residual stream"):
            load_adapterhub(model, folder)
        assert torch.equal(logits(model, expected["input_ids"]), base)  # refused before any change
        return
    wrapped = load_adapterhub(model, folder)
    assert (expected["logits"] - base).abs().max() > 1e-2  # the fixture's adapter matters
    torch.testing.assert_close(logits(wrapped, expected["input_ids"]), expected["logits"], rtol=1e-5, atol=1e-5)


def test_lora_and_a_parallel_adapter_both_active(tmp_path):
    """MAM-style: a parallel bottleneck adapter on the feed-forward blocks with LoRA on attention."""
    base = tiny_model("llama")
    ids = token_ids()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("bn", BottleneckConfig(placement="parallel", reduction_factor=4, scaling=4.0))
    model.set_adapter(["default", "bn"])
    perturb_trainable(model, scale=0.2)
    both = logits(model, ids)
    model.set_adapter("default")
    lora_only = logits(model, ids)
    model.set_adapter("bn")
    bn_only = logits(model, ids)
    assert (both - lora_only).abs().max() > 1e-3 and (both - bn_only).abs().max() > 1e-3
    model.set_adapter(["default", "bn"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("adapter_down" in n for n in trainable)
    model.save_pretrained(tmp_path)
    again = load_adapter(tiny_model("llama"), tmp_path)
    load_adapter(again, tmp_path / "bn", "bn")
    again.set_adapter(["default", "bn"])
    assert torch.equal(logits(again, ids), both)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_mixed_batch_rows_run_their_own_adapter():
    model = get_peft_model(tiny_model("gpt2"), BottleneckConfig(placement="houlsby", reduction_factor=4))
    model.add_adapter("b", BottleneckConfig(placement="houlsby", reduction_factor=8))
    perturb_trainable(model, scale=0.3)
    model.set_adapter("b")
    perturb_trainable(model, scale=0.3, seed=5)
    model.eval()
    ids = token_ids(batch=3)
    names = ["default", "__base__", "b"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                row = logits(model, ids[i:i + 1])
        else:
            model.set_adapter(name)
            row = logits(model, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], row, rtol=1e-5, atol=1e-6)


def test_parameter_count_and_print(capsys):
    model = get_peft_model(tiny_model("llama"), BottleneckConfig(placement="houlsby", reduction_factor=4))
    count = parameter_count(32, 8, "houlsby", 2)
    assert count == {"per_adapter": 2 * 32 * 8 + 8 + 32, "per_block": 2 * 552, "total": 4 * 552}
    assert model.get_nb_trainable_parameters()[0] == count["total"]
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert "houlsby, hidden 32 -> bottleneck 8 (reduction factor 4), 552 params per adapter, 1,104 per block, " \
           "2,208 over 2 blocks" in out
    assert parameter_count(32, 8, "pfeiffer", 2)["total"] == parameter_count(32, 8, "parallel", 2)["total"] == 1104


def test_bad_input_is_named_before_the_model_changes():
    base = tiny_model("llama")
    snapshot = copy.deepcopy(base.state_dict())
    cases = [
        (dict(reduction_factor=64), r"reduction_factor = 64 leaves a bottleneck of 0 for hidden size 32"),
        (dict(non_linearity="softplus"), r"BottleneckConfig.non_linearity must be one of"),
        (dict(placement="sideways"), r"BottleneckConfig.placement must be one of houlsby, pfeiffer, parallel"),
        (dict(target_layers=[5]), r"target_layers \[5\] out of range: LlamaForCausalLM has 2 blocks"),
        (dict(placement="houlsby", original_ln_before=True), r"original_ln_before = True with placement 'houlsby'"),
        (dict(bottleneck_size=0), r"bottleneck_size must be a positive integer"),
    ]
    for fields, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            get_peft_model(base, BottleneckConfig(**fields))
    no_blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="cannot find the transformer blocks of Sequential"):
        get_peft_model(no_blocks, BottleneckConfig())
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    assert all(torch.equal(v, snapshot[k]) for k, v in base.state_dict().items())
    lora_inside = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match="already holds adapter layers of another method"):
        lora_inside.add_adapter("bn", BottleneckConfig(placement="houlsby"))
    assert not any(isinstance(m, BottleneckLayer) for m in lora_inside.modules())


@pytest.mark.slow
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_sft_trains_with_each_placement(placement, tmp_path):
    from peftkern.train.config import TrainConfig
    from peftkern.train.run import build_trainer

    torch.manual_seed(0)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(model="tiny-micro", out=str(tmp_path), quiet=True, log_every=1, seed=0, strategy="none",
                          batch_size=16, max_steps=12, peft="bottleneck", placement=placement, reduction_factor=4.0,
                          lr=1e-2).check()
        trainer = build_trainer("sft", cfg)
        trainer.eval_examples = trainer.eval_examples[:24]
        summary = trainer.train()
    finally:
        torch.set_num_threads(before_threads)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.02, summary
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="--placement: options of --peft bottleneck, but --peft is 'lora'"):
        TrainConfig(out=str(tmp_path), placement="parallel").check()


def test_adapterhub_files_that_do_not_fit_are_refused_before_the_model_changes(tmp_path):
    import json
    import shutil

    folder = tmp_path / "hub"
    shutil.copytree(os.path.join(FIXTURES, "llama-seq_bn"), folder)
    model = tiny_model("llama")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["config"]["use_gating"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json: config field 'use_gating' = True is not supported"):
        load_adapterhub(model, folder)
    config["config"]["use_gating"] = False
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    key = next(k for k in weights if k.endswith("adapter_up.weight"))
    weights[key] = weights[key][:, :3]
    torch.save(weights, folder / "pytorch_adapter.bin")
    message = (r"pytorch_adapter.bin: 'base_model.model.model.layers.0.adapter_up.weight' has shape \(32, 3\) "
               r"but the model's tensor for it is \(32, 8\)")
    with pytest.raises(ValueError, match=message):
        load_adapterhub(model, folder)
    weights["model.layers.0.output_adapters.adapters.bn.adapter_gate.weight"] = weights.pop(key)
    torch.save(weights, folder / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="is not a bottleneck adapter weight AdapterHub writes"):
        load_adapterhub(model, folder)
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())
