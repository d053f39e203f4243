"""`peftkern kernels`: every Triton kernel config compiles for sm_80 and sm_90 with no spills.

Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces kernels with Python)."""
import json
import os
import subprocess
import sys

import pytest

KEYS = {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "wgmma", "ok"}


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "peftkern", "kernels", "--json"], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.stdout, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_json_rows_have_the_documented_keys(rows):
    assert rows
    for row in rows:
        assert KEYS <= set(row), row


def test_every_kernel_compiles_for_both_archs_without_spills(rows):
    bad = [r for r in rows if not r["ok"] or r["spill_bytes"] != 0]
    assert not bad, "\n".join(f"{r['kernel']} [{r['config']}] {r['arch']}: spill={r['spill_bytes']} "
                              f"{r.get('error', '')}" for r in bad)
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault((r["kernel"], r["config"]), set()).add(r["arch"])
    assert all(archs == {"sm_80", "sm_90"} for archs in by_kernel.values()), by_kernel


def test_lora_kernels_are_all_reported(rows):
    names = {r["kernel"] for r in rows}
    assert {"_lora_down_kernel", "_lora_fwd_kernel", "_lora_bwd_g_kernel", "_lora_bwd_dx_kernel"} <= names
    wgmma = {r["kernel"]: r["wgmma"] for r in rows if r["arch"] == "sm_90" and r["kernel"] == "_lora_fwd_kernel"
             and not r["config"].startswith("fp32")}
    assert all(wgmma.values()), "the 16-bit LoRA forward GEMM should use wgmma on sm_90"
