"""Log-prob losses from hidden states, forward + backward: peftkern's fused losses against the naive
path (full logits, as HF/TRL compute them) and Liger-Kernel's chunked losses (torch, CPU).

* measured-cpu: time (interleaved medians) and peak memory (fresh-subprocess RSS; live tensor bytes),
  fp32, hidden 512, vocab 32000, 4096 tokens: SFT cross-entropy, and DPO (sigmoid) on 2 pairs of
  1024-token sequences with the reference computed from its own hidden states in each contender.
  Liger has no CPU SFT cross-entropy (its FLCE is Triton-only), so SFT has no Liger row.
* modeled-h100: bytes and step time on the H100 roofline at vocab 32000 / 128256 and 4096 / 16384
  tokens, hidden 4096, bf16: our Triton kernels counted under the interpreter vs the naive eager
  aten sequence counted on meta tensors.
* static: registers, spills, shared memory of every log-prob kernel config on sm_80 and sm_90.
"""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from benchmarks import memory, static, traffic
from benchmarks.harness import pick

SFT_CPU = pick(full=[(4096, 32000, 512)], quick=[(64, 500, 32)])
# DPO: (pairs, sequence length, vocab, hidden, prompt tokens per sequence, which carry no loss)
DPO_CPU = pick(full=[(2, 1024, 32000, 512, 0), (2, 1024, 32000, 512, 256)], quick=[(1, 32, 500, 32, 8)])
CPU_ROUNDS = pick(5, 2)
BETA = 0.1

GPU_TOKENS = pick(full=(4096, 16384), quick=(256,))
GPU_VOCABS = pick(full=(32000, 128256), quick=(1024,))
GPU_HIDDEN = pick(4096, 256)
MODELED_DTYPE = torch.bfloat16
# our kernels are counted at these (tokens, vocab, hidden) corners (tile multiples) and extrapolated
# multilinearly: every count of a tiled kernel is affine in each size separately.
CORNERS = ((64, 128), (128, 256), (32, 64))

PEERS = {"naive": "naive torch (full logits)", "liger": "Liger chunked loss (torch)"}


# ---------------------------------------------------------------------------------------------
# the contenders, built alike
# ---------------------------------------------------------------------------------------------

def _tensors(tokens_shape, v, h, dtype, device, seed, prompt=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*tokens_shape, h, generator=gen)).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, tokens_shape, generator=gen).to(device)
    if prompt:
        targets[..., :prompt] = -100
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


def _reset(*tensors):
    for t in tensors:
        t.grad = None


def build_sft_step(impl: str, n: int, v: int, h: int, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """One SFT cross-entropy step (mean over tokens) of ``impl``: forward and backward to hidden and W."""
    hidden, weight, targets = _tensors((n,), v, h, getattr(torch, dtype), device, seed)

    if impl == "ours":
        from peftkern.losses import fused_sft_loss

        def loss_fn():
            return fused_sft_loss(hidden, weight, targets)
    elif impl == "naive":
        def loss_fn():
            return F.cross_entropy((hidden @ weight.t()).float(), targets)
    else:
        raise ValueError(f"no SFT contender {impl!r}")

    def step():
        _reset(hidden, weight)
        loss_fn().backward()

    step.loss_fn = loss_fn
    return step


def _naive_seq_logps(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != -100
    return (token * mask).sum(-1)


def build_dpo_step(impl: str, pairs: int, seq: int, v: int, h: int, prompt: int = 0, dtype: str = "float32",
                   device: str = "cpu", seed: int = 0):
    """One DPO (sigmoid) step of ``impl`` on [2 * pairs, seq] tokens, chosen first; the reference
    log-probs are computed in the step from the reference's own hidden states and head."""
    dt = getattr(torch, dtype)
    hidden, weight, targets = _tensors((2 * pairs, seq), v, h, dt, device, seed, prompt)
    ref_hidden, ref_weight, _ = _tensors((2 * pairs, seq), v, h, dt, device, seed + 1)
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()

    if impl == "ours":
        from peftkern.losses import fused_dpo_loss

        def loss_fn():
            return fused_dpo_loss(hidden, weight, targets, beta=BETA, ref_hidden=ref_hidden, ref_weight=ref_weight)[0]
    elif impl == "naive":
        from peftkern.losses import dpo_loss

        def loss_fn():
            chosen, rejected = _naive_seq_logps(hidden, weight, targets).chunk(2)
            with torch.no_grad():
                ref_chosen, ref_rejected = _naive_seq_logps(ref_hidden, ref_weight, targets).chunk(2)
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA)[0]
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=BETA, compiled=False, use_ref_model=True)

        def loss_fn():
            return liger(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)[0]
    else:
        raise ValueError(f"no DPO contender {impl!r}")

    def step():
        _reset(hidden, weight)
        loss_fn().backward()

    step.loss_fn = loss_fn
    return step


