"""Issue 28.3: YAML values are coerced to each setting's type or rejected as ``file: key: expected ...,
got ...``; keys of another trainer are rejected."""
import argparse

import pytest

from peftkern.train.config import TrainConfig, add_arguments, config_from_args, load_yaml
from peftkern.train.errors import ConfigError


def _load(tmp_path, text, kind="sft"):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    parser = argparse.ArgumentParser()
    add_arguments(parser, kind)
    return config_from_args(parser.parse_args(["--config", str(path)]), kind), str(path)


@pytest.mark.parametrize("text, field, value", [
    ("lr: 1e-4\n", "lr", 1e-4),  # PyYAML reads 1e-4 (no dot) as a string
    ("lr: '2e-3'\n", "lr", 2e-3),
    ("lora_r: '8'\n", "lora_r", 8),
    ("max_steps: 3.0\n", "max_steps", 3),
    ("packing: 'false'\n", "packing", False),
    ("packing: 'yes'\n", "packing", True),
    ("dora: 'false'\n", "dora", False),
    ("target_modules: [q_proj, v_proj]\n", "target_modules", "q_proj,v_proj"),
    ("eval_data:\n", "eval_data", None),
    ("resume: 'true'\n", "resume", True),
])
def test_values_are_coerced(tmp_path, text, field, value):
    cfg, _ = _load(tmp_path, text)
    assert getattr(cfg, field) == value and type(getattr(cfg, field)) is type(value)


@pytest.mark.parametrize("text, message", [
    ("max_steps: 2.5\n", "max_steps: expected an integer, got 2.5"),
    ("out:\n", "out: expected a string, got null"),
    ("dora: maybe\n", "dora: expected true or false, got 'maybe'"),
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ("lr: .nan\n", "lr: expected a finite number, got nan"),
    ("batch_size: true\n", "batch_size: expected an integer, got True"),
    ("lora_alpha: [1, 2]\n", "lora_alpha: expected a number, got [1, 2]"),
    ("beta: 0.3\n", "beta: a setting of peftkern dpo, kto, grpo, rloo, orpo, simpo, cpo, not of peftkern sft"),
    ("learning_rate: 1\n", "unknown setting 'learning_rate'"),
    ("- lr\n", "expected a mapping of setting: value, got list"),
    ("lr: [\n", ":2: not valid YAML"),
])
def test_bad_values_name_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as bad:
        _load(tmp_path, text)
    assert str(bad.value).startswith(str(tmp_path / "run.yaml")) and message in str(bad.value), str(bad.value)


def test_flags_override_the_file_and_the_api_coerces_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nlora_r: 4\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, "sft")
    cfg = config_from_args(parser.parse_args(["--config", str(path), "--lr", "0.5"]), "sft")
    assert (cfg.lr, cfg.lora_r) == (0.5, 4)
    assert TrainConfig(lr="3e-4", packing="off").check().lr == 3e-4
    with pytest.raises(ConfigError, match="^lora_r: expected an integer, got '8.5'$"):
        TrainConfig(lora_r="8.5").check()
    with pytest.raises(ConfigError, match="--reward-model and --reward-fn both given"):
        TrainConfig(reward_model="rm", reward_fn="m:f").check()


def test_yaml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_yaml(str(tmp_path / "none.yaml"))
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_yaml(str(tmp_path))
    (tmp_path / "latin1.yaml").write_bytes(b"out: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text .byte 0xe9"):
        load_yaml(str(tmp_path / "latin1.yaml"))
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbflr: 0.5\n")
    assert load_yaml(str(tmp_path / "bom.yaml")) == {"lr": 0.5}
