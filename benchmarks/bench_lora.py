"""LoRA linear, forward + backward: peftkern against peft's ``LoraLayer`` with the same config, and
against the frozen base ``nn.Linear`` alone.

* measured-cpu: time (interleaved medians) and peak memory (fresh-subprocess RSS; live tensor bytes),
  peftkern's CPU face (``LoRALinear``, torch face) vs peft, fp32, the CPU shapes of docs/BENCHMARKS.md.
* modeled-h100: bytes beyond the base linear and step time on the H100 roofline, our Triton kernels
  as counted under the interpreter vs peft's eager aten sequence as counted, bf16, GPU shapes.
* static: registers, spills, shared memory of every LoRA kernel config on sm_80 and sm_90.
* measured-gpu: CUDA events and ``torch.cuda.max_memory_allocated`` (skipped without CUDA).
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from benchmarks import memory, static, traffic
from benchmarks.harness import pick

ALPHA_PER_RANK = 2.0  # lora_alpha = 2 r, scaling 2, as the usual alpha = 2 r
DROPOUTS = pick((0.0, 0.1), (0.1,))
IMPLS = ("ours", "peft", "base")
PEER_NAMES = {"peft": "peft LoraLayer", "base": "base nn.Linear"}

CPU_SHAPES = pick(full=[(2048, 1024, 1024, 16), (2048, 1024, 2816, 16)], quick=[(64, 48, 80, 16)])
CPU_ROUNDS = pick(15, 3)

GPU_SHAPES = pick(full=[(m, k, n, r) for m in (4096, 16384) for (k, n) in ((4096, 4096), (4096, 14336), (14336, 4096))
                        for r in (16, 64)],
                  quick=[(512, 384, 640, 16)])
GPU_DROPOUTS = DROPOUTS
# Our kernels are counted under the interpreter at these sizes (every corner of the box, multiples
# of every tile) and extrapolated multilinearly to the GPU shapes (traffic.extrapolate_grid).
CORNERS = (128, 256)
MODELED_DTYPE = torch.bfloat16


def _case(m, k, n, r, p) -> str:
    return f"fwd+bwd M={m} K={k} N={n} r={r} dropout={p:g}"


def _shape(m, k, n, r) -> dict:
    return {"M": m, "K": k, "N": n, "r": r}


# ---------------------------------------------------------------------------------------------
# the three contenders, built alike
# ---------------------------------------------------------------------------------------------

def build_module(impl: str, k: int, n: int, r: int, dropout: float, dtype=torch.float32, device="cpu", seed=0):
    """A frozen base nn.Linear(k, n), wrapped by peftkern's LoRALinear or peft's lora.Linear (adapters
    in ``dtype``, B non-zero so the adapter path is live), or left alone (``impl="base"``)."""
    values = device != "meta"  # meta: shapes only, for counting
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    if values:
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        lora_a = torch.randn(r, k, generator=gen) / k ** 0.5
        lora_b = torch.randn(n, r, generator=gen) / r ** 0.5
    linear.weight.requires_grad_(False)
    alpha = ALPHA_PER_RANK * r
    if impl == "base":
        module = linear
    elif impl == "ours":
        from peftkern.nn import LoRALinear

        module = LoRALinear.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout)
    elif impl == "peft":
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
        module = PeftLoraLinear(linear, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout)
        module.to(dtype)  # peft's autocast_adapter_dtype would keep fp32 adapters and cast x: not done here
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "base" and values:
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(lora_a)
            module.lora_B["default"].weight.copy_(lora_b)
    return module.train()


def build_step(impl: str, m: int, k: int, n: int, r: int, dropout: float, dtype: str = "float32",
               device: str = "cpu", seed: int = 0):
    """One training step of ``impl`` (forward, backward from a fixed dy; grads reset to None first).
    Also the builder the fresh memory subprocess calls (``benchmarks.bench_lora:build_step``)."""
    dt = getattr(torch, dtype)
    module = build_module(impl, k, n, r, dropout, dt, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dt).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(device=device, dtype=dt)
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        try:
            module(x).backward(dy)
        finally:  # nothing of the step outlives it: a baseline taken after a step is clean
            x.grad = None
            for p in params:
                p.grad = None

    step.module, step.x = module, x
    return step


# ---------------------------------------------------------------------------------------------
# measured on the CPU
# ---------------------------------------------------------------------------------------------

def _noise(samples) -> str:
    from benchmarks.harness import spread

    return ", ".join(f"{name} IQR/median {spread(s):.0%}" for name, s in samples.items())


@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("m,k,n,r", CPU_SHAPES, ids=lambda v: str(v))
def test_time_cpu(m, k, n, r, dropout, timer, record):
    steps = {impl: build_step(impl, m, k, n, r, dropout) for impl in IMPLS}
    with torch.no_grad():  # same config, same weights: the same output without dropout
        y_ours, y_peft = steps["ours"].module(steps["ours"].x), steps["peft"].module(steps["peft"].x)
    if dropout == 0.0:
        torch.testing.assert_close(y_ours, y_peft, rtol=1e-4, atol=1e-4)
    medians = timer({"ours": steps["ours"], "peft": steps["peft"], "base": steps["base"]}, rounds=CPU_ROUNDS)
    ms = {name: 1e3 * s for name, s in medians.items()}
    note = f"torch face; {len(timer.samples['ours'])} interleaved rounds; {_noise(timer.samples)}"
    common = dict(kind="measured-cpu", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="float32",
                  unit="ms", metric="step time")
    record(**common, ours=ms["ours"], peer=ms["peft"], peer_name=PEER_NAMES["peft"], target="<= 0.80", note=note,
           peft_over_base=ms["peft"] / ms["base"])
    record(**common, ours=ms["ours"], peer=ms["base"], peer_name=PEER_NAMES["base"], note=note,
           peft_over_base=ms["peft"] / ms["base"])


@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("m,k,n,r", CPU_SHAPES, ids=lambda v: str(v))
def test_memory_cpu(m, k, n, r, dropout, record):
    mib = 2.0 ** 20
    rss = {impl: memory.peak_rss("benchmarks.bench_lora:build_step",
                                 dict(impl=impl, m=m, k=k, n=n, r=r, dropout=dropout), preload=("peft",))
           for impl in IMPLS}
    common = dict(kind="measured-cpu", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="float32",
                  unit="MiB")
    record(**common, metric="peak RSS extra (fresh process)", ours=rss["ours"]["extra_bytes"] / mib,
           peer=rss["peft"]["extra_bytes"] / mib, peer_name=PEER_NAMES["peft"],
           base_linear=rss["base"]["extra_bytes"] / mib,
           note=f"{rss['ours']['method']}; MALLOC_MMAP_THRESHOLD_={memory.MMAP_THRESHOLD}; "
                f"base nn.Linear alone {rss['base']['extra_bytes'] / mib:.1f} MiB")
    live = {}
    for impl in IMPLS:
        step = build_step(impl, m, k, n, r, dropout)
        step()  # warm: the first step may allocate lazily
        live[impl] = memory.live_peak(step)
    record(**common, metric="peak live tensor bytes", ours=live["ours"] / mib, peer=live["peft"] / mib,
           peer_name=PEER_NAMES["peft"], base_linear=live["base"] / mib,
           note=f"TorchDispatchMode tracker; base nn.Linear alone {live['base'] / mib:.1f} MiB")


# ---------------------------------------------------------------------------------------------
# modeled on the H100 roofline
# ---------------------------------------------------------------------------------------------

def _ours_step_for_count(m, k, n, r, dropout):
    dt = MODELED_DTYPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dt).requires_grad_(True)
    weight = torch.randn(n, k, generator=gen).to(dt)
    lora_a = torch.randn(r, k, generator=gen).to(dt).requires_grad_(True)
    lora_b = torch.randn(n, r, generator=gen).to(dt).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(dt)

    def step():
        import peftkern

        with peftkern.backend.use("triton"):
            y = peftkern.ops.lora_linear(x, weight, None, lora_a, lora_b, ALPHA_PER_RANK, dropout, training=True)
            y.backward(dy)

    return step


@functools.lru_cache(maxsize=None)
def ours_corner_counts(r: int, dropout: float) -> dict:
    """Our Triton step counted under the interpreter at every (M, K, N) corner of CORNERS^3.

    One uncounted step first: the ops cache per-device buffers (the zero bias) on first use, and a
    one-time launch must not enter the per-step count of whichever corner runs first."""
    _ours_step_for_count(*(max(CORNERS),) * 3, r, dropout)()
    return {corner: traffic.count_triton(_ours_step_for_count(*corner, r, dropout))
            for corner in itertools.product(CORNERS, repeat=3)}


def count_ours(m, k, n, r, dropout) -> traffic.Count:
    return traffic.extrapolate_grid(ours_corner_counts(r, dropout), (m, k, n))


def count_eager_step(impl, m, k, n, r, dropout) -> traffic.Count:
    """peft's or the base linear's step counted op by op on meta tensors at the real shape."""
    module = build_module(impl, k, n, r, dropout, MODELED_DTYPE, device="meta")
    x = torch.empty(m, k, dtype=MODELED_DTYPE, device="meta").requires_grad_(True)
    dy = torch.empty(m, n, dtype=MODELED_DTYPE, device="meta")
    return traffic.count_eager(lambda: module(x).backward(dy))


@pytest.mark.parametrize("dropout", GPU_DROPOUTS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("m,k,n,r", GPU_SHAPES, ids=lambda v: str(v))
def test_modeled_h100(m, k, n, r, dropout, record):
    if not traffic.interpreting():
        pytest.skip("our kernels are counted under Triton's interpreter: run the modeled cases where "
                    "TRITON_INTERPRET=1 (a CPU-only run sets it)")
    roofline = traffic.H100_SXM
    ours = count_ours(m, k, n, r, dropout)
    peft = count_eager_step("peft", m, k, n, r, dropout)
    base = count_eager_step("base", m, k, n, r, dropout)
    gb = 1e9
    model = (f"{roofline.describe()}; ours: Triton kernels counted under the interpreter at M,K,N in "
             f"{{{CORNERS[0]},{CORNERS[1]}}} and extrapolated multilinearly (exact for tile multiples), distinct "
             f"bytes per launch (raw masked requests as upper bound); peft and base: aten ops counted on meta "
             f"tensors at this shape, peft adapters in bf16")
    common = dict(kind="modeled-h100", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="bfloat16",
                  model=model, launches={"ours": len(ours.launches), "peft": len(peft.launches),
                                         "base": len(base.launches)})
    record(**common, metric="bytes beyond the base linear", unit="GB", ours=(ours.bytes - base.bytes) / gb,
           peer=(peft.bytes - base.bytes) / gb, peer_name=PEER_NAMES["peft"], target="<= 0.10",
           ours_upper_bound=(ours.raw_bytes - base.bytes) / gb, ours_total=ours.bytes / gb, peft_total=peft.bytes / gb,
           base_total=base.bytes / gb, note="modeled; ours = distinct bytes, upper bound (raw requests) in "
                                            "ours_upper_bound")
    us = 1e6
    per_launch = [{"name": launch.name, "MB": round(launch.bytes / 1e6, 2), "raw_MB": round(launch.raw_bytes / 1e6, 2),
                   "GFLOP": round(launch.flops / 1e9, 2), "us": round(launch.time(roofline) * us, 2)}
                  for launch in ours.launches]
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=base.time(roofline) * us,
           peer_name=PEER_NAMES["base"], target="<= 1.05", ours_upper_bound=ours.time(roofline, raw=True) * us,
           ours_launches=per_launch, note="modeled; per-launch breakdown in ours_launches")
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=peft.time(roofline) * us,
           peer_name=PEER_NAMES["peft"], ours_upper_bound=ours.time(roofline, raw=True) * us, note="modeled")


# ---------------------------------------------------------------------------------------------
# static: the compiled kernels
# ---------------------------------------------------------------------------------------------

def test_static_kernels(record):
    # a config that fails to compile or spills is a finding, reported in its row (ok=False)
    reports = static.kernel_reports("peftkern.ops.lora", archs=pick(("sm_80", "sm_90"), ("sm_80",)), limit=pick(None, 1))
    static.record_reports(record, reports)
    assert reports


# ---------------------------------------------------------------------------------------------
# measured on a GPU (when one is lent)
# ---------------------------------------------------------------------------------------------

def _cuda_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("m,k,n,r", pick([(4096, 4096, 4096, 16), (4096, 4096, 14336, 16), (16384, 4096, 4096, 16)],
                                         [(512, 256, 384, 16)]), ids=lambda v: str(v))
def test_gpu(m, k, n, r, dropout, record):
    steps = {impl: build_step(impl, m, k, n, r, dropout, dtype="bfloat16", device="cuda") for impl in IMPLS}
    rounds = pick(30, 3)
    samples = {impl: [] for impl in IMPLS}
    for impl in IMPLS:  # warm-up: autotune/compile outside the timed rounds
        steps[impl]()
    for i in range(rounds + 1):
        for impl in (IMPLS if i % 2 == 0 else IMPLS[::-1]):
            samples[impl].append(_cuda_seconds(steps[impl]))
    med = {impl: 1e3 * sorted(s[1:])[len(s[1:]) // 2] for impl, s in samples.items()}
    peak = {}
    for impl in IMPLS:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        steps[impl]()
        torch.cuda.synchronize()
        peak[impl] = (torch.cuda.max_memory_allocated() - before) / 2.0 ** 20
    common = dict(kind="measured-gpu", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="bfloat16",
                  note=f"CUDA events, {rounds} interleaved rounds, {torch.cuda.get_device_name(0)}")
    record(**common, metric="step time", unit="ms", ours=med["ours"], peer=med["peft"], peer_name=PEER_NAMES["peft"])
    record(**common, metric="step time", unit="ms", ours=med["ours"], peer=med["base"], peer_name=PEER_NAMES["base"],
           target="<= 1.05")
    record(**common, metric="peak allocated extra", unit="MiB", ours=peak["ours"], peer=peak["peft"],
           peer_name=PEER_NAMES["peft"], base_linear=peak["base"])