# ---------------------------------------------------------------------------------------------
# measured on the CPU
# ---------------------------------------------------------------------------------------------

def _noise(samples) -> str:
    from benchmarks.harness import spread

    return ", ".join(f"{name} IQR/median {spread(s):.0%}" for name, s in samples.items())


def _agree(steps):
    with torch.no_grad():
        values = {name: float(s.loss_fn()) for name, s in steps.items()}
    first = values["naive"]
    for name, value in values.items():
        assert abs(value - first) <= 1e-3 * max(1.0, abs(first)), f"{name} loss {value} != naive {first}"


def _time_rows(record, case, shape, steps, timer, targets_by_peer):
    medians = timer(steps, rounds=CPU_ROUNDS)
    ms = {name: 1e3 * s for name, s in medians.items()}
    note = f"torch face; {len(timer.samples['ours'])} interleaved rounds; {_noise(timer.samples)}"
    for peer in steps:
        if peer == "ours":
            continue
        record(kind="measured-cpu", case=case, shape=shape, dtype="float32", unit="ms", metric="step time",
               ours=ms["ours"], peer=ms[peer], peer_name=PEERS[peer], target=targets_by_peer.get(peer), note=note)


def _memory_rows(record, case, shape, builder, kwargs, impls):
    mib = 2.0 ** 20
    rss = {impl: memory.peak_rss(f"benchmarks.bench_losses:{builder}", dict(impl=impl, **kwargs),
                                 preload=("peftkern.losses", "liger_kernel.chunked_loss")) for impl in impls}
    for peer in impls:
        if peer == "ours":
            continue
        record(kind="measured-cpu", case=case, shape=shape, dtype="float32", unit="MiB",
               metric="peak RSS extra (fresh process)", ours=rss["ours"]["extra_bytes"] / mib,
               peer=rss[peer]["extra_bytes"] / mib, peer_name=PEERS[peer], target="<= 0.10" if peer == "naive" else "< 1",
               note=f"{rss['ours']['method']}; MALLOC_MMAP_THRESHOLD_={memory.MMAP_THRESHOLD}")
    live = {}
    for impl in impls:
        step = globals()[builder](impl=impl, **kwargs)
        step()
        live[impl] = memory.live_peak(step)
    for peer in impls:
        if peer == "ours":
            continue
        record(kind="measured-cpu", case=case, shape=shape, dtype="float32", unit="MiB",
               metric="peak live tensor bytes", ours=live["ours"] / mib, peer=live[peer] / mib, peer_name=PEERS[peer],
               target="<= 0.10" if peer == "naive" else "< 1", note="TorchDispatchMode tracker")


def _sft_case(n, v, h):
    return f"SFT CE fwd+bwd tokens={n} V={v} H={h}", {"tokens": n, "V": v, "H": h}


def _dpo_case(pairs, seq, v, h, prompt):
    return (f"DPO sigmoid fwd+bwd pairs={pairs} seq={seq} V={v} H={h} prompt={prompt}",
            {"pairs": pairs, "seq": seq, "V": v, "H": h, "prompt": prompt})


@pytest.mark.parametrize("n,v,h", SFT_CPU, ids=str)
def test_sft_time_cpu(n, v, h, timer, record):
    steps = {impl: build_sft_step(impl, n, v, h) for impl in ("ours", "naive")}
    _agree(steps)
    _time_rows(record, *_sft_case(n, v, h), steps, timer, {"naive": "<= 1.0"})


@pytest.mark.parametrize("n,v,h", SFT_CPU, ids=str)
def test_sft_memory_cpu(n, v, h, record):
    _memory_rows(record, *_sft_case(n, v, h), "build_sft_step", dict(n=n, v=v, h=h), ("ours", "naive"))


