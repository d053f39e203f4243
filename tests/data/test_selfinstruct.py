"""Self-Instruct: candidate parsing, each filter, the loop on a scripted model, and the embedded default."""
import json
from types import SimpleNamespace

import pytest

from peftkern.cli import main
from peftkern.data import selfinstruct as si
from peftkern.data.rouge import rouge_l
from peftkern.models import build_byte_tokenizer


def test_parse_candidates():
    assert si.parse_candidates(" Write a haiku.\nTask 9: Sort the list.\n\nTask 10: Name a color.\nAnswer: x", True) == [
        ("Write a haiku.", False), ("Sort the list.", False), ("Name a color.", False)]
    assert si.parse_candidates(" Write a long story about", False) == [("Write a long story about", True)]
    assert si.parse_candidates(" Do this.\nTask 9: Do th", False) == [("Do this.", False), ("Do th", True)]


@pytest.mark.parametrize("text, reason", [
    ("", "empty"), ("'kel' reversed.", "punctuation_start"), ("Über cool task here.", "non_ascii_start"),
    ("Too short.", "length"), (" ".join(["word"] * 151), "length"), ("Draw a cat on paper.", "keyword"),
    ("Describe the image you see.", "keyword"), ("Write a program that sorts numbers.", "keyword"),
    ("Explain how a bicycle works.", None), ("Suggest a good map-free route.", "keyword"),
])
def test_instruction_filter(text, reason):
    assert si.instruction_filter(text, False, si.SelfInstructSettings()) == reason


def test_cut_candidate_is_truncated():
    assert si.instruction_filter("Explain how a bicycle works", True, si.SelfInstructSettings()) == "truncated"


def test_output_validation():
    assert si.output_problem("Say hi.", "  ", True) == "empty"
    assert si.output_problem("Say hi.", "Hi there", False) == "truncated"
    assert si.output_problem("Say hi.", "say  HI.", True) == "echo"
    assert si.output_problem("Say hi.", "Hi!", True) is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="rouge_threshold"):
        si.SelfInstructSettings(rouge_threshold=1.5).check()
    with pytest.raises(ValueError, match="min_words 9 > max_words 3"):
        si.SelfInstructSettings(min_words=9, max_words=3).check()


SEEDS = [si.SeedTask(t) for t in ("Write a poem about the sea.", "Give three tips for staying healthy.",
                                  "Translate the sentence into Spanish.", "Summarize the article in one line.")]


def scripted(monkeypatch, instruction_outputs, answers):
    """Replace generation: instruction prompts get the scripted texts in order; answer prompts get ``answers``."""
    queue = list(instruction_outputs)
    calls = []

    def fake(lm, tok, prompts, max_new_tokens, do_sample, temperature=1.0, top_p=1.0):
        calls.append((len(prompts), do_sample))
        if do_sample:
            assert all(p.startswith(si.PROMPT_HEADER) and p.rstrip().endswith(":") for p in prompts)
            return [queue.pop(0) if queue else ("", True) for _ in prompts]
        return [answers.get(p[-1]["content"], ("A fine answer.", True)) for p in prompts]

    monkeypatch.setattr(si, "generate_batch", fake)
    return calls


