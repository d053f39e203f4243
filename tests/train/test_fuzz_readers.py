"""Issue 24: every reader of a file a user writes or keeps (JSONL records, YAML configs, adapter
configs, checkpoint manifests and states, run logs), fed random and mutated inputs, gives a result
or one of our error types (TrainError; the tuners' ValueError / TypeError for adapter configs),
never another exception."""
import json
import os
import shutil
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftkern.models import build_byte_tokenizer  # noqa: E402
from peftkern.train import checkpoint as ck  # noqa: E402
from peftkern.train.config import TrainConfig, load_yaml  # noqa: E402
from peftkern.train.errors import TrainError  # noqa: E402
from peftkern.train.logs import read_log  # noqa: E402

TOK = build_byte_tokenizer()
# PEFTKERN_FUZZ_EXAMPLES=5000 for a longer hunt; 60 keeps CI to seconds
FAST = settings(max_examples=int(os.environ.get("PEFTKERN_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SCRATCH = tempfile.mkdtemp(prefix="peftkern-fuzz-")


@pytest.fixture(autouse=True, scope="module")
def _scratch():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)

def _json_values(max_int):
    scalars = st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=max_int) | \
        st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


json_values = _json_values(10**400)  # JSON allows integers beyond the float range
roles = st.sampled_from(["system", "user", "assistant", "tool", ""]) | st.text(max_size=5)
message = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=20)}) | \
    st.dictionaries(st.sampled_from(["role", "content", "x"]), json_values, max_size=3)
field_value = st.text(max_size=30) | st.lists(message, max_size=4) | json_values
record = st.dictionaries(st.sampled_from(["prompt", "completion", "chosen", "rejected", "messages", "label",
                                          "margin", "text"]),
                         field_value | st.booleans() | st.floats(allow_nan=True), max_size=5)


@st.composite
def jsonl_bytes(draw):
    lines = []
    for rec in draw(st.lists(record, min_size=0, max_size=6)):
        line = json.dumps(rec).encode("utf-8")
        how = draw(st.sampled_from(["keep", "keep", "cut", "byte", "raw"]))
        if how == "cut" and line:
            line = line[:draw(st.integers(0, len(line) - 1))]
        elif how == "byte":
            at = draw(st.integers(0, len(line)))
            line = line[:at] + draw(st.binary(min_size=1, max_size=2)) + line[at:]
        elif how == "raw":
            line = draw(st.binary(max_size=30))
        lines.append(line)
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")


def _file(payload: bytes, name: str) -> str:
    directory = os.path.join(SCRATCH, name.replace(".", "-"))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(payload)
    return path


@FAST
@given(jsonl_bytes(), st.booleans())
def test_jsonl_records_for_every_trainer(payload, packing):
    from peftkern.train.dpo import pair_examples
    from peftkern.train.kto import kto_examples
    from peftkern.train.ppo import ppo_prompts
    from peftkern.train.rm import rm_examples
    from peftkern.train.sft import sft_examples

    path = _file(payload, "data.jsonl")
    cfg = TrainConfig(model="tiny-micro", max_length=48, packing=packing).check()
    builders = {"sft": sft_examples, "dpo": pair_examples, "rm": rm_examples,
                "kto": kto_examples, "ppo": ppo_prompts}
    for kind, build in builders.items():
        try:
            examples = build(TOK, path, cfg)
        except TrainError:
            continue
        assert isinstance(examples, list) and examples, kind


yaml_keys = st.sampled_from(["lr", "lora_r", "lora-alpha", "max_steps", "packing", "dora", "out", "data", "beta",
                             "resume", "target_modules", "batch_size", "schedule", "quant", "seed", "unknown"])
yaml_values = st.sampled_from(["1e-4", "'8'", "2.5", "", "null", "'false'", "yes", "[a, b]", "{a: 1}", "-1", "0",
                               ".nan", ".inf", "1e400", "99999999999999999999999", "!!python/object:os.system x",
                               "2026-01-01", "'", "[", "&a 1", "*b", "~", "0x10", "0o7", "true"]) | st.text(max_size=8)


@st.composite
def yaml_bytes(draw):
    lines = [f"{draw(yaml_keys)}: {draw(yaml_values)}" for _ in range(draw(st.integers(0, 5)))]
    text = "\n".join(lines)
    if draw(st.booleans()):
        text = draw(st.text(max_size=40)) + text
    return text.encode("utf-8", errors="surrogatepass") if draw(st.booleans()) else draw(st.binary(max_size=60))


@FAST
@given(yaml_bytes(), st.sampled_from(["sft", "dpo", "ppo", None]))
def test_yaml_configs(payload, kind):
    path = _file(payload, "run.yaml")
    try:
        values = load_yaml(path, kind)
        TrainConfig(**values).check()
    except TrainError:
        pass


adapter_keys = st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "task_type",
                                "use_dora", "use_rslora", "bias", "fan_in_fan_out", "modules_to_save",
                                "init_lora_weights", "layers_to_transform", "rank_pattern", "alpha_pattern",
                                "base_model_name_or_path", "inference_mode", "whatever"])


@FAST
@given(st.dictionaries(adapter_keys, json_values, max_size=8) | json_values,
       st.sampled_from(["json", "cut", "raw"]), st.binary(max_size=20))
def test_adapter_configs(config, how, raw):
    _read_adapter_config(json.dumps(config).encode(), how, raw)


def test_adapter_config_with_an_integer_beyond_floats():
    from peftkern.tuners import LoraConfig

    path = _file(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 10**400}).encode(), "adapter_config.json")
    with pytest.raises(ValueError, match=r"lora_alpha must be a finite number within the float range, got "
                                         r"'an integer of 401 digits'"):
        LoraConfig.from_pretrained(os.path.dirname(path))


def _read_adapter_config(payload, how, raw):
    import warnings

    from peftkern.tuners import LoraConfig

    if how == "cut":
        payload = payload[:len(payload) // 2]
    elif how == "raw":
        payload = raw
    path = _file(payload, "adapter_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            LoraConfig.from_pretrained(os.path.dirname(path))
        except (ValueError, TypeError):
            pass


@FAST
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_checkpoint_manifest_and_state(manifest, state):
    import torch

    directory = os.path.join(SCRATCH, "run")
    shutil.rmtree(directory, ignore_errors=True)
    ck.save_checkpoint(directory, 1, {"w": torch.ones(2)}, {}, {}, {"kind": "sft"}, keep_last=1)
    path = ck.latest_checkpoint(directory)
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(manifest)
    with open(os.path.join(path, "state.json"), "wb") as f:
        f.write(state)
    assert ck.verify_checkpoint(path) is None or isinstance(ck.verify_checkpoint(path), str)
    try:
        ck.read_state(path)
        ck.load_checkpoint(path)
    except TrainError:
        pass


@FAST
@given(jsonl_bytes())
def test_run_logs(payload):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torn-last-line warning
        try:
            assert isinstance(read_log(_file(payload, "log.jsonl")), list)
        except TrainError:
            pass


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.jsonl").write_text(deep + "\n")
    from peftkern.train.data import DataError, read_jsonl

    with pytest.raises(DataError, match="d.jsonl:1: not valid JSON"):
        read_jsonl(str(tmp_path / "d.jsonl"))
