"""``model(..., adapter_names=[...])``: each row of a batch runs its own adapter ("__base__": none),
as PEFT's mixed-batch inference, on any method's layers."""
import copy

import pytest
import torch

from peftkern import LoraConfig, get_peft_model, load_adapter
from tests.tuners.tiny_models import logits, perturb_trainable, tiny_model, token_ids

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ATOL = 1e-5


def _two_lora(tmp_path, family="llama"):
    """The same two random LoRA adapters (a on attention, b on the MLP and v_proj, each with its own copy of the head)
    in PEFT and, loaded from PEFT's files, in peftkern."""
    base = tiny_model(family)
    a = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    b = dict(r=2, lora_alpha=4, target_modules=["up_proj", "v_proj"], modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**a), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**b))
    for name, seed in (("a", 5), ("b", 6)):
        theirs.set_adapter(name)
        perturb_trainable(theirs, seed=seed)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    load_adapter(ours, tmp_path / "b", adapter_name="b")
    theirs.eval()
    return base, theirs, ours


def test_mixed_batch_matches_peft(tmp_path):
    base, theirs, ours = _two_lora(tmp_path)
    ids = token_ids(batch=5, seq=6)
    names = ["a", "__base__", "b", "a", "b"]
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=names).logits
        got = ours(input_ids=ids, adapter_names=names).logits
    assert (got - expected).abs().max().item() < ATOL
    # each row equals that row run alone with its adapter active
    for i, name in enumerate(names):
        if name == "__base__":
            row = logits(base, ids[i:i + 1])
        else:
            ours.set_adapter(name)
            row = logits(ours, ids[i:i + 1])
        assert (got[i:i + 1] - row).abs().max().item() < ATOL, (i, name)
    assert (expected[[0, 3]] - expected[[2, 4]]).abs().max() > 1e-3  # the adapters differ


def test_active_adapters_are_restored_and_one_group_is_one_pass(tmp_path):
    _, _, ours = _two_lora(tmp_path)
    ours.set_adapter("b")
    ids = token_ids(batch=3)
    with torch.no_grad():
        all_a = ours(input_ids=ids, adapter_names=["a"] * 3).logits
    assert ours.active_adapters == ["b"]
    assert all(layer.active_adapters == ["b"] for _, layer in ours.adapter_layers())
    ours.set_adapter("a")
    assert (logits(ours, ids) - all_a).abs().max().item() < ATOL


def test_generate_serves_each_prompt_with_its_adapter(tmp_path):
    base, _, ours = _two_lora(tmp_path)
    ids = token_ids(batch=3, seq=4)
    names = ["b", "__base__", "a"]
    out = ours.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, name in enumerate(names):
        if name == "__base__":
            alone = base.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        else:
            ours.set_adapter(name)
            alone = ours.generate(input_ids=ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        n = alone.shape[1]  # a row that stopped at EOS alone is padded (0) in the batch
        assert torch.equal(out[i:i + 1, :n], alone) and not out[i, n:].any(), (i, name)


def test_dora_rows_equal_each_adapter_alone():
    """PEFT refuses adapter_names with DoRA; here each group runs the fused DoRA forward."""
    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True),
                           adapter_name="x")
    model.add_adapter("y", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    for name, seed in (("x", 1), ("y", 2)):
        model.set_adapter(name)
        perturb_trainable(model, seed=seed)
    model.eval()
    ids = token_ids(batch=3)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["y", "x", "__base__"]).logits
    for i, name in enumerate(["y", "x"]):
        model.set_adapter(name)
        assert (mixed[i] - logits(model, ids)[i]).abs().max().item() < ATOL
    with model.disable_adapter():
        assert (mixed[2] - logits(model, ids)[2]).abs().max().item() < ATOL