def test_loop_filters_and_reports(monkeypatch):
    outputs = [
        (" Write a poem about the ocean.\nTask 6: Draw a picture of a horse.", True),  # rouge_l, keyword
        (" Explain how tides are caused by the moon.", True),  # kept
        (" explain how tides are caused by the  MOON.", True),  # the one just kept, up to case and spaces
        (" 'quoted start here.", True),  # punctuation
        (" List five fruits that are red.\nTask 6: Name a planet", False),  # kept, then cut by the token limit
        (" Describe the rules of chess briefly.", True),  # kept
        (" Suggest a name for a cat.", True),  # kept: 4th, enough
        (" Never read: n is reached.", True),
    ]
    answers = {"Describe the rules of chess briefly.": ("", True), "List five fruits that are red.": ("Apples and", False)}
    calls = scripted(monkeypatch, outputs, answers)
    tok = build_byte_tokenizer()
    lm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))
    settings = si.SelfInstructSettings(n=4, batch_size=4, seed_in_prompt=3, generated_in_prompt=2, seed=0)
    result = si.self_instruct(lm, tok, SEEDS, settings)
    kept = [a["instruction"] for a in result.instructions]
    assert kept == ["Explain how tides are caused by the moon.", "List five fruits that are red.",
                    "Describe the rules of chess briefly.", "Suggest a name for a cat."]
    reasons = [(r["reason"], r["text"]) for r in result.rejected if r["stage"] == "instruction"]
    assert reasons == [("rouge_l", "Write a poem about the ocean."), ("keyword", "Draw a picture of a horse."),
                       ("duplicate", "explain how tides are caused by the  MOON."),
                       ("punctuation_start", "'quoted start here."), ("truncated", "Name a planet")]
    rouge = next(r for r in result.rejected if r["reason"] == "rouge_l")
    assert rouge["rouge_l"] == pytest.approx(rouge_l("Write a poem about the sea.", "Write a poem about the ocean."), abs=1e-4)
    assert rouge["rouge_l"] >= 0.7 and rouge["nearest"] == "Write a poem about the sea."
    for a in result.instructions:  # every kept one is below 0.7 against everything before it
        assert a["rouge_l_to_pool"] < 0.7
    rep = result.report
    assert rep["candidates"] == 9 and rep["kept"] == 4 and rep["complete"]
    assert rep["duplicate_rate"] == pytest.approx(2 / 9)
    assert rep["rejected"]["keyword"]["count"] == 1
    assert rep["validation"] == {"checked": 4, "failed": 2, "failed_share": 0.5, "by_reason": {"empty": 1, "truncated": 1}}
    assert [r["messages"][0]["content"] for r in result.records] == [kept[0], kept[3]]
    assert rep["diversity"]["rouge_l_to_reference"]["max"] < 0.7
    assert calls[0] == (4, True) and calls[-1][1] is False


def test_loop_stops_after_max_rounds(monkeypatch):
    scripted(monkeypatch, [(" ok.", True)] * 20, {})
    lm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=None))
    result = si.self_instruct(lm, build_byte_tokenizer(), SEEDS, si.SelfInstructSettings(n=3, batch_size=2, max_rounds=2))
    assert result.instructions == [] and not result.report["complete"] and result.report["candidates"] == 4


def test_prompt_fits_the_context():
    tok = build_byte_tokenizer()
    long = ["Describe in detail a thing number %d that is long enough." % i for i in range(8)]
    prompt = si._fitted_prompt(tok, long, 200)
    assert len(tok(prompt)["input_ids"]) <= 200 and prompt.endswith(f"Task {prompt.count('Task')}:")


def test_seed_file_formats(tmp_path):
    path = tmp_path / "seed_tasks.jsonl"
    path.write_text(json.dumps({"id": "seed_task_0", "name": "x", "instruction": "Name a color.", "is_classification": False,
                                "instances": [{"input": "", "output": "Red."}]}) + "\n"
                    + json.dumps({"instruction": "Add the numbers.", "input": "1 2", "output": "3"}) + "\n")
    seeds = si.load_seed_tasks(str(path))
    assert [(s.instruction, s.output) for s in seeds] == [("Name a color.", "Red."), ("Add the numbers.\n\n1 2", "3")]


@pytest.mark.slow
def test_embedded_default_cli(tmp_path, capsys):
    """`--model tiny` (the pretrained embedded default, built and cached on first use): N instructions, filtered."""
    out = tmp_path / "si"
    code = main(["data", "self-instruct", "--model", "tiny", "--n", "4", "--out", str(out), "--quiet",
                 "--max-rounds", "20", "--augment", "1"])
    assert code == 0, capsys.readouterr().err
    instructions = [json.loads(line) for line in (out / "instructions.jsonl").read_text().splitlines()]
    assert len(instructions) == 4
    seeds = [s.instruction for s in si.bundled_seed_tasks()]
    settings = si.SelfInstructSettings()
    for i, a in enumerate(instructions):
        assert si.instruction_filter(a["instruction"], False, settings) is None
        pool = seeds + [b["instruction"] for b in instructions[:i]]
        assert max(rouge_l(p, a["instruction"]) for p in pool) < 0.7
    report = json.loads((out / "report.json").read_text())
    assert report["self_instruct"]["kept"] == 4 and report["self_instruct"]["validation"]["checked"] == 4
    assert "augment" in report
    data = (out / "data.jsonl").read_text().splitlines()
    assert len(data) == 4 - report["self_instruct"]["validation"]["failed"]
    assert "self-instruct: 4 kept of" in capsys.readouterr().out
