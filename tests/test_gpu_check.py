"""scripts/gpu_check.py, the first-GPU check, on a machine without one: it skips cleanly, its
orchestration records pass / fail / crash / timeout per section in the JSON report, and its sections'
logic runs on CPU tensors (the Triton faces in the interpreter)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    return _load("gpu_check", SCRIPT)


@pytest.fixture(scope="module")
def sections():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        return _load("gpu_check_sections", os.path.join(REPO, "scripts", "gpu_check_sections.py"))
    finally:
        sys.path.pop(0)


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device is visible" in proc.stdout
    assert os.listdir(tmp_path) == []  # no report for a check that did not run


def test_orchestration_records_every_outcome(tmp_path):
    """Stand-in sections that pass, fail, crash (no result) and hang (killed at the budget)."""
    proc = _run("--selftest", "--budget", "6", "--out", str(tmp_path))
    assert proc.returncode == 1
    [name] = os.listdir(tmp_path)
    report = json.loads((tmp_path / name).read_text())
    statuses = {k: v["status"] for k, v in report["sections"].items()}
    assert statuses == {"selftest_ok": "ok", "selftest_fail": "failed", "selftest_crash": "error",
                        "selftest_hang": "timeout"}
    assert report["sections"]["selftest_crash"]["reason"].startswith("the section's process exited with status 3")
    assert report["summary"] == {"ok": False, "sections": {"ok": 1, "failed": 1, "error": 1, "timeout": 1},
                                 "failed_cases": ["selftest_fail: fails"]}
    assert report["schema"] == 1 and report["duration_s"] <= 15


def test_plan_limits_and_report_name(check):
    assert [n for n, _ in check.plan(check.ORDER, quick=True)] == list(check.ORDER)
    assert sum(limit for _, limit in check.plan(check.ORDER, quick=False)) > check.BUDGET_S[False]  # the budget caps
    assert check.BUDGET_S[False] < 8 * 60
    report = {"gpu": "NVIDIA H100 80GB HBM3", "device": "cuda", "started_utc": "2026-11-28T10:00:00Z", "quick": True}
    assert check.report_path("/r", report) == "/r/2026-11-28-nvidia-h100-80gb-hbm3-gpu-check-quick.json"


def test_unknown_section_is_an_error():
    proc = _run("--only", "faces,warp_speed")
    assert proc.returncode == 2 and "unknown section(s) ['warp_speed']" in proc.stderr


def test_faces_section_logic_on_cpu_tensors(sections, monkeypatch):
    """The faces section compares each face with the float64 reference and labels every case; on
    the CPU the Triton face runs in the interpreter and CUDA is skipped with its reason."""
    cases = [c for c in sections.op_cases(quick=True) if c[0] in ("lora_linear", "adamw8bit_step +fisher8")]
    monkeypatch.setattr(sections, "op_cases", lambda quick: cases)
    out = sections.faces(torch.device("cpu"), quick=True)
    assert out["status"] == "ok", [r for r in out["results"] if not r["ok"]]
    ran = {(r["op"], r["face"], r["dtype"]) for r in out["results"] if not r.get("skipped")}
    assert ("lora_linear", "torch", "float32") in ran and ("lora_linear", "triton", "float16") in ran
    assert ("adamw8bit_step +fisher8", "triton", "float32") in ran
    skipped = [r for r in out["results"] if r.get("skipped")]
    assert any(r["face"] == "cuda" and "CUDA tensors" in r["reason"] for r in skipped)
    lora = next(r for r in out["results"] if r["op"] == "lora_linear" and r["face"] == "torch" and r["dtype"] == "float32")
    assert set(lora["errors"]) == {"y", "dx", "dweight", "dbias", "dlora_A", "dlora_B"}
    assert max(lora["errors"].values()) < 1e-5


def test_a_broken_case_is_recorded_not_raised(sections):
    results = []
    sections.run_case(results, "boom", lambda: 1 / 0, face="triton")
    sections.run_case(results, "fine", lambda: {"errors": {"y": 0.0}})
    assert results[0]["ok"] is False and results[0]["error"].startswith("ZeroDivisionError")
    assert results[0]["face"] == "triton" and results[1]["ok"] is True
    assert sections.status_of(results) == "failed"


def test_gpu_only_sections_skip_on_the_cpu(sections):
    cpu = torch.device("cpu")
    for name in ("cuda_kernels", "cuda_graph", "multi_gpu", "gpu_tests", "benchmarks"):
        assert sections.SECTIONS[name](cpu, True)["status"] == "skipped", name


def test_junit_parsing(sections, tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.a" name="test_ok"/>
      <testcase classname="tests.a" name="test_skip"><skipped message="no"/></testcase>
      <testcase classname="tests.b" name="test_bad"><failure message="assert 1 == 2"/></testcase>
      <testcase classname="tests.b" name="test_err"><error message="fixture"/></testcase>
    </testsuite></testsuites>""")
    out = sections.parse_junit(str(xml), 1)
    assert out["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "errors": 1}
    assert out["status"] == "failed" and [r["name"] for r in out["results"]] == ["tests.b::test_bad", "tests.b::test_err"]
    assert sections.parse_junit(str(tmp_path / "none.xml"), 4)["status"] == "failed"


def test_modeled_rows_are_found_beside_measured_ones(sections):
    modeled = [{"op": "lora", "shape": {"M": 4096, "K": 4096, "N": 4096, "r": 16}, "case": "c", "ours": 340.0,
                "peer": 286.0, "ratio": 1.19, "peer_name": "base", "source": "x.json"},
               {"op": "lora", "shape": {"M": 16384, "K": 4096, "N": 4096, "r": 16}, "case": "d"}]
    found = sections.modeled_beside("lora", {"M": 4096, "K": 4096, "N": 4096, "r": 16}, modeled)
    assert [f["case"] for f in found] == ["c"] and found[0]["ours_us"] == 340.0
    assert sections.modeled_beside("nf4", {"M": 4096}, modeled) == []