def test_bad_adapter_names_are_clear_errors(tmp_path):
    _, _, ours = _two_lora(tmp_path)
    ids = token_ids(batch=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]"):
        ours(input_ids=ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the input of this layer has 2 rows"):
        ours(input_ids=ids, adapter_names=["a", "b", "a"])
    with pytest.raises(TypeError, match="list of adapter names"):
        ours(input_ids=ids, adapter_names="a")


def test_mixed_batch_trains_each_adapter_on_its_own_rows():
    """Unlike PEFT, adapter_names= works in training: every adapter's gradient equals the gradient
    of its rows run alone with that adapter active."""
    ours = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False), adapter_name="a")
    ours.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj", "v_proj"], init_lora_weights=False))
    ours.set_adapter(["a", "b"])  # both trainable
    ours.train()
    ids = token_ids(batch=5, seq=6)
    names = ["a", "__base__", "b", "a", "b"]
    ours(input_ids=ids, adapter_names=names).logits.square().sum().backward()
    mixed = {k: p.grad.clone() for k, p in ours.named_parameters() if p.grad is not None and "lora_" in k}
    assert {k.split(".")[-2] for k in mixed} == {"a", "b"}
    for name, rows in (("a", [0, 3]), ("b", [2, 4])):
        ours.zero_grad(set_to_none=True)
        ours.set_adapter(name)
        ours(input_ids=ids[rows]).logits.square().sum().backward()
        for key, grad in mixed.items():
            if f".{name}." in key:
                alone = dict(ours.named_parameters())[key].grad
                torch.testing.assert_close(grad, alone, rtol=1e-5, atol=1e-6)


def test_lora_layers_run_one_pass_over_the_base(tmp_path, monkeypatch):
    """LoRA layers over a plain linear never group rows: the whole batch goes through
    ops.multi_lora_linear once per layer, and still matches PEFT."""
    import peftkern.nn.lora as lora_layer

    _, theirs, ours = _two_lora(tmp_path)
    calls = []
    real = lora_layer.multi_lora_linear
    monkeypatch.setattr(lora_layer, "forward_by_rows", lambda *a, **k: pytest.fail("grouped rows"))
    monkeypatch.setattr(lora_layer, "multi_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = token_ids(batch=4, seq=5)
    names = ["b", "a", "__base__", "a"]
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=names).logits
        got = ours(input_ids=ids, adapter_names=names).logits
    assert (got - expected).abs().max().item() < ATOL
    assert len(calls) == sum(1 for _, layer in ours.adapter_layers() if isinstance(layer, lora_layer.LoRALinear))


def test_lora_runs_its_base_once_and_matches_the_per_group_path(tmp_path, monkeypatch):
    """A LoRA layer over a plain linear calls its base once per mixed-batch call (one GEMM of every
    row) and adds each adapter's rank-r term to its rows; logits and, with autograd on, the adapters'
    gradients equal the generic path that runs the layer once per adapter group."""
    from peftkern.nn.lora import LoRALinear
    from peftkern.nn.mixed_batch import forward_by_rows

    _, _, ours = _two_lora(tmp_path)
    ids = token_ids(batch=5, seq=4)
    names = ["a", "a", "__base__", "b", "a"]  # a: rows 0, 1 and 4 (not contiguous), b: one row
    params = [p for n, p in ours.named_parameters() if "lora_" in n]

    def run():
        for p in params:
            p.requires_grad_(True)
        out = ours(input_ids=ids, adapter_names=names).logits
        return out.detach(), torch.autograd.grad(out.square().sum(), params)

    v_proj = next(m for n, m in ours.named_modules() if n.endswith("v_proj") and isinstance(m, LoRALinear))
    calls = []
    hook = v_proj.base_layer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    got, got_grads = run()
    hook.remove()
    assert calls == []  # multi_lora_linear reads the base weight once for every row; the module is not called
    with torch.no_grad():  # the in-place path (no autograd)
        in_place = ours(input_ids=ids, adapter_names=names).logits
    monkeypatch.setattr(LoRALinear, "_forward_rows", lambda self, x, rows: forward_by_rows(self, x, rows))
    want, want_grads = run()
    assert (got - want).abs().max().item() < ATOL
    for g, w in zip(got_grads, want_grads):
        assert (g - w).abs().max().item() < 1e-4 * (1 + w.abs().max().item())
    assert any(w.abs().max() > 0 for w in want_grads)
    assert (in_place - want).abs().max().item() < ATOL
