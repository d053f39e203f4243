"""(IA)^3 linear, forward + backward: peftkern's fused op against peft's ``ia3.Linear`` with the same
vector, and against the frozen base ``nn.Linear`` alone. Both placements of the scale: the output
(keys, values) and the input (feed-forward down projection).

* measured-cpu: time (interleaved medians) and peak memory (fresh-subprocess RSS; live tensor bytes),
  peftkern's CPU face (``IA3Linear``, torch face) vs peft, fp32.
* modeled-h100: step time and bytes beyond the base linear on the H100 roofline, our Triton kernels
  as counted under the interpreter vs peft's eager aten sequence and the base linear as counted, bf16
  (target: the (IA)^3 step within 1.02x of the frozen base linear's step).
* static: registers, spills, shared memory of every (IA)^3 kernel config on sm_80 and sm_90.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import nn

from benchmarks import memory, static, traffic
from benchmarks.harness import pick, spread

IMPLS = ("ours", "peft", "base")
PEER_NAMES = {"peft": "peft ia3.Linear", "base": "base nn.Linear"}
PLACEMENTS = ("output", "input")

CPU_SHAPES = pick(full=[(2048, 1024, 1024), (2048, 2816, 1024)], quick=[(64, 48, 80)])
CPU_ROUNDS = pick(15, 3)
GPU_SHAPES = pick(full=[(m, k, n) for m in (4096, 16384) for (k, n) in ((4096, 4096), (4096, 1024), (14336, 4096))],
                  quick=[(512, 384, 640)])
CORNERS = (128, 256)
MODELED_DTYPE = torch.bfloat16


def _case(m, k, n, placement) -> str:
    return f"fwd+bwd M={m} K={k} N={n} scale={placement}"


def build_module(impl: str, k: int, n: int, placement: str, dtype=torch.float32, device="cpu", seed=0):
    """A frozen base nn.Linear(k, n) wrapped by peftkern's IA3Linear or peft's ia3.Linear (the same
    random vector, around 1), or left alone (``impl="base"``)."""
    values = device != "meta"
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    feedforward = placement == "input"
    if values:
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        vector = 1.0 + 0.1 * torch.randn(k if feedforward else n, generator=gen)
    linear.weight.requires_grad_(False)
    if impl == "base":
        return linear.train()
    if impl == "ours":
        from peftkern.tuners.ia3 import IA3Linear

        module = IA3Linear(linear, feedforward)
        module.update_layer("default")
        module.set_adapter("default")
    elif impl == "peft":
        from peft import IA3Config
        from peft.tuners.ia3.layer import Linear as PeftIA3Linear

        module = PeftIA3Linear(linear, "default", IA3Config(target_modules=["x"]), is_feedforward=feedforward)
        module.to(dtype)
        if device == "meta":  # the modeled step: the vector in fp32 beside bf16 weights, as PEFT keeps adapters
            module.ia3_l["default"].data = module.ia3_l["default"].data.float()
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if values:
        with torch.no_grad():
            module.ia3_l["default"].copy_(vector.view_as(module.ia3_l["default"]))
    return module.train()


def build_step(impl: str, m: int, k: int, n: int, placement: str, dtype: str = "float32", device: str = "cpu",
               seed: int = 0):
    """One training step (forward, backward from a fixed dy; grads reset first); the memory builder."""
    dt = getattr(torch, dtype)
    module = build_module(impl, k, n, placement, dt, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dt).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(device=device, dtype=dt)
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        try:
            module(x).backward(dy)
        finally:
            x.grad = None
            for p in params:
                p.grad = None

    step.module, step.x = module, x
    return step


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("m,k,n", CPU_SHAPES, ids=lambda v: str(v))
def test_time_cpu(m, k, n, placement, timer, record):
    steps = {impl: build_step(impl, m, k, n, placement) for impl in IMPLS}
    with torch.no_grad():
        torch.testing.assert_close(steps["ours"].module(steps["ours"].x), steps["peft"].module(steps["peft"].x),
                                   rtol=1e-4, atol=1e-4)
    medians = timer(steps, rounds=CPU_ROUNDS)
    ms = {name: 1e3 * s for name, s in medians.items()}
    note = (f"torch face; {len(timer.samples['ours'])} interleaved rounds; "
            + ", ".join(f"{name} IQR/median {spread(s):.0%}" for name, s in timer.samples.items()))
    common = dict(kind="measured-cpu", case=_case(m, k, n, placement), shape={"M": m, "K": k, "N": n},
                  dtype="float32", unit="ms", metric="step time", note=note, peft_over_base=ms["peft"] / ms["base"])
    record(**common, ours=ms["ours"], peer=ms["peft"], peer_name=PEER_NAMES["peft"])
    record(**common, ours=ms["ours"], peer=ms["base"], peer_name=PEER_NAMES["base"])


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("m,k,n", CPU_SHAPES, ids=lambda v: str(v))
def test_memory_cpu(m, k, n, placement, record):
    mib = 2.0 ** 20
    rss = {impl: memory.peak_rss("benchmarks.bench_ia3:build_step", dict(impl=impl, m=m, k=k, n=n,
                                                                         placement=placement), preload=("peft",))
           for impl in IMPLS}
    common = dict(kind="measured-cpu", case=_case(m, k, n, placement), shape={"M": m, "K": k, "N": n},
                  dtype="float32", unit="MiB")
    record(**common, metric="peak RSS extra (fresh process)", ours=rss["ours"]["extra_bytes"] / mib,
           peer=rss["peft"]["extra_bytes"] / mib, peer_name=PEER_NAMES["peft"],
           base_linear=rss["base"]["extra_bytes"] / mib, note=f"{rss['ours']['method']}")
    live = {}
    for impl in IMPLS:
        step = build_step(impl, m, k, n, placement)
        step()
        live[impl] = memory.live_peak(step)
    record(**common, metric="peak live tensor bytes", ours=live["ours"] / mib, peer=live["peft"] / mib,
           peer_name=PEER_NAMES["peft"], base_linear=live["base"] / mib, note="TorchDispatchMode tracker")


def _ours_step_for_count(m, k, n, placement):
    dt = MODELED_DTYPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dt).requires_grad_(True)
    weight = torch.randn(n, k, generator=gen).to(dt)
    scale = (1.0 + 0.1 * torch.randn(k if placement == "input" else n, generator=gen)).requires_grad_(True)  # fp32
    dy = torch.randn(m, n, generator=gen).to(dt)

    def step():
        import peftkern
        from peftkern.ops.ia3 import ia3_linear

        with peftkern.backend.use("triton"):
            ia3_linear(x, weight, None, scale, placement == "input").backward(dy)

    return step


@functools.lru_cache(maxsize=None)
def ours_corner_counts(placement: str) -> dict:
    return {corner: traffic.count_triton(_ours_step_for_count(*corner, placement))
            for corner in itertools.product(CORNERS, repeat=3)}


def count_eager_step(impl, m, k, n, placement) -> traffic.Count:
    module = build_module(impl, k, n, placement, MODELED_DTYPE, device="meta")
    x = torch.empty(m, k, dtype=MODELED_DTYPE, device="meta").requires_grad_(True)
    dy = torch.empty(m, n, dtype=MODELED_DTYPE, device="meta")
    return traffic.count_eager(lambda: module(x).backward(dy))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("m,k,n", GPU_SHAPES, ids=lambda v: str(v))
def test_modeled_h100(m, k, n, placement, record):
    if not traffic.interpreting():
        pytest.skip("our kernels are counted under Triton's interpreter (TRITON_INTERPRET=1, a CPU-only run)")
    roofline = traffic.H100_SXM
    ours = traffic.extrapolate_grid(ours_corner_counts(placement), (m, k, n))
    peft = count_eager_step("peft", m, k, n, placement)
    base = count_eager_step("base", m, k, n, placement)
    model = (f"{roofline.describe()}; ours: Triton kernels counted under the interpreter at M,K,N in "
             f"{{{CORNERS[0]},{CORNERS[1]}}} and extrapolated multilinearly; peft and base: aten ops counted on "
             f"meta tensors at this shape, bf16 weights and activations, the vector in fp32 (PEFT's default for "
             f"adapters) and training, x needs its gradient")
    us, gb = 1e6, 1e9
    per_launch = [{"name": launch.name, "MB": round(launch.bytes / 1e6, 2), "GFLOP": round(launch.flops / 1e9, 2),
                   "us": round(launch.time(roofline) * us, 2)} for launch in ours.launches]
    common = dict(kind="modeled-h100", case=_case(m, k, n, placement), shape={"M": m, "K": k, "N": n},
                  dtype="bfloat16", model=model,
                  launches={"ours": len(ours.launches), "peft": len(peft.launches), "base": len(base.launches)})
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=base.time(roofline) * us,
           peer_name=PEER_NAMES["base"], target="<= 1.02", ours_launches=per_launch, note="modeled")
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=peft.time(roofline) * us,
           peer_name=PEER_NAMES["peft"], note="modeled")
    record(**common, metric="bytes beyond the base linear", unit="GB", ours=(ours.bytes - base.bytes) / gb,
           peer=(peft.bytes - base.bytes) / gb, peer_name=PEER_NAMES["peft"], ours_total=ours.bytes / gb,
           peft_total=peft.bytes / gb, base_total=base.bytes / gb, note="modeled; distinct bytes per launch")


def test_static_kernels(record):
    # a config that fails to compile or spills is a finding, reported in its row (ok=False)
    reports = static.kernel_reports("peftkern.ops.ia3", archs=pick(("sm_80", "sm_90"), ("sm_80",)), limit=pick(None, 1))
    static.record_reports(record, reports)
    assert reports
