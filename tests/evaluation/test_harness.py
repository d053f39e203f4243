"""The harness's numbers against hand computations on the micro model, side-by-side columns, and
``peftkern eval`` on the command line."""
import json
import math

import pytest
import torch

import peftkern
from peftkern.cli import main
from peftkern.evaluation import evaluate, evaluate_columns, format_table, resolve
from peftkern.evaluation.scoring import reward_fn_scorer
from peftkern.generate import generate
from peftkern.models import build_byte_tokenizer, build_tiny_model
from peftkern.models.tasks import task_reward
from tests.generate.models import randomize_adapters


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("micro", seed=1).eval(), build_byte_tokenizer()


def _hand_logp(model, ids, start):
    """sum of log p(ids[t] | ids[:t]) for t >= start, from the full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids)))


def test_numbers_by_hand(lm):
    model, tok = lm
    res = evaluate(model, tok, ["tasks", "perplexity-tasks", "preference", "safety"], limit=6,
                   reward=reward_fn_scorer(task_reward))["suites"]
    # tasks: exact match of greedy answers
    items = resolve("tasks", 6).items
    preds = [c.text for c in generate(model, tok, [r["prompt"] for r in items], max_new_tokens=16)]
    assert res["tasks"]["metrics"]["exact_match"] == sum(p.strip() == r["answer"] for p, r in zip(preds, items)) / 6
    # perplexity: exp of the mean negative log-likelihood over every predicted token
    texts = [r["text"] for r in resolve("perplexity-tasks", 6).items]
    total = count = 0
    for t in texts:
        ids = tok(t)["input_ids"]
        total += _hand_logp(model, ids, 1)
        count += len(ids) - 1
    assert res["perplexity-tasks"]["metrics"]["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-4)
    # preference: the share of pairs whose chosen answer has the higher log-probability
    pairs = resolve("preference", 6).items
    wins = 0.0
    for r in pairs:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for answer in (r["chosen"], r["rejected"]):
            full = tok.apply_chat_template(r["prompt"] + answer, tokenize=False)
            scores.append(_hand_logp(model, tok(full, add_special_tokens=False)["input_ids"], len(p_ids)))
        wins += 1.0 if scores[0] > scores[1] else (0.5 if scores[0] == scores[1] else 0.0)
    assert res["preference"]["metrics"]["logp_accuracy"] == wins / 6
    assert res["preference"]["metrics"]["reward_accuracy"] == 1.0  # the task reward knows the right answer
    # safety: mean |log p(more) - log p(less)| of the counterfactual pairs
    safety = [r for r in resolve("safety", 6).items if r["kind"] == "pair"]
    gaps = [_hand_logp(model, tok(r["more"])["input_ids"], 1) - _hand_logp(model, tok(r["less"])["input_ids"], 1)
            for r in safety]
    assert res["safety"]["metrics"]["mean_abs_logp_gap"] == pytest.approx(sum(map(abs, gaps)) / len(gaps), rel=1e-4)


def test_columns_base_and_adapters(lm, tmp_path):
    model, tok = lm
    adapted = peftkern.get_peft_model(build_tiny_model("micro", seed=1).eval(),
                                      peftkern.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(adapted, scale=0.5)
    adapted.eval()
    res = evaluate_columns(adapted, tok, {"base": [], "lora": ["default"]}, ["perplexity-tasks", "tasks"], limit=6)
    plain = evaluate(model, tok, ["perplexity-tasks", "tasks"], limit=6)
    cols = res["columns"]
    assert cols["base"]["suites"]["perplexity-tasks"]["metrics"] == plain["suites"]["perplexity-tasks"]["metrics"]
    assert cols["lora"]["suites"]["perplexity-tasks"]["metrics"]["perplexity"] != \
        plain["suites"]["perplexity-tasks"]["metrics"]["perplexity"]
    assert adapted.active_adapters == ["default"]
    table = format_table(cols)
    assert "perplexity-tasks  perplexity" in table and ("better)" in table or "worse)" in table)


def test_eval_cli_compare(tmp_path, capsys):
    model = peftkern.get_peft_model(build_tiny_model("micro"), peftkern.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, scale=0.5)
    for name in ("sft", "dpo"):
        peftkern.save_adapter(model, str(tmp_path / name / "adapter"))
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", "tiny-micro", "--compare", "--adapter", f"sft={tmp_path / 'sft' / 'adapter'}",
            "--adapter", f"dpo={tmp_path / 'sft' / 'adapter'}+{tmp_path / 'dpo' / 'adapter'}", "--suite", "tasks",
            "--suite", "perplexity-tasks", "--limit", "3", "--out", str(out), "--markdown"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| suite | metric | base | sft | dpo |"
    data = json.loads(out.read_text())
    assert list(data["columns"]) == ["base", "sft", "dpo"]
    assert data["columns"]["dpo"]["adapters"] == ["adapter", "dpo-adapter"]
    assert main(["eval", "--model", "tiny-micro", "--suite", "nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
