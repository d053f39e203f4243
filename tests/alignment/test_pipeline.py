"""The pipeline on the micro model: every stage kind runs, stacked adapters equal the merged policy,
a stopped run resumes to the same report, and bad pipeline files name the file and key."""
import json
import os

import pytest
import yaml

from peftkern.alignment.pipeline import Pipeline, run_pipeline
from peftkern.alignment.spec import PipelineError, load_spec, parse_spec
from peftkern.cli import main
from peftkern.generate import generate

TRAIN = {"max_steps": 2, "batch_size": 4, "lora_r": 4}
MICRO = {
    "model": "tiny-micro", "constitution": "tasks", "rounds": 1, "prompts_per_round": 6, "batch_size": 8,
    "eval": {"suites": ["instruct-tasks"], "limit": 4},
    "stages": [
        {"stage": "self-critique", "rounds": 1, "keep": "all",
         "chain": {"critic": "rules", "context": "fresh", "candidates": 2, "max_new_tokens": 4}},
        {"stage": "sft", "settings": TRAIN},
        {"stage": "generate-pairs", "max_new_tokens": 4},
        {"stage": "rlaif", "labeller": "policy"},
        {"stage": "dpo", "settings": TRAIN},
    ],
}


def _spec(tmp_path, data=MICRO, name="pipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
def test_every_step_and_stacked_adapters(tmp_path):
    spec = load_spec(_spec(tmp_path, {**MICRO, "adapters": "stack"}))
    out = str(tmp_path / "run")
    report = run_pipeline(spec, out, quiet=True)
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert set(report["stages"]) == {f"round-1/{s}" for s in ("self-critique", "sft", "generate-pairs", "rlaif", "dpo")}
    assert report["stages"]["round-1/rlaif"]["pairs"] == 6
    assert "instruct-tasks/prompt_accuracy" in report["rounds"][1]["metrics"]
    assert os.path.isfile(os.path.join(out, "report.json")) and os.path.isfile(os.path.join(out, "report.png"))
    pairs = [json.loads(x) for x in open(os.path.join(out, "round-1", "rlaif", "pairs.jsonl"))]
    assert all(r["confidence"] >= 0.5 and r["chosen"] != r["rejected"] for r in pairs)
    # stacked: the base with both adapters active computes what the merged policy computes
    p = Pipeline(spec, out, resume=True, quiet=True)
    assert len(p.state["adapters"]) == 2
    stacked, tok = p.load_policy()
    p.spec.adapters = "merge"
    merged, _ = p.load_policy()
    prompts = [[{"role": "user", "content": "Reverse 'abc'."}], "What is 1 + 2?"]
    a = [c.token_ids for c in generate(stacked, tok, prompts, max_new_tokens=6)]
    assert a == [c.token_ids for c in generate(merged, tok, prompts, max_new_tokens=6)]


SHORT = {**MICRO, "stages": [MICRO["stages"][0], MICRO["stages"][1], MICRO["stages"][3], MICRO["stages"][4]]}


@pytest.mark.slow
def test_stopped_run_resumes_to_the_same_report(tmp_path):
    path = _spec(tmp_path, SHORT)
    full = run_pipeline(load_spec(path), str(tmp_path / "full"), quiet=True)
    out = str(tmp_path / "stopped")
    with pytest.raises(SystemExit):
        run_pipeline(load_spec(path), out, quiet=True, stop_after="round-1/sft")
    with pytest.raises(PipelineError, match="pass --resume"):
        run_pipeline(load_spec(path), out, quiet=True)
    resumed = run_pipeline(load_spec(path), out, resume=True, quiet=True)
    assert [r["metrics"] for r in resumed["rounds"]] == [r["metrics"] for r in full["rounds"]]
    assert open(os.path.join(out, "round-1", "rlaif", "pairs.jsonl")).read() == \
        open(tmp_path / "full" / "round-1" / "rlaif" / "pairs.jsonl").read()
    changed = _spec(tmp_path, {**SHORT, "seed": 5}, "other.yaml")
    with pytest.raises(PipelineError, match="another pipeline"):
        run_pipeline(load_spec(changed), out, resume=True, quiet=True)


@pytest.mark.parametrize("change, needle", [
    ({"stages": [{"stage": "dpoo"}]}, "stages[0]: unknown stage 'dpoo'"),
    ({"stages": []}, "stages: expected a non-empty list"),
    ({"stages": [{"stage": "dpo", "settings": {"lora_rank": 4}}]}, "stages[0].settings: unknown setting 'lora_rank'"),
    ({"stages": [{"stage": "dpo", "settings": {"lr": "fast"}}]}, "stages[0].settings: lr: expected a number"),
    ({"stages": [{"stage": "rlaif", "label_threshold": 0.2}]}, "stages[0].label_threshold"),
    ({"stages": [{"stage": "cai-sl", "chain": {"critic": "friend"}}]}, "stages[0].chain: critic must be one of"),
    ({"stages": [{"stage": "sft", "labeller": "rules"}]}, "stages[0]: unknown key(s) ['labeller'] for stage sft"),
    ({"model": "/no/such/model"}, "model: /no/such/model: not 'tiny' / 'tiny-micro' and no such model directory"),
    ({"adapters": "glue"}, "adapters: expected merge or stack"),
    ({"rounds": 0}, "rounds: expected a positive integer"),
    ({"roundz": 2}, "unknown key(s) ['roundz']"),
    ({"stages": ["sft", "sft"]}, "stage name(s) ['sft'] used twice"),
])
def test_bad_pipeline_files(tmp_path, change, needle):
    path = _spec(tmp_path, {**MICRO, **change})
    with pytest.raises(PipelineError) as err:
        load_spec(path)
    assert path in str(err.value) and needle in str(err.value)


def test_constitution_error_names_its_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - {critique_request: x}\n")
    with pytest.raises(PipelineError, match=r"constitution: .*c.yaml: principles\[0\]: missing 'revision_request'"):
        parse_spec({**MICRO, "constitution": str(bad)}, "p.yaml")


def test_cli_errors(tmp_path, capsys):
    assert main(["pipeline", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "none.yaml: no such pipeline file" in capsys.readouterr().err
    assert main(["cai-sl", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing: not 'tiny' / 'tiny-micro' and no such model directory" in capsys.readouterr().err
    assert main(["rlaif", "--model", "tiny-micro", "--labeller", str(tmp_path / "judge"), "--n", "2",
                 "--out", str(tmp_path / "o2"), "--eval-suite", "none", "--quiet"]) == 2
    assert "labeller" in capsys.readouterr().err


@pytest.mark.slow
def test_cai_sl_and_rlaif_commands(tmp_path, capsys):
    out = str(tmp_path / "cai")
    small = tmp_path / "train.yaml"
    small.write_text("batch_size: 2\nlora_r: 4\n")
    assert main(["cai-sl", "--model", "tiny-micro", "--n", "4", "--max-steps", "1", "--keep", "all", "--candidates", "2",
                 "--train-config", str(small),
                 "--max-new-tokens", "4", "--out", out, "--eval-suite", "instruct-tasks", "--eval-limit", "3",
                 "--quiet"]) == 0
    assert "round 1:" in capsys.readouterr().out
    chains = [json.loads(x) for f in sorted(os.listdir(os.path.join(out, "round-1", "cai-sl", "chains")))
              if f.startswith("part-") for x in open(os.path.join(out, "round-1", "cai-sl", "chains", f))]
    assert len(chains) == 4 and all(c["steps"][0]["critic"] == "rules" for c in chains)
    policy = os.path.join(out, "round-1", "cai-sl", "policy")
    assert main(["rlaif", "--model", policy, "--n", "4", "--max-steps", "1", "--labeller", "policy",
                 "--train-config", str(small),
                 "--max-new-tokens", "4", "--out", str(tmp_path / "rl"), "--eval-suite", "none", "--quiet"]) == 0
    pairs = [json.loads(x) for x in open(tmp_path / "rl" / "round-1" / "rlaif" / "pairs.jsonl")]
    assert pairs and all({"prompt", "chosen", "rejected", "confidence"} <= set(p) for p in pairs)


def test_self_critique_command(tmp_path, capsys):
    out = tmp_path / "chains.jsonl"
    assert main(["self-critique", "--model", "tiny-micro", "--rounds", "2", "--max-new-tokens", "3",
                 "--prompt", "Reverse 'abc'.", "--prompt", "What is 1 + 2?", "--out", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 1
    chains = [json.loads(x) for x in open(out)]
    assert len(chains) == 2 and all(len(c["steps"]) == 2 for c in chains)
    assert main(["self-critique", "--model", "tiny-micro"]) == 2
    assert "give --prompt" in capsys.readouterr().err


@pytest.mark.slow
def test_online_trainers_and_reward_model_labeller(tmp_path):
    small = {"max_steps": 1, "batch_size": 4, "lora_r": 4}
    spec = {**MICRO, "prompts_per_round": 8, "eval": {"suites": []}, "stages": [
        {"stage": "sft", "settings": small},
        {"stage": "grpo", "settings": {**small, "num_generations": 2, "max_completion_length": 4}},
        {"stage": "ppo", "settings": {**small, "max_new_tokens": 4}},
        {"stage": "rlaif", "labeller": "rules"},
        {"stage": "orpo", "settings": {**small, "batch_size": 1}},
        {"stage": "rm", "settings": {**small, "batch_size": 1}},
        {"stage": "rlaif", "name": "rlaif-rm", "labeller": "rm"}]}
    report = run_pipeline(load_spec(_spec(tmp_path, spec)), str(tmp_path / "run"), quiet=True)
    stages = report["stages"]
    assert [stages[f"round-1/{k}"]["steps"] for k in ("sft", "grpo", "ppo", "orpo", "rm")] == [1] * 5
    assert stages["round-1/rlaif-rm"]["pairs"] == 8
    p = Pipeline(load_spec(_spec(tmp_path, spec)), str(tmp_path / "run"), resume=True, quiet=True)
    assert len(p.state["adapters"]) == 4 and p.state["reward_model"].endswith("rm/reward_model")  # rm is no policy
