"""The sections of ``scripts/gpu_check.py``. Each is ``section(device, quick) -> dict`` with
``status`` ("ok" | "failed" | "skipped"), ``results`` (a list of dicts, each with ``ok``) and
optionally ``reason`` / ``info``. A section never raises for one bad case: each case is caught and
recorded with its error, so one broken kernel cannot hide the others.

``device`` is a torch.device; on "cpu" (a dry run of the check's own logic) the Triton faces run in
the interpreter and the CUDA-only sections skip.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

from peftkern import _cuda, backend
from peftkern import ops as pk_ops
from peftkern.ops import adamw as adamw_ops
from peftkern.ops import dora as dora_ops
from peftkern.ops import logprobs as logprob_ops
from peftkern.ops import lora as lora_ops
from peftkern.ops import nf4 as nf4_ops
from peftkern.quant import quantize_nf4
from peftkern.reference import adamw as ref_adamw
from peftkern.reference import dora as ref_dora
from peftkern.reference import logprobs as ref_logprobs
from peftkern.reference import lora as ref_lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative error (norm of the difference / norm of the float64 reference) allowed per dtype
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# -- helpers ------------------------------------------------------------------------------------

def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double().to(got.device)
    return float((got - expected).norm() / expected.norm().clamp_min(1e-30))


def run_case(results: list, name: str, fn, **labels) -> None:
    """Append fn()'s dict (``ok`` defaults to True) or the exception it raised, labelled."""
    start = time.perf_counter()
    try:
        out = fn() or {}
        out.setdefault("ok", True)
    except Exception as exc:  # recorded, never raised: the next case still runs
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=6)[-2000:]}
    out.update(name=name, seconds=round(time.perf_counter() - start, 3), **labels)
    results.append(out)


def status_of(results: list) -> str:
    if not results:
        return "skipped"
    return "ok" if all(r.get("ok") or r.get("skipped") for r in results) else "failed"


def compare(named: dict, expected: dict, dtype: torch.dtype) -> dict:
    """{name: rel error} and ok when every one is within the dtype's tolerance and finite."""
    errors = {k: rel_error(named[k], expected[k]) for k in expected}
    finite = all(bool(torch.isfinite(named[k].float()).all()) for k in expected)
    return {"errors": {k: float(f"{v:.3g}") for k, v in errors.items()},
            "ok": finite and all(v <= TOL[dtype] for v in errors.values()), "tolerance": TOL[dtype]}


