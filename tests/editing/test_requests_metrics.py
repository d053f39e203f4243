"""Requests (both file forms), the bundled facts, and the metrics against direct computation."""
import json
import math

import pytest
import torch

from peftkern.editing import (EditRequest, bundled_facts, bundled_requests, evaluate_edits, fact_sentences,
                              load_requests, ngram_entropy)
from peftkern.editing.facts import REQUESTS_PATH
from peftkern.editing.metrics import continuation_logprobs
from peftkern.editing.requests import join_target, request_from_dict
from peftkern.editing.tokens import subject_tokens
from tests.editing.micro import REQUEST, micro_model


def test_flat_and_counterfact_forms_agree(tmp_path):
    nested = {"case_id": 7, "pararel_idx": 3, "requested_rewrite": {
        "prompt": "{} plays the", "subject": "Mira Tolan", "relation_id": "P1303",
        "target_new": {"str": "harp", "id": "Q1"}, "target_true": {"str": "piano", "id": "Q2"}},
        "paraphrase_prompts": ["Mira Tolan is famous for playing the"],
        "neighborhood_prompts": ["Caspar Voss plays the"], "attribute_prompts": ["x"], "generation_prompts": ["Mira"]}
    flat = {"case_id": 7, "prompt": "{} plays the", "subject": "Mira Tolan", "target_new": "harp", "target_true": "piano",
            "paraphrase_prompts": ["Mira Tolan is famous for playing the"],
            "neighborhood_prompts": [{"prompt": "Caspar Voss plays the", "target": "piano"}], "generation_prompts": ["Mira"]}
    assert request_from_dict(nested) == request_from_dict(flat)
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(nested) + "\n\n" + json.dumps(flat) + "\n")
    a, b = load_requests(path)
    assert a == b and a.text == "Mira Tolan plays the" and a.subject_span() == (0, 10)
    (tmp_path / "r.json").write_text(json.dumps([flat]))
    assert load_requests(tmp_path / "r.json") == [b]


def test_subject_given_verbatim_and_joining():
    r = EditRequest("Velora's capital is", "Velora", "Pelm")
    assert r.text == "Velora's capital is" and r.subject_span() == (0, 6)
    assert join_target("The capital is", "Pelm") == "The capital is Pelm"
    assert join_target("The capital is ", "Pelm") == "The capital is Pelm"
    assert join_target("x", " y") == "x y"


def test_subject_token_range(tok):
    text = "The capital of Velora is"
    assert subject_tokens(tok, text, (15, 21)) == (16, 21)          # BOS shifts by one; one token per byte


def test_bundled_facts_and_requests():
    facts = bundled_facts()
    assert len(facts) == 100 and len({f.subject for f in facts}) == 100
    assert fact_sentences()[:2] == ["The capital of Velora is Tamsk.", "Velora's capital is Tamsk."]
    requests = bundled_requests()
    assert load_requests(REQUESTS_PATH) == requests                   # the shipped file is these requests
    for r in requests:
        assert r.target_new != r.target_true and len(r.neighborhood_prompts) == 5 and len(r.paraphrase_prompts) == 2
        assert all(n.target != r.target_new and r.subject not in n.prompt for n in r.neighborhood_prompts)
    assert [r.prompt for r in bundled_requests(3)] == ["The capital of {} is", "{} plays the", "{} makes"]


def test_ngram_entropy():
    assert ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * _h([3, 2]) + 4 / 3 * _h([2, 2])) / 2)
    assert ngram_entropy("same same same same") == 0.0
    assert ngram_entropy("") == 0.0


def _h(counts):
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_continuation_logprob_is_the_sum_over_target_tokens(tok):
    model = micro_model("llama")
    got = continuation_logprobs(model, tok, [("The capital of Velora is", "Pelm"), ("Hi", "x")])
    ids = [tok.bos_token_id] + list(b"The capital of Velora is Pelm")
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    start = 1 + len("The capital of Velora is")
    want = sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids)))
    assert got[0] == pytest.approx(want, rel=1e-5)
    assert len(got) == 2


def test_evaluate_edits_scores(tok):
    model = micro_model("llama")
    result = evaluate_edits(model, tok, [REQUEST], fluency=True, fluency_tokens=8)
    row = result["per_request"][0]
    new = continuation_logprobs(model, tok, [("The capital of Velora is", "Pelm"), ("Velora's capital is", "Pelm"),
                                              ("The capital of Drusk is", "Pelm")])
    old = continuation_logprobs(model, tok, [("The capital of Velora is", "Tamsk"), ("Velora's capital is", "Tamsk")])
    assert row["efficacy"] == float(new[0] > old[0]) and row["generalization"] == float(new[1] > old[1])
    assert row["specificity"] == 0.0   # the neighbour's own answer is "Pelm", the same string: not strictly better
    assert result["efficacy"] == row["efficacy"] and result["n"] == 1 and row["fluency"] >= 0


def test_neighbours_edited_in_the_same_batch_are_left_out(tok):
    model = micro_model("llama")
    other = {"prompt": "The capital of {} is", "subject": "Drusk", "target_new": "Tamsk", "target_true": "Pelm"}
    alone = evaluate_edits(model, tok, [REQUEST], fluency=False)["per_request"][0]
    together = evaluate_edits(model, tok, [REQUEST, other], fluency=False)["per_request"][0]
    assert alone["specificity"] is not None and together.get("specificity") is None
