"""The editing experiment scripts import against the current package (a renamed import broke
benchmarks/editing_experiment.py once without any test noticing) and parse their arguments."""
import importlib

import pytest


@pytest.mark.parametrize("name", ["benchmarks.editing_experiment", "benchmarks.editing_memit_sweep"])
def test_script_imports(name):
    module = importlib.import_module(name)
    assert callable(module.main)


def test_sweep_prints_usage_on_bad_arguments(capsys):
    from benchmarks import editing_memit_sweep

    assert editing_memit_sweep.main(["3", "sideways"]) == 2
    assert "single|batch|rome" in capsys.readouterr().out


def test_experiment_help_names_the_memit_settings(capsys):
    from benchmarks import editing_experiment

    with pytest.raises(SystemExit) as exit_info:
        editing_experiment.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--memit-layers" in out and "--mom2-weight" in out
