"""The CLI on JSONL files (the demo's own tests: tests/train/test_demo.py)."""
import json

from peftkern.cli import main
from peftkern.models import tasks


def test_cli_sft_on_jsonl_with_yaml_config(tmp_path, capsys):
    train, held = tasks.split(32, 8)
    for name, rows in (("train.jsonl", tasks.sft_records(train)), ("eval.jsonl", tasks.sft_records(held))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(f"model: tiny-micro\nlora_r: 4\nlr: 0.01\nbatch_size: 8\nmax_steps: 3\n"
                                       f"out: {tmp_path / 'out'}\n")
    code = main(["sft", "--config", str(tmp_path / "run.yaml"), "--data", str(tmp_path / "train.jsonl"),
                 "--eval-data", str(tmp_path / "eval.jsonl"), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_cli_reports_malformed_data_by_file_and_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    code = main(["dpo", "--model", "tiny-micro", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "bad.jsonl:2: missing field 'chosen'" in capsys.readouterr().err


def test_cli_trains_a_local_model_directory(tmp_path, capsys):
    from peftkern.models import build_byte_tokenizer, build_tiny_model

    model_dir = tmp_path / "model"
    build_tiny_model("micro").save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    train, _ = tasks.split(16, 2)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks.preference_records(train)))
    code = main(["dpo", "--model", str(model_dir), "--data", str(tmp_path / "pairs.jsonl"), "--max-steps", "2",
                 "--batch-size", "4", "--target-modules", "q_proj,v_proj", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert main(["sft", "--model", str(model_dir), "--out", str(tmp_path / "o2")]) == 2
    assert "--data is required" in capsys.readouterr().err
