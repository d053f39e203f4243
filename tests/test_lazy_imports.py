"""``import peftkern`` is light, and every subpackage is reachable from it without importing each
submodule by hand (lazily, PEP 562), with no import circle whichever subpackage comes first."""
import os
import subprocess
import sys

import pytest

import peftkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bare_import_is_light_and_subpackages_are_reachable():
    out = _python(
        "import sys, peftkern\n"
        "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))\n"
        "assert callable(peftkern.losses.dpo_loss) and callable(peftkern.train.run.run)\n"
        "assert peftkern.train.SFTTrainer is peftkern.train.sft.SFTTrainer\n"
        "assert peftkern.optim.PagedAdamW and peftkern.quant.NF4Weight and peftkern.nn.LoRALinear\n"
        "assert peftkern.LoraConfig is peftkern.tuners.LoraConfig\n"
        "print('ok')\n")
    assert out.splitlines() == ["[]", "ok"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        peftkern.nope
    assert "losses" in dir(peftkern) and "get_peft_model" in dir(peftkern)


@pytest.mark.slow
@pytest.mark.parametrize("name", peftkern.SUBPACKAGES)
def test_each_subpackage_imports_first_in_a_fresh_process(name):
    assert _python(f"import peftkern\nprint(peftkern.{name}.__name__)").strip() == f"peftkern.{name}"