@pytest.mark.parametrize("pairs,seq,v,h,prompt", DPO_CPU, ids=str)
def test_dpo_time_cpu(pairs, seq, v, h, prompt, timer, record):
    steps = {impl: build_dpo_step(impl, pairs, seq, v, h, prompt) for impl in ("ours", "naive", "liger")}
    _agree(steps)
    _time_rows(record, *_dpo_case(pairs, seq, v, h, prompt), steps, timer, {"naive": "<= 1.0", "liger": "< 1"})


@pytest.mark.parametrize("pairs,seq,v,h,prompt", DPO_CPU, ids=str)
def test_dpo_memory_cpu(pairs, seq, v, h, prompt, record):
    _memory_rows(record, *_dpo_case(pairs, seq, v, h, prompt), "build_dpo_step",
                 dict(pairs=pairs, seq=seq, v=v, h=h, prompt=prompt), ("ours", "naive", "liger"))


# ---------------------------------------------------------------------------------------------
# modeled on the H100 roofline
# ---------------------------------------------------------------------------------------------

def _ours_for_count(kind, n, v, h):
    """Our step with the Triton face on [n] tokens ([2, n/2] for DPO), bf16, for the interpreter;
    the inputs are built here, outside what is counted."""
    import peftkern

    inner = (build_sft_step("ours", n, v, h, dtype="bfloat16") if kind == "sft"
             else build_dpo_step("ours", 1, n // 2, v, h, dtype="bfloat16"))

    def step():
        with peftkern.backend.use("triton"):
            inner()

    return step


@functools.lru_cache(maxsize=None)
def ours_corner_counts(kind: str) -> dict:
    return {corner: traffic.count_triton(_ours_for_count(kind, *corner)) for corner in itertools.product(*CORNERS)}


def count_naive(kind, n, v, h) -> traffic.Count:
    """The naive step's aten ops counted on meta tensors at the real shape."""
    if kind == "sft":
        step = build_sft_step("naive", n, v, h, dtype="bfloat16", device="meta")
    else:
        step = build_dpo_step("naive", 1, n // 2, v, h, dtype="bfloat16", device="meta")
    return traffic.count_eager(step)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("n", GPU_TOKENS)
@pytest.mark.parametrize("v", GPU_VOCABS)
def test_modeled_h100(kind, n, v, record):
    h = GPU_HIDDEN
    roofline = traffic.H100_SXM
    ours = traffic.extrapolate_grid(ours_corner_counts(kind), (n, v, h))
    naive = count_naive(kind, n, v, h)
    gb, us = 1e9, 1e6
    model = (f"{roofline.describe()}; ours: Triton kernels (+ launcher aten ops) counted under the interpreter at "
             f"(tokens, V, H) corners {CORNERS} and extrapolated multilinearly (exact for tile multiples), distinct "
             f"bytes per launch, raw masked requests in ours_upper_bound; naive: aten ops on meta tensors at this "
             f"shape (logits in bf16, loss in fp32)")
    what = "SFT CE" if kind == "sft" else "DPO sigmoid (policy fwd+bwd, reference fwd), sequences of tokens/2"
    case = f"{what} tokens={n} V={v} H={h}"
    common = dict(kind="modeled-h100", case=case, shape={"tokens": n, "V": v, "H": h}, dtype="bfloat16", model=model,
                  launches={"ours": len(ours.launches), "naive": len(naive.launches)}, peer_name=PEERS["naive"])
    record(**common, metric="bytes moved", unit="GB", ours=ours.bytes / gb, peer=naive.bytes / gb,
           ours_upper_bound=ours.raw_bytes / gb, note="modeled")
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=naive.time(roofline) * us,
           target="<= 1.0", ours_upper_bound=ours.time(roofline, raw=True) * us,
           flops_ours=ours.flops, flops_naive=naive.flops, note="modeled")


# ---------------------------------------------------------------------------------------------
# static: the compiled kernels
# ---------------------------------------------------------------------------------------------

def test_static_kernels(record):
    reports = static.kernel_reports("peftkern.ops.logprobs", archs=pick(("sm_80", "sm_90"), ("sm_80",)),
                                    limit=pick(None, 1))
    for rep in reports:
        record(kind="static", case=f"{rep['kernel']} {rep['config']} {rep['arch']}", shape={},
               dtype=rep["config"].split()[0], metric="registers per thread", ours=rep["registers"], peer=None,
               peer_name=None, unit="registers", target=None, spill_bytes=rep["spill_bytes"],
               shared_bytes=rep["shared_bytes"], wgmma=rep["wgmma"], ok=rep["ok"], arch=rep["arch"],
               note=rep.get("error", ""))
    assert reports
