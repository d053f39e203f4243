"""BitFit: only biases train; the file holds just those biases; adapters switch, disable and merge."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkern import BitFitConfig, get_peft_model, load_adapter, save_adapter
from tests.tuners.tiny_models import logits, perturb_trainable, tiny_model, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ATOL = 1e-5


def test_all_biases_train_and_nothing_else(tmp_path):
    base = tiny_model("gpt2")
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(task_type="CAUSAL_LM"))
    biases = {n: p for n, p in base.named_parameters() if n.endswith(".bias")}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == sum(p.numel() for p in biases.values())
    assert all(n.endswith("bitfit_bias.default") for n in trainable)
    ids = token_ids()
    assert (logits(model, ids) - logits(base, ids)).abs().max().item() == 0.0
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

    perturb_trainable(model)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}" for n in biases}
    for name, value in tensors.items():  # the full trained bias, as a plain model would hold it
        path = name.removeprefix("base_model.model.").removesuffix(".bias")
        layer = model.model.get_submodule(path)
        assert torch.equal(value, layer.bitfit_bias["default"])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"

    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert (logits(loaded, ids) - logits(model, ids)).abs().max().item() < ATOL
    with loaded.disable_adapter():
        assert (logits(loaded, ids) - logits(base, ids)).abs().max().item() == 0.0
    merged = copy.deepcopy(loaded).merge_and_unload()
    assert type(merged) is type(base)
    assert (logits(merged, ids) - logits(model, ids)).abs().max().item() < ATOL
    plain = copy.deepcopy(base)  # the saved file is a bias state dict for the plain model
    plain.load_state_dict({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, strict=False)
    assert (logits(plain, ids) - logits(model, ids)).abs().max().item() < ATOL


def test_chosen_modules_and_a_model_without_biases():
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="has no biases; name the linear modules"):
        get_peft_model(copy.deepcopy(base), BitFitConfig())
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(target_modules=["o_proj", "down_proj"]))
    assert model.get_nb_trainable_parameters()[0] == 2 * (32 + 32)
    perturb_trainable(model)
    merged = copy.deepcopy(model).merge_and_unload()  # the linears gain a bias
    assert merged.model.layers[0].self_attn.o_proj.bias is not None
    assert (logits(merged, token_ids()) - logits(model, token_ids())).abs().max().item() < ATOL
    with pytest.raises(ValueError, match="is a Embedding; peftkern BITFIT adapts modules with a bias"):
        get_peft_model(copy.deepcopy(base), BitFitConfig(target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="BitFitConfig.target_modules must be a list"):
        BitFitConfig(target_modules=3)


def test_two_bitfit_adapters_switch_and_sum():
    base = tiny_model("qwen2")
    model = get_peft_model(copy.deepcopy(base), BitFitConfig(), adapter_name="a")
    model.add_adapter("b", BitFitConfig(target_modules=["q_proj"]))
    for name, seed in (("a", 1), ("b", 2)):
        model.set_adapter(name)
        perturb_trainable(model, seed=seed)
    ids = token_ids()
    model.set_adapter(["a", "b"])
    both = logits(model, ids)
    hand = copy.deepcopy(base)
    for path, layer in model.adapter_layers():
        held = [n for n in ("a", "b") if n in layer.bitfit_bias]
        with torch.no_grad():
            hand.get_submodule(path).bias.add_(sum(layer.bitfit_bias[n] - layer.bias_ref[n] for n in held))
    assert (logits(hand, ids) - both).abs().max().item() < ATOL
