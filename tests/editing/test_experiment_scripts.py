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
    assert "--memit-layers" in out and "--mom2-weight" in out and "--mom2-scale" in out and "--groups" in out


def test_experiment_rejects_unknown_groups():
    from benchmarks import editing_experiment

    with pytest.raises(SystemExit) as exit_info:
        editing_experiment.main(["--groups", "single,sideways"])
    assert exit_info.value.code == 2


def test_merged_groups_keep_the_full_runs_row_order(tmp_path):
    import json

    from benchmarks import editing_experiment

    def row(eff):
        return {"summary": {k: eff for k in editing_experiment.METRICS + ("new_prob",)}, "seconds": 1.0,
                "per_request": [{}, {}]}

    parts = {"batch": {"MEMIT (30 at once)": row(0.5), "sequential ROME (50)": row(0.25)},
             "single": {"unedited": row(0.0), "ROME": row(1.0), "MEMIT (1 request)": row(0.75)},
             "paper": {"ROME, paper settings": row(0.125)}}
    paths = []
    for name, rows in parts.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"settings": {"groups": name}, "machine": {"wall_s": 2.0}, "rows": rows}))
        paths.append(str(path))
    assert editing_experiment.main(["--merge", *paths, "--out", str(tmp_path / "out")]) == 0
    (out,) = (tmp_path / "out").glob("*-editing.json")
    merged = json.loads(out.read_text())
    assert list(merged["rows"]) == ["unedited", "ROME, paper settings", "ROME", "MEMIT (1 request)",
                                    "MEMIT (30 at once)", "sequential ROME (50)"]
    assert [r["settings"]["groups"] for r in merged["runs"]] == ["batch", "single", "paper"]
    table = out.with_suffix(".md").read_text()
    assert "| ROME, paper settings | 2 | 0.12 |" in table
