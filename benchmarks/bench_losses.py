"""Log-prob losses from hidden states, forward + backward: peftkern's fused losses (gradients formed in
the forward pass) against the naive path (full logits, as HF/TRL compute them) and Liger-Kernel's
chunked losses (torch, CPU).

* measured-cpu: time (interleaved medians, at 1 and 2 torch threads in one run) and peak memory
  (fresh-subprocess RSS; live tensor bytes), fp32, hidden 512, vocab 32000: SFT cross-entropy on
  4096 tokens; DPO (sigmoid) on 8 pairs x 256 tokens and on 2 pairs x 1024 tokens with a 256-token
  prompt, the reference computed from its own hidden states in each contender; KTO on 8 examples x
  512 tokens with the reference's hidden states and a given KL point. Liger has no CPU SFT
  cross-entropy (its FLCE is Triton-only), so SFT has no Liger row.
* modeled-h100: bytes and step time on the H100 roofline at vocab 32000 / 128256 and 4096 / 16384
  tokens, hidden 4096, bf16: our Triton kernels counted under the interpreter vs the naive eager
  aten sequence counted on meta tensors.
* static: registers, spills, shared memory of every log-prob kernel config on sm_80 and sm_90.
"""
from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks import memory, static, traffic
from benchmarks.harness import pick

SFT_CPU = pick(full=[(4096, 32000, 512)], quick=[(64, 500, 32)], shared=[(1024, 32000, 512)])
# DPO: (pairs, sequence length, vocab, hidden, prompt tokens per sequence, which carry no loss)
DPO_CPU = pick(full=[(8, 256, 32000, 512, 0), (2, 1024, 32000, 512, 256)], quick=[(1, 32, 500, 32, 8)],
               shared=[(2, 256, 32000, 512, 0), (1, 1024, 32000, 512, 256)])
# KTO: (examples, sequence length, vocab, hidden, prompt tokens)
KTO_CPU = pick(full=[(8, 512, 32000, 512, 0)], quick=[(2, 32, 500, 32, 8)], shared=[(2, 512, 32000, 512, 0)])
THREADS = pick((1, 2), (1,))
# interleaved rounds; PEFTKERN_BENCH_ROUNDS sets fewer where a full-shape run must stay short on a shared machine
CPU_ROUNDS = int(os.environ.get("PEFTKERN_BENCH_ROUNDS", 0)) or pick(5, 2)
BETA = 0.1
TIME_TARGETS = {"naive": "<= 0.85", "liger": "<= 0.90"}

GPU_TOKENS = pick(full=(4096, 16384), quick=(512,))
GPU_VOCABS = pick(full=(32000, 128256), quick=(1024,))
GPU_HIDDEN = pick(4096, 256)
GPU_SEQ = pick(1024, 64)  # DPO / KTO sequences at GPU scale (docs/BENCHMARKS.md)
MODELED_DTYPE = torch.bfloat16

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


def _stepper(loss_fn, *leaves):
    def step():
        _reset(*leaves)
        loss_fn().backward()

    step.loss_fn = loss_fn
    return step


def build_sft_step(impl: str, n: int, v: int, h: int, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                   chunk_size: int | None = None):
    """One SFT cross-entropy step (mean over tokens) of ``impl``: forward and backward to hidden and W."""
    hidden, weight, targets = _tensors((n,), v, h, getattr(torch, dtype), device, seed)
    if impl == "ours":
        from peftkern.losses import fused_sft_loss

        def loss_fn():
            return fused_sft_loss(hidden, weight, targets, chunk_size=chunk_size)
    elif impl == "naive":
        def loss_fn():
            return F.cross_entropy((hidden @ weight.t()).float(), targets)
    else:
        raise ValueError(f"no SFT contender {impl!r}")
    return _stepper(loss_fn, hidden, weight)


