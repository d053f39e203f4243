"""Issue 28 items at the tuner level: adapting an adapted model (11), adapter names that are paths
(17), merging adapters held by different layers (16), and no import circle in the tuners."""
import ast
import copy
import os
import pathlib

import pytest

from peftkern import LoraConfig, get_peft_model, load_adapter, save_adapter
from tests.tuners.tiny_models import logits, perturb_trainable, tiny_model, token_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_adapting_an_adapted_model_is_refused(tmp_path):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a PeftKernModel.*add_adapter"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="already carries peftkern adapter layers \\(LoRALinear\\)"):
        get_peft_model(model.model, LoraConfig(r=2, target_modules=["v_proj"]))
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="already carries peftkern adapter layers"):
        load_adapter(model.get_base_model(), tmp_path, adapter_name="second")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any("v_proj.lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", ["/abs/dir", "a/b", "..", "a\\b", "x.y", "", " pad", "__base__"])
def test_adapter_names_that_are_paths_are_refused(tmp_path, name):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="adapter_name must be"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="adapter_name must be"):
        get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["v_proj"]), adapter_name=name)
    save_adapter(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="adapter_name must be"):
        load_adapter(model, tmp_path / "ok", adapter_name=name)
    assert list(model.peft_config) == ["default"]
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["ok"])


def test_merge_and_unload_with_adapters_on_different_layers():
    base = tiny_model("llama")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"]))
    model.set_adapter(["a", "b"])
    perturb_trainable(model)
    ids = token_ids()
    expected = logits(model, ids)
    merged = model.merge_and_unload()
    assert (logits(merged, ids) - expected).abs().max().item() < 1e-5


def test_no_import_circle_between_tuner_modules():
    """tuners/io.py imports model.py; model.py must not import io.py (not even inside a function)."""
    root = pathlib.Path(__file__).resolve().parents[2] / "peftkern" / "tuners"
    tree = ast.parse((root / "model.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "peftkern.tuners.io" not in imported
    for path in root.rglob("*.py"):
        if path.name not in ("io.py", "__init__.py"):
            mods = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
            assert "peftkern.tuners.io" not in mods, path
