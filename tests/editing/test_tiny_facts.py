"""On the embedded tiny model after it learned the bundled facts (slow; skipped unless that model is
in the user's cache: building it takes minutes, see benchmarks/editing_experiment.py)."""
import os

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_facts_model():
    from peftkern.editing.tiny_facts import LEARN, _key
    from peftkern.models.base import cache_root

    path = os.path.join(cache_root(), f"tiny-facts-{_key(dict(LEARN))}")  # the user's cache: module scope
    # runs before the per-test private cache of conftest.py
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.skip("the tiny model with the bundled facts is not cached (run benchmarks/editing_experiment.py)")
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def test_the_model_knows_the_bundled_facts(tiny_facts_model, tok):
    from peftkern.editing import bundled_requests
    from peftkern.editing.metrics import greedy_matches

    requests = bundled_requests(12)
    assert all(greedy_matches(tiny_facts_model, tok, [(r.text, r.target_true) for r in requests]))


def test_rome_and_memit_rewrite_a_fact_and_keep_the_neighbours(tiny_facts_model, tok):
    from peftkern.editing import ValueSettings, bundled_requests, evaluate_edits, memit, rome

    settings = ValueSettings(steps=100, lr=1.0, weight_decay=0.05, clamp_factor=10.0)
    request = bundled_requests(1)[0]                      # The capital of Velora is Tamsk -> Kelbrin
    for edit in (rome(tiny_facts_model, tok, request, 0, prefixes=[""], settings=settings, n_stat_tokens=20_000),
                 memit(tiny_facts_model, tok, [request], [0], prefixes=[""], settings=settings, n_stat_tokens=20_000)):
        edited = edit.apply(tiny_facts_model)
        try:
            result = evaluate_edits(edited, tok, [request], fluency=False)
        finally:
            edited.unload()
        assert result["efficacy"] == 1.0 and result["specificity"] == 1.0, (edit.method, result)