def _naive_seq_logps(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != -100
    return (token * mask).sum(-1)


def build_dpo_step(impl: str, pairs: int, seq: int, v: int, h: int, prompt: int = 0, dtype: str = "float32",
                   device: str = "cpu", seed: int = 0, chunk_size: int | None = None):
    """One DPO (sigmoid) step of ``impl`` on [2 * pairs, seq] tokens, chosen first; the reference
    log-probs are computed in the step from the reference's own hidden states and head."""
    dt = getattr(torch, dtype)
    hidden, weight, targets = _tensors((2 * pairs, seq), v, h, dt, device, seed, prompt)
    ref_hidden, ref_weight, _ = _tensors((2 * pairs, seq), v, h, dt, device, seed + 1)
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    if impl == "ours":
        from peftkern.losses import fused_dpo_loss

        def loss_fn():
            return fused_dpo_loss(hidden, weight, targets, beta=BETA, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  chunk_size=chunk_size)[0]
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
    return _stepper(loss_fn, hidden, weight)


def build_kto_step(impl: str, n: int, seq: int, v: int, h: int, prompt: int = 0, dtype: str = "float32",
                   device: str = "cpu", seed: int = 0, chunk_size: int | None = None):
    """One KTO step of ``impl`` on [n, seq] tokens (every other example desirable), the reference
    log-probs from the reference's own hidden states, the KL point z0 given (as TRL's precomputed one)."""
    dt = getattr(torch, dtype)
    hidden, weight, targets = _tensors((n, seq), v, h, dt, device, seed, prompt)
    ref_hidden, ref_weight, _ = _tensors((n, seq), v, h, dt, device, seed + 1)
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    labels = (torch.arange(n) % 2 == 0).to(device)
    kl = torch.tensor(0.05, device=device)
    if impl == "ours":
        from peftkern.losses import fused_kto_loss, fused_sequence_logps

        def loss_fn():
            with torch.no_grad():
                ref = fused_sequence_logps(ref_hidden, ref_weight, targets, chunk_size=chunk_size)
            return fused_kto_loss(hidden, weight, targets, labels, ref, kl=kl, beta=BETA, chunk_size=chunk_size)[0]
    elif impl == "naive":
        from peftkern.losses.kto import kto_example_losses

        def loss_fn():  # kto_loss's formula, without boolean indexing (it also runs on meta tensors)
            seq_logps = _naive_seq_logps(hidden, weight, targets)
            with torch.no_grad():
                ref = _naive_seq_logps(ref_hidden, ref_weight, targets)
            return kto_example_losses(seq_logps - ref, labels, BETA, kl).mean()
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

        liger = LigerFusedLinearKTOLoss(beta=BETA, compiled=False, use_ref_model=True)

        def loss_fn():
            out = liger(hidden, weight, targets, preference_labels=labels, ref_input=ref_hidden,
                        ref_weight=ref_weight, kl=kl)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise ValueError(f"no KTO contender {impl!r}")
    return _stepper(loss_fn, hidden, weight)


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


@pytest.fixture
def threads(request):
    """Runs the test body at ``request.param`` torch threads, restoring the session's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _time_rows(record, case, shape, steps, timer, threads):
    medians = timer(steps, rounds=CPU_ROUNDS)
    ms = {name: 1e3 * s for name, s in medians.items()}
    note = (f"torch face; {threads} torch thread(s); {len(timer.samples['ours'])} interleaved rounds; "
            f"{_noise(timer.samples)}; load average {os.getloadavg()[0]:.1f}")
    for peer in steps:
        if peer == "ours":
            continue
        record(kind="measured-cpu", case=case, shape={**shape, "threads": threads}, dtype="float32", unit="ms",
               metric=f"step time, {threads} thread(s)", ours=ms["ours"], peer=ms[peer], peer_name=PEERS[peer],
               target=TIME_TARGETS.get(peer), note=note)


def _memory_rows(record, case, shape, builder, kwargs, impls):
    mib = 2.0 ** 20
    rss = {impl: memory.peak_rss(f"benchmarks.bench_losses:{builder}", dict(impl=impl, **kwargs),
                                 preload=("peftkern.losses", "liger_kernel.chunked_loss")) for impl in impls}
    targets = {"naive": "<= 0.10", "liger": "< 1"}
    for peer in impls:
        if peer == "ours":
            continue
        record(kind="measured-cpu", case=case, shape=shape, dtype="float32", unit="MiB",
               metric="peak RSS extra (fresh process)", ours=rss["ours"]["extra_bytes"] / mib,
               peer=rss[peer]["extra_bytes"] / mib, peer_name=PEERS[peer], target=targets[peer],
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
               target=targets[peer], note="TorchDispatchMode tracker")


def _sft_case(n, v, h):
    return f"SFT CE fwd+bwd tokens={n} V={v} H={h}", {"tokens": n, "V": v, "H": h}


def _dpo_case(pairs, seq, v, h, prompt):
    return (f"DPO sigmoid fwd+bwd pairs={pairs} seq={seq} V={v} H={h} prompt={prompt}",
            {"pairs": pairs, "seq": seq, "V": v, "H": h, "prompt": prompt})


def _kto_case(n, seq, v, h, prompt):
    return (f"KTO fwd+bwd examples={n} seq={seq} V={v} H={h} prompt={prompt}",
            {"examples": n, "seq": seq, "V": v, "H": h, "prompt": prompt})


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("n,v,h", SFT_CPU, ids=str)
def test_sft_time_cpu(n, v, h, threads, timer, record):
    steps = {impl: build_sft_step(impl, n, v, h) for impl in ("ours", "naive")}
    _agree(steps)
    _time_rows(record, *_sft_case(n, v, h), steps, timer, threads)


@pytest.mark.parametrize("n,v,h", SFT_CPU, ids=str)
def test_sft_memory_cpu(n, v, h, record):
    _memory_rows(record, *_sft_case(n, v, h), "build_sft_step", dict(n=n, v=v, h=h), ("ours", "naive"))


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("pairs,seq,v,h,prompt", DPO_CPU, ids=str)
def test_dpo_time_cpu(pairs, seq, v, h, prompt, threads, timer, record):
    steps = {impl: build_dpo_step(impl, pairs, seq, v, h, prompt) for impl in ("ours", "naive", "liger")}
    _agree(steps)
    _time_rows(record, *_dpo_case(pairs, seq, v, h, prompt), steps, timer, threads)


@pytest.mark.parametrize("pairs,seq,v,h,prompt", DPO_CPU, ids=str)
def test_dpo_memory_cpu(pairs, seq, v, h, prompt, record):
    _memory_rows(record, *_dpo_case(pairs, seq, v, h, prompt), "build_dpo_step",
                 dict(pairs=pairs, seq=seq, v=v, h=h, prompt=prompt), ("ours", "naive", "liger"))


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("n,seq,v,h,prompt", KTO_CPU, ids=str)
def test_kto_time_cpu(n, seq, v, h, prompt, threads, timer, record):
    steps = {impl: build_kto_step(impl, n, seq, v, h, prompt) for impl in ("ours", "naive", "liger")}
    _agree(steps)
    _time_rows(record, *_kto_case(n, seq, v, h, prompt), steps, timer, threads)


@pytest.mark.parametrize("n,seq,v,h,prompt", KTO_CPU, ids=str)
def test_kto_memory_cpu(n, seq, v, h, prompt, record):
    _memory_rows(record, *_kto_case(n, seq, v, h, prompt), "build_kto_step",
                 dict(n=n, seq=seq, v=v, h=h, prompt=prompt), ("ours", "naive", "liger"))


# ---------------------------------------------------------------------------------------------
# modeled on the H100 roofline
# ---------------------------------------------------------------------------------------------

def _gpu_plan(kind: str, n: int, v: int) -> tuple[int, int]:
    """(units, tokens per unit) at GPU scale, and so the chunks our Triton face cuts the call into:
    SFT is token-local (units of one token); DPO pairs and KTO examples of GPU_SEQ-token sequences."""
    if kind == "sft":
        return n, 1
    per_unit = 2 * GPU_SEQ if kind == "dpo" else GPU_SEQ
    return n // per_unit, per_unit


def _chunks(kind: str, n: int, v: int) -> int:
    """How many chunks the Triton face's plan makes at this shape (peftkern.ops.logprob_units.plan_dense)."""
    from peftkern.ops.logprobs import default_chunk_size

    chunk = default_chunk_size(n, v, "triton")
    units, per_unit = _gpu_plan(kind, n, v)
    if kind == "sft":
        return -(-n // chunk)
    return -(-units // max(1, chunk // per_unit))


# Our kernels are counted at (tokens per chunk, V, H) corners with the same number of chunks as the
# target (so the launch sequence is the same) and extrapolated multilinearly: every count of a tiled
# kernel is affine in each size separately when the sizes are tile multiples.
CORNER_CHUNK_TOKENS, CORNER_V, CORNER_H = (64, 128), (128, 256), (64, 128)


def _ours_for_count(kind, chunks, chunk_tokens, v, h):
    """Our step with the Triton face on ``chunks`` chunks of ``chunk_tokens`` tokens, bf16, for the
    interpreter; the inputs are built here, outside what is counted."""
    import peftkern

    n = chunks * chunk_tokens
    if kind == "sft":
        inner = build_sft_step("ours", n, v, h, dtype="bfloat16", chunk_size=chunk_tokens)
    elif kind == "dpo":  # one pair per chunk: two sequences of chunk_tokens / 2
        inner = build_dpo_step("ours", chunks, chunk_tokens // 2, v, h, dtype="bfloat16", chunk_size=chunk_tokens)
    else:  # KTO: one example per chunk
        inner = build_kto_step("ours", chunks, chunk_tokens, v, h, dtype="bfloat16", chunk_size=chunk_tokens)

    def step():
        with peftkern.backend.use("triton"):
            inner()

    return step


@functools.lru_cache(maxsize=None)
def ours_corner_counts(kind: str, chunks: int) -> dict:
    return {corner: traffic.count_triton(_ours_for_count(kind, chunks, *corner))
            for corner in itertools.product(CORNER_CHUNK_TOKENS, CORNER_V, CORNER_H)}


def count_naive(kind, n, v, h) -> traffic.Count:
    """The naive step's aten ops counted on meta tensors at the real shape."""
    units, per_unit = _gpu_plan(kind, n, v)
    if kind == "sft":
        step = build_sft_step("naive", n, v, h, dtype="bfloat16", device="meta")
    elif kind == "dpo":
        step = build_dpo_step("naive", units, GPU_SEQ, v, h, dtype="bfloat16", device="meta")
    else:
        step = build_kto_step("naive", units, GPU_SEQ, v, h, dtype="bfloat16", device="meta")
    return traffic.count_eager(step)


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
@pytest.mark.parametrize("n", GPU_TOKENS)
@pytest.mark.parametrize("v", GPU_VOCABS)
def test_modeled_h100(kind, n, v, record):
    h = GPU_HIDDEN
    roofline = traffic.H100_SXM
    chunks = _chunks(kind, n, v)
    ours = traffic.extrapolate_grid(ours_corner_counts(kind, chunks), (n // chunks, v, h))
    naive = count_naive(kind, n, v, h)
    gb, us = 1e9, 1e6
    model = (f"{roofline.describe()}; ours: Triton kernels (+ launcher aten ops) counted under the interpreter on "
             f"{chunks} chunk(s) (as the Triton face cuts this shape) at (tokens per chunk, V, H) corners "
             f"{CORNER_CHUNK_TOKENS} x {CORNER_V} x {CORNER_H} and extrapolated multilinearly (exact for tile "
             f"multiples), distinct bytes per launch, raw masked requests in ours_upper_bound; naive: aten ops on "
             f"meta tensors at this shape (logits in bf16, loss in fp32)")
    what = {"sft": "SFT CE", "dpo": f"DPO sigmoid (policy fwd+bwd, reference fwd), pairs of {GPU_SEQ}-token sequences",
            "kto": f"KTO (policy fwd+bwd, reference fwd), {GPU_SEQ}-token examples"}[kind]
    case = f"{what} tokens={n} V={v} H={h}"
    common = dict(kind="modeled-h100", case=case, shape={"tokens": n, "V": v, "H": h, "chunks": chunks},
                  dtype="bfloat16", model=model, launches={"ours": len(ours.launches), "naive": len(naive.launches)},
                  peer_name=PEERS["naive"])
    record(**common, metric="bytes moved", unit="GB", ours=ours.bytes / gb, peer=naive.bytes / gb,
           ours_upper_bound=ours.raw_bytes / gb, note="modeled")
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=naive.time(roofline) * us,
           target="<= 0.80", ours_upper_bound=ours.time(roofline, raw=True) * us,
           flops_ours=ours.flops, flops_naive=naive.flops, note="modeled")


# ---------------------------------------------------------------------------------------------
# static: the compiled kernels
# ---------------------------------------------------------------------------------------------

def test_static_kernels(record):
    # a config that fails to compile or spills is a finding, reported in its row (ok=False)
    reports = static.kernel_reports("peftkern.ops.logprobs", archs=pick(("sm_80", "sm_90"), ("sm_80",)), limit=pick(None, 1))
    static.record_reports(record, reports)
    assert reports
