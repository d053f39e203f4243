"""DoRA linear, forward + backward: peftkern's DoRALinear against peft's ``use_dora=True`` layer with
the same config, and against peftkern's own LoRA step (the target: DoRA <= 1.10x our LoRA's time,
<= 1.02x its memory).

* measured-cpu: time (interleaved medians) and peak memory (fresh-subprocess RSS; live tensor bytes),
  the CPU face (torch, factored norm) vs peft DoRA and vs our LoRALinear, fp32, the CPU shapes.
* modeled-h100: step time and bytes on the H100 roofline, our DoRA Triton kernels as counted under
  the interpreter vs our LoRA Triton kernels (counted alike) and vs peft's eager DoRA sequence
  (aten ops counted on meta tensors), bf16, GPU shapes.
* static: registers, spills, shared memory of every DoRA kernel config on sm_80 and sm_90.
* measured-gpu: CUDA events and ``torch.cuda.max_memory_allocated`` (skipped without CUDA).

Dropout note: with dropout > 0 in training, peft's DoRA adds (m/norm - 1) * drop(x) W^T to the base
output (a second base GEMM) where peftkern applies m/norm to x W^T + s drop(x) A^T B^T (the DoRA
paper's form); the two agree without dropout and in eval. The p > 0 cases time each as it runs.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from benchmarks import memory, static, traffic
from benchmarks.harness import pick

ALPHA_PER_RANK = 2.0
DROPOUTS = pick((0.0, 0.1), (0.0,))
IMPLS = ("ours", "peft", "ours_lora")
PEER_NAMES = {"peft": "peft DoRA (use_dora=True)", "ours_lora": "peftkern LoRALinear"}

CPU_SHAPES = pick(full=[(2048, 1024, 1024, 16), (2048, 1024, 2816, 16)], quick=[(64, 48, 80, 16)])
CPU_ROUNDS = pick(15, 3)

GPU_SHAPES = pick(full=[(m, k, n, r) for m in (4096, 16384) for (k, n) in ((4096, 4096), (4096, 14336), (14336, 4096))
                        for r in (16, 64)],
                  quick=[(512, 384, 640, 16)])
CORNERS = (128, 256)
MODELED_DTYPE = torch.bfloat16


def _case(m, k, n, r, p) -> str:
    return f"fwd+bwd M={m} K={k} N={n} r={r} dropout={p:g}"


def _shape(m, k, n, r) -> dict:
    return {"M": m, "K": k, "N": n, "r": r}


# ---------------------------------------------------------------------------------------------
# the contenders, built alike
# ---------------------------------------------------------------------------------------------

def build_module(impl: str, k: int, n: int, r: int, dropout: float, dtype=torch.float32, device="cpu", seed=0):
    """A frozen base nn.Linear(k, n) wrapped by peftkern's DoRALinear, peft's lora.Linear with
    use_dora=True, or peftkern's LoRALinear; adapters in ``dtype``, B non-zero and the magnitude off
    its init, the same values for every impl."""
    values = device != "meta"
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    if values:
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        lora_a = torch.randn(r, k, generator=gen) / k ** 0.5
        lora_b = torch.randn(n, r, generator=gen) / r ** 0.5 * 0.1
        mag_factor = 1.0 + 0.1 * torch.rand(n, generator=gen)
    linear.weight.requires_grad_(False)
    alpha = ALPHA_PER_RANK * r
    if impl == "ours":
        from peftkern.nn.dora import DoRALinear

        module = DoRALinear.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout)
    elif impl == "ours_lora":
        from peftkern.nn import LoRALinear

        module = LoRALinear.from_linear(linear, r=r, lora_alpha=alpha, lora_dropout=dropout)
    elif impl == "peft":
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=True)
        module = PeftLoraLinear(linear, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=dropout,
                                use_dora=True)
        module.to(dtype)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if values:
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(lora_a)
            module.lora_B["default"].weight.copy_(lora_b)
            if impl != "ours_lora":
                mag = module.lora_magnitude_vector["default"].weight
                mag.copy_(linear.weight.float().norm(dim=1) * mag_factor)
    return module.train()


def build_step(impl: str, m: int, k: int, n: int, r: int, dropout: float, dtype: str = "float32",
               device: str = "cpu", seed: int = 0):
    """One training step of ``impl`` (forward, backward from a fixed dy; grads reset to None first).
    Also the builder the fresh memory subprocess calls (``benchmarks.bench_dora:build_step``)."""
    dt = getattr(torch, dtype)
    module = build_module(impl, k, n, r, dropout, dt, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dt).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(device=device, dtype=dt)
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)

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
    if dropout == 0.0:  # same config, same weights: the same output
        with torch.no_grad():
            torch.testing.assert_close(steps["ours"].module(steps["ours"].x), steps["peft"].module(steps["peft"].x),
                                       rtol=1e-4, atol=1e-4)
    medians = timer({impl: steps[impl] for impl in IMPLS}, rounds=CPU_ROUNDS)
    ms = {name: 1e3 * s for name, s in medians.items()}
    note = f"torch face; {len(timer.samples['ours'])} interleaved rounds; {_noise(timer.samples)}"
    common = dict(kind="measured-cpu", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="float32",
                  unit="ms", metric="step time", note=note)
    record(**common, ours=ms["ours"], peer=ms["peft"], peer_name=PEER_NAMES["peft"])
    record(**common, ours=ms["ours"], peer=ms["ours_lora"], peer_name=PEER_NAMES["ours_lora"], target="<= 1.10",
           peft_dora_over_our_lora=ms["peft"] / ms["ours_lora"])


@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("m,k,n,r", CPU_SHAPES, ids=lambda v: str(v))
def test_memory_cpu(m, k, n, r, dropout, record):
    mib = 2.0 ** 20
    rss = {impl: memory.peak_rss("benchmarks.bench_dora:build_step",
                                 dict(impl=impl, m=m, k=k, n=n, r=r, dropout=dropout), preload=("peft",))
           for impl in IMPLS}
    common = dict(kind="measured-cpu", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="float32",
                  unit="MiB")
    note = f"{rss['ours']['method']}; MALLOC_MMAP_THRESHOLD_={memory.MMAP_THRESHOLD}"
    for peer in ("peft", "ours_lora"):
        record(**common, metric="peak RSS extra (fresh process)", ours=rss["ours"]["extra_bytes"] / mib,
               peer=rss[peer]["extra_bytes"] / mib, peer_name=PEER_NAMES[peer], note=note,
               target="<= 1.02" if peer == "ours_lora" else None)
    live = {}
    for impl in IMPLS:
        step = build_step(impl, m, k, n, r, dropout)
        step()
        live[impl] = memory.live_peak(step)
    for peer in ("peft", "ours_lora"):
        record(**common, metric="peak live tensor bytes", ours=live["ours"] / mib, peer=live[peer] / mib,
               peer_name=PEER_NAMES[peer], note="TorchDispatchMode tracker",
               target="<= 1.02" if peer == "ours_lora" else None)


# ---------------------------------------------------------------------------------------------
# modeled on the H100 roofline
# ---------------------------------------------------------------------------------------------

def _ours_step_for_count(m, k, n, r, dropout):
    dt = MODELED_DTYPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dt).requires_grad_(True)
    weight = torch.randn(n, k, generator=gen).to(dt) / k ** 0.5
    lora_a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(dt).requires_grad_(True)
    lora_b = (torch.randn(n, r, generator=gen) * 0.1).to(dt).requires_grad_(True)
    magnitude = (weight.float().norm(dim=1)).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(dt)

    def step():
        import peftkern
        from peftkern.ops.dora import dora_linear

        with peftkern.backend.use("triton"):
            y = dora_linear(x, weight, None, lora_a, lora_b, magnitude, ALPHA_PER_RANK, dropout, training=True)
            y.backward(dy)

    return step


@functools.lru_cache(maxsize=None)
def ours_corner_counts(r: int, dropout: float) -> dict:
    """Our DoRA Triton step counted under the interpreter at every (M, K, N) corner of CORNERS^3,
    after one uncounted step (per-device buffers cached on first use are not per-step traffic)."""
    _ours_step_for_count(*(max(CORNERS),) * 3, r, dropout)()
    return {corner: traffic.count_triton(_ours_step_for_count(*corner, r, dropout))
            for corner in itertools.product(CORNERS, repeat=3)}


def count_ours(m, k, n, r, dropout) -> traffic.Count:
    return traffic.extrapolate_grid(ours_corner_counts(r, dropout), (m, k, n))


def count_peft(m, k, n, r, dropout) -> traffic.Count:
    module = build_module("peft", k, n, r, dropout, MODELED_DTYPE, device="meta")
    x = torch.empty(m, k, dtype=MODELED_DTYPE, device="meta").requires_grad_(True)
    dy = torch.empty(m, n, dtype=MODELED_DTYPE, device="meta")
    with traffic.gpu_dropout():
        return traffic.count_eager(lambda: module(x).backward(dy))


@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("m,k,n,r", GPU_SHAPES, ids=lambda v: str(v))
def test_modeled_h100(m, k, n, r, dropout, record):
    from benchmarks import bench_lora

    roofline = traffic.H100_SXM
    ours = count_ours(m, k, n, r, dropout)
    our_lora = bench_lora.count_ours(m, k, n, r, dropout)
    peft = count_peft(m, k, n, r, dropout)
    base = bench_lora.count_eager_step("base", m, k, n, r, dropout)
    gb, us = 1e9, 1e6
    model = (f"{roofline.describe()}; ours (DoRA and LoRA): Triton kernels counted under the interpreter at M,K,N in "
             f"{{{CORNERS[0]},{CORNERS[1]}}} and extrapolated multilinearly, distinct bytes per launch, plus the "
             f"aten ops around them; peft DoRA: aten ops counted on meta tensors at this shape, bf16")
    common = dict(kind="modeled-h100", case=_case(m, k, n, r, dropout), shape=_shape(m, k, n, r), dtype="bfloat16",
                  model=model, launches={"ours": len(ours.launches), "ours_lora": len(our_lora.launches),
                                         "peft": len(peft.launches)}, note="modeled")
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=our_lora.time(roofline) * us,
           peer_name=PEER_NAMES["ours_lora"], target="<= 1.10", ours_upper_bound=ours.time(roofline, raw=True) * us,
           base_linear=base.time(roofline) * us)
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=peft.time(roofline) * us,
           peer_name=PEER_NAMES["peft"], peft_over_base=peft.time(roofline) / base.time(roofline))
    record(**common, metric="bytes moved", unit="GB", ours=ours.bytes / gb, peer=our_lora.bytes / gb,
           peer_name=PEER_NAMES["ours_lora"], ours_upper_bound=ours.raw_bytes / gb, peft_total=peft.bytes / gb)
    record(**common, metric="bytes moved", unit="GB", ours=ours.bytes / gb, peer=peft.bytes / gb,
           peer_name=PEER_NAMES["peft"])


# ---------------------------------------------------------------------------------------------
# static: the compiled kernels
# ---------------------------------------------------------------------------------------------

def test_static_kernels(record):
    # a config that fails to compile or spills is a finding, reported in its row (ok=False)
    reports = static.kernel_reports("peftkern.ops.dora", archs=("sm_80", "sm_90"), limit=pick(None, 1))
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
    for impl in IMPLS:
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
    record(**common, metric="step time", unit="ms", ours=med["ours"], peer=med["ours_lora"],
           peer_name=PEER_NAMES["ours_lora"], target="<= 1.10")
    record(**common, metric="peak allocated extra", unit="MiB", ours=peak["ours"], peer=peak["ours_lora"],
           peer_name=PEER_NAMES["ours_lora"], target="<= 1.02", peft=peak["peft"])
