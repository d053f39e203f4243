"""`peftkern kernels`: every Triton kernel config the launchers use compiles for sm_80 and sm_90
with no spills, under this environment's Triton and under each other Python environment named in
PEFTKERN_STATIC_PYTHONS (colon-separated interpreters; `make test` passes its Triton 3.6
environment, the version on the lent GPU machines).

Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces kernels with Python)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

KEYS = {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "wgmma", "ok", "triton"}
REPO = pathlib.Path(__file__).resolve().parent.parent
PYTHONS = [sys.executable] + [p for p in os.environ.get("PEFTKERN_STATIC_PYTHONS", "").split(os.pathsep) if p]


def _kernels(python, *args, timeout=3600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.run([python, "-m", "peftkern", "kernels", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module", params=PYTHONS, ids=lambda p: "this-env" if p == sys.executable else p)
def rows(request):
    proc = _kernels(request.param, "--json")
    assert proc.stdout, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_json_rows_have_the_documented_keys(rows):
    assert rows
    for row in rows:
        assert KEYS <= set(row), row
    assert len({row["triton"] for row in rows}) == 1


def test_every_kernel_compiles_for_both_archs_without_spills(rows):
    bad = [r for r in rows if not r["ok"] or r["spill_bytes"] != 0]
    assert not bad, f"triton {rows[0]['triton']}:\n" + "\n".join(
        f"{r['kernel']} [{r['config']}] {r['arch']}: spill={r['spill_bytes']} {r.get('error', '')}" for r in bad)
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault((r["kernel"], r["config"]), set()).add(r["arch"])
    assert all(archs == {"sm_80", "sm_90"} for archs in by_kernel.values()), by_kernel


def test_every_launched_variant_of_the_low_rank_ops_is_reported(rows):
    """The variants the launchers use (dropout or not, dx or dA only, LoRA on an NF4 base or not)."""
    configs = {}
    for r in rows:
        configs.setdefault(r["kernel"], set()).add(r["config"])
    assert {"_lora_fwd_kernel", "_lora_bwd_kernel", "_dora_norm_kernel", "_dora_fwd_kernel", "_dora_bwd_kernel",
            "_nf4_fwd_kernel", "_nf4_gemv_kernel", "_nf4_bwd_kernel", "_nf4_dequant_kernel"} <= set(configs)
    for kernel in ("_lora_bwd_kernel", "_dora_bwd_kernel"):
        for dtype in ("fp32", "fp16", "bf16"):
            for flags in ("dropout=0 dx=1", "dropout=1 dx=1", "dropout=0 dx=0", "dropout=1 dx=0"):
                assert any(c.startswith(dtype) and c.endswith(flags) for c in configs[kernel]), (kernel, dtype, flags)
    assert any("lora=0" in c for c in configs["_nf4_fwd_kernel"]) and any("lora=1 dropout=1" in c
                                                                         for c in configs["_nf4_gemv_kernel"])


def test_the_16_bit_lora_forward_uses_wgmma_on_sm_90(rows):
    wgmma = {r["config"]: r["wgmma"] for r in rows if r["arch"] == "sm_90" and r["kernel"] == "_lora_fwd_kernel"
             and not r["config"].startswith("fp32")}
    assert wgmma and all(wgmma.values()), wgmma


def test_one_op_and_bad_arguments():
    """--op keeps one op's kernels; an unknown op or arch is a one-line error, not a traceback."""
    proc = _kernels(sys.executable, "--op", "nosuch")
    assert proc.returncode == 2 and "unknown op 'nosuch'" in proc.stderr and "lora" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _kernels(sys.executable, "--arch", "sm_12", "--op", "lora")
    assert proc.returncode == 2 and "unknown architecture 'sm_12'" in proc.stderr
    proc = _kernels(sys.executable, "--arch", "", "--op", "lora")
    assert proc.returncode == 2 and "no architecture given" in proc.stderr
    proc = _kernels(sys.executable, "--op", "lora", "--arch", "sm_80", "--json", timeout=1800)
    rows = json.loads(proc.stdout)
    assert rows and {r["kernel"] for r in rows} == {"_lora_fwd_kernel", "_lora_bwd_kernel", "_keep_mask_kernel"}
