"""CAI chains and self-critique on the micro model (random weights: the structure, the rule critic's
choices and determinism, not learning)."""
import pytest

from peftkern.alignment.cai import ChainSettings, run_chains, sft_records
from peftkern.alignment.constitution import parse_constitution
from peftkern.alignment.critique import self_critique, self_critique_answers
from peftkern.models import build_byte_tokenizer, build_tiny_model, tasks

PROMPTS = [r["prompt"] for r in tasks.prompt_records(tasks.questions(5, 3))]


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("micro", seed=1).eval(), build_byte_tokenizer()


def _constitution(checks):
    return parse_constitution({"principles": [{"name": "p", "critique_request": "Is it wrong?",
                                               "revision_request": "Fix it.", "checks": checks}]}, "test.yaml")


def test_rule_critic_revises_only_failing_answers(lm):
    model, tok = lm
    settings = ChainSettings(critic="rules", context="fresh", candidates=3, max_new_tokens=5, seed=0)
    passing = run_chains(model, tok, PROMPTS, _constitution([{"type": "max_chars", "n": 1000}]), settings)
    for c in passing:  # nothing wrong: no revision, the answer stays
        step = c["steps"][0]
        assert step["candidates"] == [] and c["final"] == c["answer"] and c["follows"] is True
        assert "follows the principle 'p'" in step["critique"]
    failing = run_chains(model, tok, PROMPTS, _constitution([{"type": "contains", "words": ["zq#zq"]}]), settings)
    for c in failing:  # always broken: 3 candidates sampled, the first kept, the chain marked as not following
        step = c["steps"][0]
        assert len(step["candidates"]) == 3 and c["final"] == step["candidates"][0]
        assert "fails contains" in step["critique"] and c["follows"] is False
    assert sft_records(failing) == [] and len(sft_records(failing, keep="all")) == sum(bool(c["final"].strip())
                                                                                       for c in failing)


def test_candidate_selection_keeps_a_passing_revision(lm):
    model, tok = lm
    # passes when the revision has at most 2 characters: some of 8 sampled candidates do
    c = _constitution([{"type": "max_chars", "n": 2}])
    chains = run_chains(model, tok, PROMPTS * 2, c, ChainSettings(critic="rules", context="fresh", candidates=8,
                                                                  max_new_tokens=3, temperature=1.5, seed=1))
    for ch in chains:
        cands = ch["steps"][0]["candidates"]
        good = [x for x in cands if len(x.strip()) <= 2]
        if cands and good:
            assert ch["final"] == good[0] and ch["follows"]


def test_model_critic_chain_and_determinism(lm):
    model, tok = lm
    c = parse_constitution({"principles": [{"critique_request": "Critique.", "revision_request": "Revise."}],
                            "examples": [{"prompt": "q", "answer": "a", "critique": "c", "revision": "r"}]}, "x.yaml")
    s = ChainSettings(revisions=2, critic="auto", context="chain", max_new_tokens=4, critique_tokens=4, seed=5)
    a = run_chains(model, tok, PROMPTS[:2], c, s)
    b = run_chains(model, tok, PROMPTS[:2], c, s)
    assert a == b
    assert all(len(x["steps"]) == 2 and x["steps"][0]["critic"] == "model" and x["follows"] is None for x in a)
    assert [r["messages"][:-1] for r in sft_records(a, "all")] == [x["prompt"] for x in a if x["final"].strip()]
    with pytest.raises(ValueError, match="critic 'rules' needs rule checks"):
        run_chains(model, tok, PROMPTS, c, ChainSettings(critic="rules"))


def test_self_critique_rounds(lm):
    model, tok = lm
    c = _constitution([{"type": "contains", "words": ["zq#zq"]}])
    s = ChainSettings(max_new_tokens=4, temperature=0.0)
    chains = self_critique(model, tok, PROMPTS[:2], c, rounds=3, settings=s)
    assert all(len(x["steps"]) == 3 for x in chains)
    assert self_critique_answers(model, tok, PROMPTS[:2], c, rounds=0, settings=s) == [x["answer"] for x in chains]
    with pytest.raises(ValueError, match="rounds"):
        self_critique(model, tok, PROMPTS, c, rounds=-1)