def faces_for(op_faces, device) -> list[tuple[str, str | None]]:
    index = device.index if device.type == "cuda" else None
    return [(f, backend.why_unavailable(f, device.type, index)) for f in op_faces]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grads(out: torch.Tensor, inputs: dict, seed_grad: torch.Tensor) -> dict:
    names = [k for k, v in inputs.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(out, [inputs[k] for k in names], seed_grad)
    return {f"d{k}": g for k, g in zip(names, grads)}


def cuda_events_time(fn, warmup: int, reps: int) -> float:
    """Median microseconds of ``fn`` by CUDA events (one event pair per repetition)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


# -- environment --------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver_version() -> str | None:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return f"{v.value // 1000}.{v.value % 1000 // 10}"


def cuobjdump() -> str | None:
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def fatbin_kernels() -> list[str] | None:
    """The entry points in the fatbin (cuobjdump -symbols), or None when it cannot be listed."""
    tool = cuobjdump()
    if tool is None or not _cuda.fatbin_present():
        return None
    out = subprocess.run([tool, "-symbols", _cuda.FATBIN_PATH], capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"STO_ENTRY\s+(\S+)", out)))


def environment(device: torch.device, quick: bool) -> dict:
    from peftkern.optim import pager

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": _version("triton"), "cuda-python": _version("cuda-python"),
            "cuda-bindings": _version("cuda-bindings"), "cuda-core": _version("cuda-core"),
            "driver": _driver_version(), "cuda_python_vs_torch": _cuda.version_mismatch(),
            "fatbin": _cuda.FATBIN_PATH if _cuda.fatbin_present() else None, "backend": backend.current()}
    if device.type == "cuda":
        info["devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                            "capability": "sm_%d%d" % torch.cuda.get_device_capability(i),
                            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                           for i in range(torch.cuda.device_count())]
        info["cuda_face"] = {i: _cuda.why_unavailable(i) or "available" for i in range(torch.cuda.device_count())}
        info["paging"] = pager.managed_memory_supported(device.index or 0) or "available"
    info["faces"] = backend.available(device.type)
    tool = cuobjdump()
    if tool and _cuda.fatbin_present():
        listing = subprocess.run([tool, "-lelf", "-lptx", _cuda.FATBIN_PATH], capture_output=True, text=True)
        info["fatbin_contents"] = listing.stdout.split("\n")[:20]
    return {"status": "ok", "info": info, "results": []}


# -- every op's faces against the float64 reference -----------------------------------------------

def _lora_case(device, dtype, face, quick):
    m, k, n, r = (37, 96, 80, 8) if quick else (129, 264, 200, 16)
    g = torch.Generator(device="cpu").manual_seed(1)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    b, a, bb = torch.randn(n, generator=g), torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(n, r, generator=g)
    ins = {name: _leaf(t.to(device, dtype)) for name, t in dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb).items()}
    with backend.use(face):
        y = pk_ops.lora_linear(ins["x"], ins["weight"], ins["bias"], ins["lora_A"], ins["lora_B"], 2.0)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    got = {"y": y, **_grads(y, ins, dy)}
    ref_in = {kk: _leaf(v.detach().double()) for kk, v in ins.items()}
    y_ref = ref_lora.lora_linear(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["lora_A"], ref_in["lora_B"], 2.0)
    expected = {"y": y_ref, **_grads(y_ref, ref_in, dy.double())}
    return compare(got, expected, dtype)


def _dora_case(device, dtype, face, quick):
    m, k, n, r = (37, 96, 80, 8) if quick else (129, 264, 200, 16)
    g = torch.Generator(device="cpu").manual_seed(2)
    tensors = dict(x=torch.randn(m, k, generator=g), weight=torch.randn(n, k, generator=g) / k ** 0.5,
                   bias=torch.randn(n, generator=g), lora_A=torch.randn(r, k, generator=g) / k ** 0.5,
                   lora_B=torch.randn(n, r, generator=g) * 0.1, magnitude=torch.rand(n, generator=g) + 0.5)
    ins = {name: _leaf(t.to(device, dtype)) for name, t in tensors.items()}
    with backend.use(face):
        y = pk_ops.dora_linear(ins["x"], ins["weight"], ins["bias"], ins["lora_A"], ins["lora_B"], ins["magnitude"], 2.0)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    got = {"y": y, **_grads(y, ins, dy)}
    ref_in = {kk: _leaf(v.detach().double()) for kk, v in ins.items()}
    y_ref = ref_dora.dora_linear(ref_in["x"], ref_in["weight"], ref_in["bias"], ref_in["lora_A"], ref_in["lora_B"],
                                 ref_in["magnitude"], 2.0)
    expected = {"y": y_ref, **_grads(y_ref, ref_in, dy.double())}
    return compare(got, expected, dtype)


def _nf4_weight(device, n, k, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    w4 = quantize_nf4(w.to(device), blocksize=64, double_quant=True)
    with backend.use("torch"):
        return w4, w4.dequantize(torch.float32).double()


def _nf4_linear_case(device, dtype, face, quick):
    m, k, n, r = (37, 128, 96, 8) if quick else (129, 256, 200, 16)
    w4, w_deq = _nf4_weight(device, n, k, 3)
    g = torch.Generator(device="cpu").manual_seed(4)
    ins = {name: _leaf(t.to(device, dtype)) for name, t in dict(
        x=torch.randn(m, k, generator=g), bias=torch.randn(n, generator=g),
        lora_A=torch.randn(r, k, generator=g) / k ** 0.5, lora_B=torch.randn(n, r, generator=g)).items()}
    with backend.use(face):
        y = pk_ops.nf4_linear(ins["x"], w4, ins["bias"], ins["lora_A"], ins["lora_B"], 2.0)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    got = {"y": y, **_grads(y, ins, dy)}
    ref_in = {kk: _leaf(v.detach().double()) for kk, v in ins.items()}
    y_ref = ref_in["x"] @ w_deq.t() + ref_in["bias"] + 2.0 * ((ref_in["x"] @ ref_in["lora_A"].t()) @ ref_in["lora_B"].t())
    expected = {"y": y_ref, **_grads(y_ref, ref_in, dy.double())}
    return compare(got, expected, dtype)


def _nf4_dequant_case(device, dtype, face, quick):
    w4, w_deq = _nf4_weight(device, 96, 200 if quick else 1000, 5)
    with backend.use(face):
        got = pk_ops.nf4_dequantize(w4, dtype)
    return compare({"W": got}, {"W": w_deq}, dtype)


def _logprobs_case(device, dtype, face, quick):
    """fused_linear_logprobs with a LoRA head, ignored positions and entropy."""
    b, t, h, v, r = (2, 19, 64, 300, 4) if quick else (3, 67, 128, 1000, 8)
    g = torch.Generator(device="cpu").manual_seed(6)
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[:, :3] = -100
    ins = {name: _leaf(x.to(device, dtype)) for name, x in dict(
        hidden=torch.randn(b, t, h, generator=g), weight=torch.randn(v, h, generator=g) / h ** 0.5,
        bias=torch.randn(v, generator=g) * 0.1, lora_A=torch.randn(r, h, generator=g) / h ** 0.5,
        lora_B=torch.randn(v, r, generator=g) * 0.1).items()}
    targets = targets.to(device)
    with backend.use(face):
        logp, ent = pk_ops.fused_linear_logprobs(ins["hidden"], ins["weight"], targets, bias=ins["bias"],
                                                 return_entropy=True, lora_A=ins["lora_A"], lora_B=ins["lora_B"],
                                                 lora_scaling=2.0)
    c1, c2 = torch.randn(logp.shape, generator=g).to(device), torch.randn(logp.shape, generator=g).to(device)
    got = {"logp": logp, "entropy": ent, **_grads((logp * c1 + ent * c2).sum(), ins, torch.ones((), device=device))}
    ref_in = {kk: _leaf(x.detach().double()) for kk, x in ins.items()}
    lp, en = ref_logprobs.linear_logprobs(ref_in["hidden"], ref_in["weight"], targets, bias=ref_in["bias"],
                                          return_entropy=True, lora_A=ref_in["lora_A"], lora_B=ref_in["lora_B"],
                                          lora_scaling=2.0)
    expected = {"logp": lp, "entropy": en,
                **_grads((lp * c1.double() + en * c2.double()).sum(), ref_in, torch.ones((), dtype=torch.float64,
                                                                                      device=device))}
    return compare(got, expected, dtype)


def _losses_padding_case(device, dtype, face, quick):
    """fused SFT and DPO losses on a padded batch whose padding row holds a logit far above 88.7
    (exp overflows in fp32): every gradient must stay finite (issue 25, item 3)."""
    from peftkern.losses import fused_dpo_loss, fused_sft_loss

    b, t, h, v = 4, 13, 64, 257
    g = torch.Generator(device="cpu").manual_seed(7)
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[:, -4:] = -100  # padding
    hidden[:, -4:] = 0.0
    hidden[:, -4:, 0] = 400.0  # a huge logit on the padding rows only
    weight[:, 0] = torch.linspace(-1, 1, v)
    h_ = _leaf(hidden.to(device, dtype))
    w_ = _leaf(weight.to(device, dtype))
    tg = targets.to(device)
    out = {}
    with backend.use(face):
        loss = fused_sft_loss(h_, w_, tg)
        dh, dw = torch.autograd.grad(loss, [h_, w_])
        out["sft_finite"] = bool(torch.isfinite(dh.float()).all() and torch.isfinite(dw.float()).all())
        ref = torch.zeros(b // 2, device=device)
        dpo, _, _ = fused_dpo_loss(h_, w_, tg, ref_chosen_logps=ref, ref_rejected_logps=ref)
        dh, dw = torch.autograd.grad(dpo, [h_, w_])
        out["dpo_finite"] = bool(torch.isfinite(dh.float()).all() and torch.isfinite(dw.float()).all())
    out["ok"] = out["sft_finite"] and out["dpo_finite"] and bool(torch.isfinite(loss))
    return out


def _adamw_case(device, dtype, face, quick, bits: int, penalty: str):
    n = 773 if quick else 70_001
    g = torch.Generator(device="cpu").manual_seed(8)
    p0 = torch.randn(n, generator=g).to(device, dtype)
    grad = torch.randn(n, generator=g).to(device, dtype)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
    kw, ref_kw = {}, {}
    if penalty != "none":
        anchor = (p0.float() + 0.3 * torch.randn(n, generator=g).to(device)).to(dtype)
        f = torch.rand(n, generator=g).to(device) if penalty != "l2sp" else None
        if penalty == "fisher8":
            f = ref_adamw.quantize_blockwise(f, ref_adamw.dynamic_map(False, device))
        kw = dict(anchor=anchor, fisher=f, penalty=0.7)
        ref_kw = dict(anchor=anchor, fisher=f, penalty=0.7)
    if bits == 32:
        m0, v0 = torch.randn(n, generator=g).to(device) * 0.1, torch.rand(n, generator=g).to(device) * 0.01
        p_ref, m_ref, v_ref = ref_adamw.adamw_update(p0, grad, m0, v0, 5, compute_dtype=torch.float64, **hyper,
                                                     **ref_kw)
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        with backend.use(face):
            pk_ops.adamw_step(p, grad, m, v, step=5, **hyper, **kw)
        tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
        errors = {"param": rel_error(p, p_ref.to(dtype)), "exp_avg": rel_error(m, m_ref),
                  "exp_avg_sq": rel_error(v, v_ref)}
        return {"errors": errors, "ok": errors["param"] <= tol and errors["exp_avg"] <= 1e-5
                and errors["exp_avg_sq"] <= 1e-5}
    mq, ma = ref_adamw.quantize_blockwise(torch.randn(n, generator=g).to(device) * 0.1, ref_adamw.dynamic_map(True, device))
    vq, va = ref_adamw.quantize_blockwise(torch.rand(n, generator=g).to(device) * 0.01,
                                          ref_adamw.dynamic_map(False, device))
    expected = ref_adamw.adamw8bit_update(p0, grad, mq, ma, vq, va, 4, **hyper, **ref_kw)
    out = [p0.clone(), mq.clone(), ma.clone(), vq.clone(), va.clone()]
    with backend.use(face):
        pk_ops.adamw8bit_step(out[0], grad, *out[1:], step=4, **hyper, **kw)
    code_diff = max((out[i].int() - expected[i].int()).abs().max().item() for i in (1, 3))
    errors = {"param": rel_error(out[0], expected[0].to(dtype)), "m_absmax": rel_error(out[2], expected[2]),
              "v_absmax": rel_error(out[4], expected[4]), "max_code_difference": code_diff}
    tol = 1e-6 if dtype == torch.float32 else TOL[dtype]
    return {"errors": errors, "ok": errors["param"] <= tol and code_diff <= 1 and errors["m_absmax"] <= 1e-5}


def op_cases(quick: bool):
    """(op name, faces, dtypes, case function) for every op the check runs."""
    cases = [
        ("lora_linear", lora_ops.FACES, DTYPES, _lora_case),
        ("dora_linear", dora_ops.FACES, DTYPES, _dora_case),
        ("nf4_linear", nf4_ops.LINEAR_FACES, DTYPES, _nf4_linear_case),
        ("nf4_dequantize", nf4_ops.DEQUANT_FACES, DTYPES, _nf4_dequant_case),
        ("fused_linear_logprobs", logprob_ops.FACES, DTYPES, _logprobs_case),
        ("fused sft/dpo loss, padded batch", logprob_ops.FACES, DTYPES, _losses_padding_case),
    ]
    for bits in (32, 8):
        for penalty in ("none", "l2sp", "fisher32", "fisher8"):
            if quick and penalty in ("l2sp", "fisher32"):
                continue
            name = f"adamw{'8bit' if bits == 8 else ''}_step" + ("" if penalty == "none" else f" +{penalty}")
            cases.append((name, adamw_ops.FACES, DTYPES,
                          lambda d, t, f, q, b=bits, pen=penalty: _adamw_case(d, t, f, q, b, pen)))
    return cases


def faces(device: torch.device, quick: bool) -> dict:
    results = []
    for name, op_faces, dtypes, fn in op_cases(quick):
        for face, reason in faces_for(op_faces, device):
            for dtype in dtypes:
                labels = dict(op=name, face=face, dtype=str(dtype).replace("torch.", ""))
                if reason is not None:
                    results.append({"name": name, "ok": True, "skipped": True, "reason": reason, **labels})
                    continue
                if device.type == "cpu" and face == "triton" and dtype == torch.bfloat16:
                    results.append({"name": name, "ok": True, "skipped": True, "reason": "bf16 Triton needs a GPU",
                                    **labels})
                    continue
                run_case(results, name, lambda: fn(device, dtype, face, quick), **labels)
    return {"status": status_of(results), "results": results}


# -- one real launch of every CUDA C++ kernel ----------------------------------------------------

def cuda_kernels(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA device", "results": []}
    reason = _cuda.why_unavailable(device.index)
    if reason is not None:
        return {"status": "failed", "reason": f"the CUDA C++ face is unavailable: {reason}", "results": []}
    launched: list[str] = []
    original = _cuda.launch

    def recording(name, *args, **kwargs):
        launched.append(name)
        return original(name, *args, **kwargs)

    results = [{"name": "peftkern_probe", "ok": True, "kernels": [_cuda.PROBE_KERNEL],
                "note": "launched by the availability probe"}]
    _cuda.launch = recording
    try:
        for dtype in DTYPES:
            for bits in (32, 8):
                for penalty in ("none", "l2sp", "fisher32", "fisher8"):
                    before = len(launched)
                    run_case(results, f"adamw{bits} {penalty}",
                             lambda: _adamw_case(device, dtype, "cuda", True, bits, penalty),
                             dtype=str(dtype).replace("torch.", ""))
                    results[-1]["kernels"] = sorted(set(launched[before:]))
            before = len(launched)
            run_case(results, "nf4_dequantize", lambda: _nf4_dequant_case(device, dtype, "cuda", True),
                     dtype=str(dtype).replace("torch.", ""))
            results[-1]["kernels"] = sorted(set(launched[before:]))
        torch.cuda.synchronize()
    finally:
        _cuda.launch = original
    in_fatbin = fatbin_kernels()
    done = set(launched) | {_cuda.PROBE_KERNEL}
    if in_fatbin is None:
        results.append({"name": "coverage", "ok": True, "note": "fatbin symbols not listable; coverage unchecked",
                        "launched": sorted(done)})
    else:
        missing = sorted(set(in_fatbin) - done)
        results.append({"name": "coverage", "ok": not missing, "launched": sorted(done), "never_launched": missing})
    return {"status": status_of(results), "results": results}


# -- CUDA-graph capture of a LoRA (and a QLoRA) training step -------------------------------------

def _graph_step(make_layer, device, dtype, m, k):
    """Capture forward + backward of ``make_layer()`` on a static input, replay on new data and
    compare with the same step run eagerly."""
    layer = make_layer()
    params = [p for p in layer.parameters() if p.requires_grad]
    static_x = torch.randn(m, k, device=device, dtype=dtype)

    def step():
        y = layer(static_x)
        loss = y.float().square().mean()
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    new_x = torch.randn(m, k, device=device, dtype=dtype)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    replayed = {"loss": static_loss.detach().clone(), **{f"grad{i}": p.grad.detach().clone() for i, p in enumerate(params)}}
    for p in params:
        p.grad = None
    eager_loss = step()
    eager = {"loss": eager_loss.detach(), **{f"grad{i}": p.grad.detach() for i, p in enumerate(params)}}
    errors = {k: rel_error(replayed[k], eager[k]) for k in eager}
    return {"errors": errors, "ok": all(v <= 1e-5 for v in errors.values())}


def cuda_graph(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA device", "results": []}
    from peftkern.nn import LoRALinear, NF4Linear

    m, k, n = (256, 512, 384) if quick else (1024, 2048, 2048)
    results = []
    for dtype in (torch.bfloat16, torch.float32):

        def lora():
            base = torch.nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
            layer = LoRALinear.from_linear(base, r=16, lora_alpha=32)
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # B = 0 would hide dA
            return layer

        def qlora():
            base = NF4Linear.from_linear(torch.nn.Linear(k, n, device=device), compute_dtype=dtype)
            layer = LoRALinear.from_linear(base, r=16, lora_alpha=32)
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
            layer.lora_A.to(dtype)  # the factors in the compute dtype; the 4-bit buffers stay as they are
            layer.lora_B.to(dtype)
            return layer

        run_case(results, "LoRA step", lambda: _graph_step(lora, device, dtype, m, k), dtype=str(dtype)[6:])
        run_case(results, "QLoRA step (NF4 base)", lambda: _graph_step(qlora, device, dtype, m, k),
                 dtype=str(dtype)[6:])
    return {"status": status_of(results), "results": results}


# -- a model spread over two GPUs -----------------------------------------------------------------

def multi_gpu(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": "fewer than two CUDA devices", "results": []}
    from peftkern.nn import LoRALinear
    from peftkern.optim import PagedAdamW

    results = []

    def two_layer_step(bits):
        torch.manual_seed(0)
        cpu_layers = [LoRALinear.from_linear(torch.nn.Linear(256, 256), r=8, lora_alpha=16) for _ in range(2)]
        for layer in cpu_layers:
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        gpu_layers = [_clone_layer(cpu_layers[0], "cuda:0"), _clone_layer(cpu_layers[1], "cuda:1")]
        x = torch.randn(64, 256)
        opt_gpu = PagedAdamW([p for lay in gpu_layers for p in lay.parameters() if p.requires_grad], optim_bits=bits,
                             min_8bit_size=1024, paged=True)
        opt_cpu = PagedAdamW([p for lay in cpu_layers for p in lay.parameters() if p.requires_grad], optim_bits=bits,
                             min_8bit_size=1024, paged=False)
        with torch.cuda.device(0):  # the caller's device stays 0 while layer 1 runs on cuda:1
            for _ in range(3):
                y = gpu_layers[1](gpu_layers[0](x.to("cuda:0")).to("cuda:1"))
                y.square().mean().backward()
                opt_gpu.step()
                opt_gpu.zero_grad()
                assert torch.cuda.current_device() == 0
        for _ in range(3):
            cpu_layers[1](cpu_layers[0](x)).square().mean().backward()
            opt_cpu.step()
            opt_cpu.zero_grad()
        errors = {f"layer{i}.{n}": rel_error(pg, pc) for i in range(2)
                  for (n, pg), (_, pc) in zip(gpu_layers[i].named_parameters(), cpu_layers[i].named_parameters())
                  if pg.requires_grad}
        return {"errors": errors, "ok": all(v <= 1e-3 for v in errors.values())}

    for bits in (32, 8):
        run_case(results, f"LoRA layers on cuda:0 and cuda:1, PagedAdamW {bits}-bit", lambda b=bits: two_layer_step(b))
    run_case(results, "transformers device_map over two GPUs", _device_map_case)
    return {"status": status_of(results), "results": results}


def _clone_layer(layer, device):
    import copy

    return copy.deepcopy(layer).to(device)


def _device_map_case():
    """The tiny Llama with LoRA, its decoder layers split across cuda:0 and cuda:1 by accelerate's
    dispatch_model (what device_map="auto" does), trained one step; equal to a one-GPU run."""
    try:
        from accelerate import dispatch_model
    except ImportError:
        return {"ok": True, "skipped": True, "reason": "accelerate is not installed"}
    from peftkern.models import build_tiny_model
    from peftkern.tuners import LoraConfig, get_peft_model

    def build():
        model = build_tiny_model("micro", seed=0)
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))

    ids = torch.randint(0, 200, (2, 24))
    single = build().to("cuda:0")
    loss1 = single(input_ids=ids.to("cuda:0"), labels=ids.to("cuda:0")).loss
    loss1.backward()
    split = build()
    layers = len(split.get_base_model().model.layers)
    device_map = {"model.model.embed_tokens": 0, "model.model.norm": 1, "model.lm_head": 1,
                  "model.model.rotary_emb": 0}
    device_map.update({f"model.model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)})
    split = dispatch_model(split, device_map=device_map)
    loss2 = split(input_ids=ids.to("cuda:0"), labels=ids.to("cuda:0")).loss
    loss2.backward()
    grads1 = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    grads2 = {n: p.grad for n, p in split.named_parameters() if p.grad is not None}
    errors = {n: rel_error(grads2[n], grads1[n]) for n in grads1 if n in grads2}
    return {"loss_error": rel_error(loss2, loss1), "max_grad_error": max(errors.values()) if errors else None,
            "ok": bool(errors) and rel_error(loss2, loss1) <= 1e-5 and max(errors.values()) <= 1e-4}


# -- the gpu-marked tests -------------------------------------------------------------------------

DEADLINE_ENV = "PEFTKERN_GPU_CHECK_DEADLINE"  # epoch seconds the orchestrator kills this section at


def gpu_tests(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA device", "results": []}
    deadline = float(os.environ.get(DEADLINE_ENV, "0") or 0)
    timeout = max(10.0, deadline - time.time() - 15.0) if deadline else None
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               os.path.join(REPO, "tests")]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-3000:]
            return {"status": "failed", "reason": f"pytest -m gpu ran past {timeout:.0f} s",
                    "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail, "results": []}
        return parse_junit(xml, proc.returncode, proc.stdout[-3000:])


def parse_junit(path: str, returncode: int, tail: str = "") -> dict:
    """pytest's junit XML -> counts and one result per failed or errored test."""
    if not os.path.exists(path):
        return {"status": "failed", "reason": f"pytest exited {returncode} without a report", "output_tail": tail,
                "results": []}
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    results = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = [node for node in case if node.tag in ("failure", "error")]
        if bad:
            counts["failed" if bad[0].tag == "failure" else "errors"] += 1
            results.append({"name": name, "ok": False, "error": (bad[0].get("message") or "")[:500]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    status = "ok" if counts["failed"] == 0 and counts["errors"] == 0 and returncode in (0, 5) else "failed"
    return {"status": status, "counts": counts, "results": results, "returncode": returncode}


# -- measured GPU rows beside the modeled ones ----------------------------------------------------

def _committed_modeled_rows() -> list[dict]:
    import glob
    import json

    rows = []
    for path in sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        for row in data.get("rows", []) if isinstance(data, dict) else []:
            if row.get("kind") == "modeled-h100" and row.get("metric") == "step time":
                rows.append(dict(row, source=os.path.basename(path)))
    return rows


def modeled_beside(op: str, shape: dict, modeled: list[dict]) -> list[dict]:
    """The committed modeled-H100 step-time rows of ``op`` whose shape agrees with ``shape``."""
    out = []
    for row in modeled:
        if row.get("op") != op:
            continue
        rs = row.get("shape", {})
        if all(rs.get(k) == v for k, v in shape.items() if k in rs) and any(k in rs for k in shape):
            out.append({"case": row.get("case"), "ours_us": row.get("ours"), "peer_us": row.get("peer"),
                        "peer_name": row.get("peer_name"), "ratio": row.get("ratio"), "source": row.get("source")})
    return out


def _bench_shapes(quick: bool) -> dict:
    if quick:
        return {"lora": [(1024, 1024, 1024, 16)], "dora": [(1024, 1024, 1024, 16)], "nf4": [(1024, 1024, 1024, 16)],
                "losses": [(1024, 1024, 32000)]}
    return {"lora": [(4096, 4096, 4096, 16), (4096, 4096, 14336, 16)],
            "dora": [(4096, 4096, 4096, 16), (4096, 4096, 14336, 16)],
            "nf4": [(4096, 4096, 4096, 16), (4096, 4096, 14336, 16)],
            "losses": [(4096, 4096, 32000), (4096, 4096, 128256)]}


def _timed_pair(ours, baseline, warmup, reps):
    torch.cuda.reset_peak_memory_stats()
    t_ours = cuda_events_time(ours, warmup, reps)
    mem_ours = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t_base = cuda_events_time(baseline, warmup, reps)
    mem_base = torch.cuda.max_memory_allocated()
    return {"ours_us": round(t_ours, 1), "baseline_us": round(t_base, 1), "ratio": round(t_ours / t_base, 3),
            "ours_peak_mib": round(mem_ours / 2**20, 1), "baseline_peak_mib": round(mem_base / 2**20, 1)}


def benchmarks(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA device", "results": []}
    dtype = torch.bfloat16
    warmup, reps = (2, 5) if quick else (3, 20)
    modeled = _committed_modeled_rows()
    results = []

    def lowrank_inputs(m, k, n, r):
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        a = (torch.randn(r, k, device=device, dtype=dtype) / k ** 0.5).requires_grad_()
        b = (torch.randn(n, r, device=device, dtype=dtype) * 0.01).requires_grad_()
        dy = torch.randn(m, n, device=device, dtype=dtype)
        return x, w, a, b, dy

    for m, k, n, r in _bench_shapes(quick)["lora"]:
        shape = {"M": m, "K": k, "N": n, "r": r}

        def case(m=m, k=k, n=n, r=r, shape=shape):
            x, w, a, b, dy = lowrank_inputs(m, k, n, r)

            def ours():
                torch.autograd.backward(pk_ops.lora_linear(x, w, None, a, b, 2.0), dy)

            def eager():  # what PEFT's LoraLayer runs: base GEMM, two skinny GEMMs, a scale and an add
                torch.autograd.backward(x @ w.t() + 2.0 * ((x @ a.t()) @ b.t()), dy)

            return {"shape": shape, "baseline": "eager torch (PEFT's op sequence)", **_timed_pair(ours, eager, warmup, reps),
                    "modeled": modeled_beside("lora", shape, modeled)}

        run_case(results, "lora_linear fwd+bwd", case, op="lora", dtype="bfloat16")

    for m, k, n, r in _bench_shapes(quick)["dora"]:
        shape = {"M": m, "K": k, "N": n, "r": r}

        def case(m=m, k=k, n=n, r=r, shape=shape):
            x, w, a, b, dy = lowrank_inputs(m, k, n, r)
            mag = torch.linalg.vector_norm(w.float(), dim=1).to(dtype).requires_grad_()

            def ours():
                torch.autograd.backward(pk_ops.dora_linear(x, w, None, a, b, mag, 2.0), dy)

            def eager():
                torch.autograd.backward(ref_dora.dora_linear(x, w, None, a, b, mag, 2.0), dy)

            return {"shape": shape, "baseline": "eager torch (reference, W + sBA materialized)",
                    **_timed_pair(ours, eager, warmup, reps), "modeled": modeled_beside("dora", shape, modeled)}

        run_case(results, "dora_linear fwd+bwd", case, op="dora", dtype="bfloat16")

    for m, k, n, r in _bench_shapes(quick)["nf4"]:
        shape = {"M": m, "K": k, "N": n, "r": r}

        def case(m=m, k=k, n=n, r=r, shape=shape):
            x, w, a, b, dy = lowrank_inputs(m, k, n, r)
            w4 = quantize_nf4(w, blocksize=64, double_quant=True)

            def ours():
                torch.autograd.backward(pk_ops.nf4_linear(x, w4, None, a, b, 2.0), dy)

            def eager():  # dequantize, then the 16-bit GEMMs (bitsandbytes' path for training)
                wd = pk_ops.nf4_dequantize(w4, dtype)
                torch.autograd.backward(x @ wd.t() + 2.0 * ((x @ a.t()) @ b.t()), dy)

            return {"shape": shape, "baseline": "dequantize then 16-bit GEMMs", **_timed_pair(ours, eager, warmup, reps),
                    "modeled": modeled_beside("nf4", shape, modeled)}

        run_case(results, "QLoRA nf4_linear fwd+bwd", case, op="nf4", dtype="bfloat16")

    for tokens, h, v in _bench_shapes(quick)["losses"]:
        shape = {"tokens": tokens, "hidden": h, "vocab": v}

        def case(tokens=tokens, h=h, v=v, shape=shape):
            from peftkern.losses import fused_sft_loss

            hid = torch.randn(tokens, h, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
            tg = torch.randint(0, v, (tokens,), device=device)

            def ours():
                fused_sft_loss(hid, w, tg).backward()

            def naive():
                torch.nn.functional.cross_entropy((hid @ w.t()).float(), tg).backward()

            return {"shape": shape, "baseline": "logits then cross_entropy", **_timed_pair(ours, naive, warmup, reps),
                    "modeled": modeled_beside("losses", shape, modeled)}

        run_case(results, "fused SFT loss fwd+bwd", case, op="losses", dtype="bfloat16")
    for row in results:
        row.setdefault("kind", "measured-gpu")
    return {"status": status_of(results), "results": results,
            "device_name": torch.cuda.get_device_name(device)}


SECTIONS = {
    "environment": environment,
    "cuda_kernels": cuda_kernels,
    "faces": faces,
    "cuda_graph": cuda_graph,
    "multi_gpu": multi_gpu,
    "gpu_tests": gpu_tests,
    "benchmarks": benchmarks,
}
