"""Edits as LoRA adapters: same outputs as the dense edited weight, PEFT's files both ways,
switching off, stacking, merging; on every supported family."""
import copy

import pytest
import torch

import peftkern
from peftkern.editing import ValueSettings, combine, memit, rome
from tests.editing.micro import CORPUS, FAMILIES, PREFIXES, REQUEST, assert_same, micro_model, snapshot

LOOSE = ValueSettings(steps=4, clamp_factor=1e3)
SECOND = {"prompt": "{} plays the", "subject": "Mira Tolan", "target_new": "harp", "target_true": "piano"}


def _ids(tok):
    rows = [tok("The capital of Velora is Pelm.")["input_ids"], tok("Mira Tolan plays the harp")["input_ids"]]
    width = min(len(r) for r in rows)
    return torch.tensor([[tok.bos_token_id] + r[:width] for r in rows])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _edit(family, tok, method="rome"):
    model = micro_model(family)
    if method == "rome":
        edit = rome(model, tok, REQUEST, 1, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    else:
        edit = memit(model, tok, [REQUEST, SECOND], [0, 1], corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE,
                     mom2_weight=10.0, cache=False)
    return model, edit


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_adapter_equals_dense_edited_weight(family, method, tok):
    model, edit = _edit(family, tok, method)
    ids = _ids(tok)
    before = _logits(model, ids)
    dense = copy.deepcopy(model)
    edit.merge_into(dense)
    want = _logits(dense, ids)
    assert _rel(want, before) > 1e-4                     # the edit changes something
    wrapped = edit.apply(model)
    assert _rel(_logits(wrapped, ids), want) < 1e-5
    with wrapped.disable_adapter():                      # switched off: the original model
        assert _rel(_logits(wrapped, ids), before) < 1e-6
    merged = wrapped.merge_and_unload()
    assert _rel(_logits(merged, ids), want) < 1e-5


def test_saved_adapter_loads_in_peftkern_and_gives_the_edited_outputs(family, tok, tmp_path):
    model, edit = _edit(family, tok)
    ids = _ids(tok)
    before = _logits(model, ids)
    state = snapshot(model)
    edit.save(model, tmp_path / "edit")
    assert_same(model, state)                                     # saving leaves the model as it was
    assert sorted(p.name for p in (tmp_path / "edit").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    dense = copy.deepcopy(model)
    edit.merge_into(dense)
    loaded = peftkern.load_adapter(copy.deepcopy(model), tmp_path / "edit")
    assert _rel(_logits(loaded, ids), _logits(dense, ids)) < 1e-5
    assert _rel(_logits(loaded, ids), before) > 1e-4


@pytest.mark.peers
def test_saved_adapter_loads_in_peft(family, tok, tmp_path):
    peft = pytest.importorskip("peft")
    model, edit = _edit(family, tok, "memit")
    ids = _ids(tok)
    edit.save(model, tmp_path / "edit")
    dense = copy.deepcopy(model)
    edit.merge_into(dense)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "edit"))
    assert _rel(_logits(theirs, ids), _logits(dense, ids)) < 1e-5
    assert _rel(_logits(theirs, ids), _logits(model, ids)) > 1e-4


def test_stacked_edits_equal_their_combination(tok):
    model = micro_model("llama")
    first = rome(model, tok, REQUEST, 1, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    second = rome(model, tok, SECOND, 0, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    ids = _ids(tok)
    together = combine([first, second])
    assert together.rank("model.layers.1.mlp.down_proj") == 1 and together.rank("model.layers.0.mlp.down_proj") == 1
    dense = copy.deepcopy(model)
    together.merge_into(dense)
    wrapped = first.apply(model, "first")
    second.apply(wrapped, "second")
    assert wrapped.active_adapters == ["first", "second"]
    assert _rel(_logits(wrapped, ids), _logits(dense, ids)) < 1e-5
    wrapped.set_adapter("first")
    only_first = copy.deepcopy(micro_model("llama"))
    first.merge_into(only_first)
    assert _rel(_logits(wrapped, ids), _logits(only_first, ids)) < 1e-5


def test_combined_ranks_add_up_on_one_module(tok):
    model = micro_model("llama")
    a = rome(model, tok, REQUEST, 1, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    b = rome(model, tok, SECOND, 1, corpus=CORPUS, prefixes=PREFIXES, settings=LOOSE, cache=False)
    both = combine([a, b])
    name = "model.layers.1.mlp.down_proj"
    assert both.rank(name) == 2
    torch.testing.assert_close(both.delta_weight(name), a.delta_weight(name) + b.delta_weight(name))
    assert both.lora_config().r == 2 and both.lora_config().lora_alpha == 2
