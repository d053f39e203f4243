"""Causal tracing against direct computation; key statistics' cache and its fingerprint."""
import os

import pytest
import torch

from peftkern.editing import causal_trace, key_statistics, locate_layer
from peftkern.editing import stats as stats_module
from tests.editing.micro import CORPUS, REQUEST, micro_model

ONE_BYTE = {"prompt": "The capital of {} is ", "subject": "Velora", "target_new": "P", "target_true": "T"}


def _prob(model, tok, text, target):
    ids = [tok.bos_token_id] + list(text.encode())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return float(torch.softmax(logits.double(), -1)[ord(target)])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trace_clean_and_restored_probabilities(tok, family):
    model = micro_model(family)
    trace = causal_trace(model, tok, ONE_BYTE, kind="hidden", samples=3, noise=0.5)
    text = "The capital of Velora is "
    assert trace.tokens[0] == "<|bos|>" and "".join(trace.tokens[1:]) == text
    assert trace.subject == (1 + text.index("Velora"), text.index("Velora") + len("Velora"))
    assert trace.clean == pytest.approx(_prob(model, tok, text, "T"), rel=1e-5)
    assert trace.corrupted != pytest.approx(trace.clean, rel=1e-3)
    # the last layer's state at the last token decides the next token: restoring it restores P exactly
    assert float(trace.scores[-1, -1]) == pytest.approx(trace.clean, rel=1e-5)
    # positions before the subject saw no noise: restoring them changes nothing
    assert torch.allclose(trace.scores[:trace.subject[0]], torch.full_like(trace.scores[:trace.subject[0]], trace.corrupted),
                          rtol=1e-5)
    assert trace.scores.shape == (len(trace.tokens), 3)


def test_trace_without_noise_is_the_clean_run(tok):
    model = micro_model("llama")
    trace = causal_trace(model, tok, ONE_BYTE, kind="mlp", window=2, positions="subject_last", samples=2, noise=0.0)
    assert trace.corrupted == pytest.approx(trace.clean, rel=1e-6)
    assert torch.allclose(trace.scores, torch.full_like(trace.scores, trace.clean), rtol=1e-5)


def test_locate_layer_skips_the_last_layer_when_the_subject_is_not_last(tok):
    model = micro_model("llama", layers=3)
    layer, trace = locate_layer(model, tok, REQUEST, samples=3)
    assert layer == int(trace.effect[0, :2].argmax())
    assert trace.kind == "mlp" and trace.positions == [trace.subject[1]]


def test_statistics_are_cached_and_keyed_by_what_the_keys_depend_on(tok, monkeypatch, tmp_path):
    model = micro_model("llama")
    first = key_statistics(model, tok, 1, corpus=CORPUS)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(files) == 1 and files[0].endswith("model.layers.1.mlp.down_proj-" + files[0].rsplit("-", 1)[1])

    def no_collect(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    with monkeypatch.context() as patch:
        patch.setattr(stats_module, "_collect", no_collect)
        again = key_statistics(model, tok, 1, corpus=CORPUS)
        assert torch.equal(again.mom2, first.mom2) and again.count == first.count
        with torch.no_grad():                       # the edited projection itself and later layers: same keys
            model.model.layers[1].mlp.down_proj.weight.add_(1.0)
            model.model.layers[2].mlp.up_proj.weight.add_(1.0)
            model.lm_head.weight.add_(1.0)
        key_statistics(model, tok, 1, corpus=CORPUS)
        with torch.no_grad():                       # anything upstream: the keys change
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        with pytest.raises(AssertionError, match="recomputed"):
            key_statistics(model, tok, 1, corpus=CORPUS)
        with pytest.raises(AssertionError, match="recomputed"):  # another corpus
            key_statistics(model, tok, 1, corpus=CORPUS[:5])
    changed = key_statistics(model, tok, 1, corpus=CORPUS)
    assert not torch.allclose(changed.mom2, first.mom2)


def test_damaged_cache_file_is_recomputed(tok, tmp_path):
    model = micro_model("llama")
    first = key_statistics(model, tok, 0, corpus=CORPUS)
    path = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs)
    with open(path, "r+b") as fh:
        fh.truncate(40)
    again = key_statistics(model, tok, 0, corpus=CORPUS)
    assert torch.equal(again.mom2, first.mom2)


def test_token_budget(tok):
    model = micro_model("llama")
    st = key_statistics(model, tok, 0, corpus=CORPUS, n_tokens=50, cache=False)
    assert st.count == 50


def test_peak_layer_averages_the_traces(tok):
    from peftkern.editing import peak_layer

    model = micro_model("llama", layers=3)
    requests = [REQUEST, {**REQUEST, "subject": "Drusk", "target_true": "Pelm"}]
    layer, effect = peak_layer(model, tok, requests, samples=2)
    traces = [causal_trace(model, tok, r, positions="subject_last", samples=2) for r in requests]
    want = torch.stack([t.effect[0, :2] for t in traces]).mean(0)
    assert len(effect) == 2 and torch.allclose(torch.tensor(effect), want) and layer == int(want.argmax())
