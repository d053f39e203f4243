"""Bad input names the problem, and the model is exactly as it was after any failed edit."""
import json
import sys

import pytest
import torch

from peftkern.editing import EditError, ValueSettings, load_requests, memit, rome
from peftkern.editing.edit import Edit
from peftkern.editing.requests import request_from_dict
from tests.editing.micro import CORPUS, PREFIXES, REQUEST, assert_same, micro_model, snapshot

QUICK = dict(corpus=CORPUS, prefixes=PREFIXES, settings=ValueSettings(steps=2), cache=False)


class DroppingTokenizer:
    """The byte tokenizer, except that it drops every 'Q' (so a target of Qs tokenizes to nothing)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def __call__(self, text, **kw):
        return self._tok(text.replace("Q", ""), **kw)


@pytest.mark.parametrize("method", ["rome", "memit"])
@pytest.mark.parametrize("change, message", [
    (dict(subject="Atlantis"), "subject 'Atlantis' not found in prompt"),
    (dict(target_new="  "), "target_new '  ' is empty"),
])
def test_bad_request_is_named_and_model_unchanged(tok, method, change, message):
    model = micro_model("llama")
    before = snapshot(model)
    request = {**REQUEST, "prompt": "The capital of Velora is", **change}
    with pytest.raises(EditError, match=message):
        if method == "rome":
            rome(model, tok, request, 1, **QUICK)
        else:
            memit(model, tok, [REQUEST, request], [0, 1], **QUICK)
    assert_same(model, before)


def test_target_that_tokenizes_to_nothing(tok):
    model = micro_model("llama")
    before = snapshot(model)
    with pytest.raises(EditError, match="target 'QQ' tokenizes to nothing"):
        rome(model, DroppingTokenizer(tok), {**REQUEST, "target_new": "QQ"}, 1, **QUICK)
    assert_same(model, before)


@pytest.mark.parametrize("layer", [3, -1, 7])
def test_layer_out_of_range(tok, layer):
    model = micro_model("llama", layers=3)
    before = snapshot(model)
    with pytest.raises(EditError, match=f"layer {layer} is out of range: the model has 3 layers"):
        rome(model, tok, REQUEST, layer, **QUICK)
    with pytest.raises(EditError, match=f"layers entry {layer} is out of range"):
        memit(model, tok, [REQUEST], [0, layer], **QUICK)
    assert_same(model, before)


def test_failures_midway_leave_the_model_unchanged(tok, monkeypatch):
    """A failure inside the optimization (hooks registered, eval mode set) or after it undoes all of it."""
    model = micro_model("llama").train()
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("broke midway")

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", broken)
        with pytest.raises(RuntimeError, match="broke midway"):
            rome(model, tok, REQUEST, 1, **QUICK)
        assert_same(model, before)
        with pytest.raises(RuntimeError, match="broke midway"):
            memit(model, tok, [REQUEST], [0, 1], **QUICK)
        assert_same(model, before)
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["peftkern.editing.memit"], "solve_cov", broken)
        with pytest.raises(RuntimeError, match="broke midway"):
            memit(model, tok, [REQUEST], [0, 1], **QUICK)
        assert_same(model, before)
    with pytest.raises(EditError, match="singular"):
        rome(model, tok, REQUEST, 1, corpus=["ab"], prefixes=PREFIXES, settings=ValueSettings(steps=1), cache=False)
    assert_same(model, before)


def test_applying_an_edit_that_does_not_fit_leaves_the_model_unchanged(tok):
    model = micro_model("llama")
    before = snapshot(model)
    name = "model.layers.1.mlp.down_proj"
    bad = Edit("rome", {name: (torch.zeros(1, 5, dtype=torch.float64), torch.zeros(32, 1, dtype=torch.float64))},
               [1], [])
    with pytest.raises(EditError, match="do not fit"):
        bad.apply(model)
    assert_same(model, before)


def test_bad_settings_are_named(tok):
    model = micro_model("llama")
    with pytest.raises(EditError, match="steps must be a positive integer"):
        rome(model, tok, REQUEST, 1, corpus=CORPUS, prefixes=PREFIXES, settings=ValueSettings(steps=0))
    with pytest.raises(EditError, match="kl_prompts entries need"):
        rome(model, tok, REQUEST, 1, corpus=CORPUS, prefixes=PREFIXES, settings=ValueSettings(kl_prompts=("is a",)))
    with pytest.raises(EditError, match="mom2_weight must be >= 0"):
        memit(model, tok, [REQUEST], [1], corpus=CORPUS, mom2_weight=-1.0)
    with pytest.raises(EditError, match="mom2_scale must be >= 0"):
        memit(model, tok, [REQUEST], [1], corpus=CORPUS, mom2_scale=-0.1)
    with pytest.raises(EditError, match="not both"):
        memit(model, tok, [REQUEST], [1], corpus=CORPUS, mom2_weight=10.0, mom2_scale=0.1)
    with pytest.raises(EditError, match="takes a list of requests"):
        memit(model, tok, REQUEST, [1])
    with pytest.raises(EditError, match="cannot edit a 'bert' model|cannot edit"):
        from transformers import BertConfig, BertForMaskedLM

        rome(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=32,
                                        num_attention_heads=2)), tok, REQUEST, 0)


def test_request_files_errors_name_file_and_line(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(REQUEST) + "\n" + json.dumps({**REQUEST, "colour": "red"}) + "\n")
    with pytest.raises(EditError, match=r"edits.jsonl:2: unknown keys \['colour'\]"):
        load_requests(path)
    path.write_text(json.dumps(REQUEST) + "\n{oops\n")
    with pytest.raises(EditError, match=r"edits.jsonl:2: not valid JSON"):
        load_requests(path)
    with pytest.raises(EditError, match="missing 'subject'"):
        request_from_dict({"prompt": "x", "target_new": "y"})
    with pytest.raises(EditError, match="neighborhood_prompts\\[0\\] is a plain string, which needs target_true"):
        request_from_dict({"prompt": "{} is", "subject": "a", "target_new": "b", "neighborhood_prompts": ["c is"]})
