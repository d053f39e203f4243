"""NF4 (4-bit NormalFloat with double quant) and QLoRA.

* measured-cpu: quantize, dequantize and the 4-bit matmul, ours (the torch face) against
  bitsandbytes' CPU backend (and torchao's ``NF4Tensor`` when installed), interleaved, fp32, the CPU
  shapes; memory of a QLoRA model (NF4 base + LoRA) against the same model with a bf16 base.
* modeled-h100: the fused dequant-GEMM (4-bit tiles dequantized in registers) against dequantize
  (our Triton dequant kernel writing a bf16 W) then a cuBLAS-style GEMM, bytes and time; the QLoRA
  step (fused NF4 + LoRA forward and backward) against our bf16-base LoRA step (target <= 1.05x).
* static: registers, spills, shared memory of every NF4 kernel config on sm_80 and sm_90.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools

import pytest
import torch
from torch import nn

from benchmarks import memory, static, traffic
from benchmarks.harness import pick

BLOCKSIZE = 64
RANK_ALPHA = 2.0
CPU_SHAPES = pick(full=[(2048, 1024, 1024), (2048, 1024, 2816)], quick=[(64, 128, 192)])
CPU_ROUNDS = pick(15, 3)
GPU_SHAPES = pick(full=[(m, k, n) for m in (4096, 16384) for (k, n) in ((4096, 4096), (4096, 14336), (14336, 4096))],
                  quick=[(512, 384, 640)])
RANKS = pick((16, 64), (16,))
CORNERS = (128, 256)
DTYPE = torch.bfloat16


def _shape(m, k, n, r=None) -> dict:
    return {"M": m, "K": k, "N": n, **({"r": r} if r else {})}


def _weight(k, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)


# ---------------------------------------------------------------------------------------------
# measured on the CPU
# ---------------------------------------------------------------------------------------------

def _have_torchao() -> bool:
    return importlib.util.find_spec("torchao") is not None


@pytest.mark.parametrize("what", ["quantize", "dequantize", "4-bit matmul"])
@pytest.mark.parametrize("m,k,n", CPU_SHAPES, ids=lambda v: str(v))
def test_time_cpu(m, k, n, what, timer, record):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    from peftkern import backend
    from peftkern.ops.nf4 import nf4_linear
    from peftkern.quant import quantize_nf4

    w = _weight(k, n)
    x = torch.randn(m, k)
    w4 = quantize_nf4(w, BLOCKSIZE, True)
    packed, state = bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, w4.packed)
    cases = {
        "quantize": ({"ours": lambda: quantize_nf4(w, BLOCKSIZE, True),
                      "bitsandbytes": lambda: bnb_f.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                                                  compress_statistics=True)}, (k, n)),
        "dequantize": ({"ours": lambda: w4.dequantize(torch.float32),
                        "bitsandbytes": lambda: bnb_f.dequantize_4bit(packed, state)}, (k, n)),
        "4-bit matmul": ({"ours": lambda: nf4_linear(x, w4),
                          "bitsandbytes": lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)}, (m, k, n)),
    }
    if _have_torchao():
        from torchao.dtypes.nf4tensor import to_nf4

        ao = to_nf4(w, BLOCKSIZE, 256)
        cases["quantize"][0]["torchao"] = lambda: to_nf4(w, BLOCKSIZE, 256)
        cases["dequantize"][0]["torchao"] = lambda: ao.get_original_weight()
        cases["4-bit matmul"][0]["torchao"] = lambda: nn.functional.linear(x, ao)
    contenders = cases[what][0]
    with torch.no_grad(), backend.use("torch"):
        medians = timer(contenders, rounds=CPU_ROUNDS)
    case = f"{what} K={k} N={n}" + (f" M={m}" if what == "4-bit matmul" else "")
    for peer in contenders:
        if peer == "ours":
            continue
        record(kind="measured-cpu", case=case, shape=_shape(m, k, n), dtype="float32",
               metric=f"{what} time", unit="ms", ours=1e3 * medians["ours"], peer=1e3 * medians[peer],
               peer_name=f"{peer} (CPU)", note=f"blocksize {BLOCKSIZE}, double quant; torch face; "
               f"{CPU_ROUNDS} interleaved rounds" + ("" if _have_torchao() else "; torchao not installed"))


def build_qlora_step(quantized: bool, hidden: int = 512, layers: int = 4, r: int = 16, seed: int = 0):
    """One training step of a small Llama (``hidden``, ``layers``) with LoRA on every projection, its
    base NF4 (``quantized``) or bf16; the builder the fresh memory subprocess calls."""
    import transformers

    from peftkern.nn.nf4 import quantize_model
    from peftkern.tuners import LoraConfig, get_peft_model

    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(DTYPE)
    if quantized:
        quantize_model(model, BLOCKSIZE, True, compute_dtype=DTYPE)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=RANK_ALPHA * r, target_modules="all-linear"))
    ids = torch.randint(0, 1024, (2, 128))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    step.model = model
    return step


def _state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def test_memory_qlora_model(record):
    hidden, layers = pick((512, 4), (128, 2))
    mib = 2.0 ** 20
    steps = {q: build_qlora_step(q, hidden, layers) for q in (True, False)}
    state = {q: _state_bytes(s.model) for q, s in steps.items()}
    linear_params = sum(m.in_features * m.out_features for n, m in steps[False].model.named_modules()
                        if isinstance(m, nn.Linear) and "lora_" not in n and not n.endswith("lm_head"))
    common = dict(kind="measured-cpu", case=f"tiny Llama hidden={hidden} layers={layers}, LoRA r=16 all-linear",
                  shape={"hidden": hidden, "layers": layers}, dtype="bfloat16", unit="MiB",
                  peer_name="same model, bf16 base")
    record(**common, metric="weights + buffers", ours=state[True] / mib, peer=state[False] / mib,
           note=f"{linear_params / 1e6:.1f}M quantized params; embeddings and head stay bf16 in both")
    for q in steps.values():
        q()
    live = {q: memory.live_peak(s) for q, s in steps.items()}
    record(**common, metric="peak live tensor bytes of a training step", ours=live[True] / mib, peer=live[False] / mib,
           note="TorchDispatchMode tracker; batch 2 x 128 tokens")
    rss = {q: memory.peak_rss("benchmarks.bench_nf4:build_qlora_step", dict(quantized=q, hidden=hidden, layers=layers),
                              preload=("transformers",)) for q in (True, False)}
    record(**common, metric="peak RSS extra (fresh process)", ours=rss[True]["extra_bytes"] / mib,
           peer=rss[False]["extra_bytes"] / mib, note=f"{rss[True]['method']}")


# ---------------------------------------------------------------------------------------------
# modeled on the H100 roofline
# ---------------------------------------------------------------------------------------------

def _w4(k, n, seed=0):
    from peftkern.quant import quantize_nf4

    return quantize_nf4(_weight(k, n, DTYPE, seed), BLOCKSIZE, True)


def _fused_fwd(m, k, n):
    from peftkern import backend
    from peftkern.ops.nf4 import nf4_linear

    w4 = _w4(k, n)
    x = torch.randn(m, k).to(DTYPE)

    def run():
        with backend.use("triton"):
            nf4_linear(x, w4)

    return run


def _dequant(m, k, n):
    from peftkern import backend

    w4 = _w4(k, n)

    def run():
        with backend.use("triton"):
            w4.dequantize(DTYPE)

    return run


def _qlora_step(m, k, n, r):
    from peftkern import backend
    from peftkern.ops.nf4 import nf4_linear

    gen = torch.Generator().manual_seed(1)
    w4 = _w4(k, n)
    x = torch.randn(m, k, generator=gen).to(DTYPE).requires_grad_(True)
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(DTYPE).requires_grad_(True)
    b = (torch.randn(n, r, generator=gen) * 0.1).to(DTYPE).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(DTYPE)

    def run():
        with backend.use("triton"):
            nf4_linear(x, w4, None, a, b, RANK_ALPHA, 0.0, True).backward(dy)

    return run


@functools.lru_cache(maxsize=None)
def _corner_counts(kind: str, r: int = 0) -> dict:
    build = {"fused": _fused_fwd, "dequant": _dequant}.get(kind)
    out = {}
    for corner in itertools.product(CORNERS, repeat=3):
        fn = _qlora_step(*corner, r) if kind == "qlora" else build(*corner)
        out[corner] = traffic.count_triton(fn)
    return out


def _count(kind, m, k, n, r=0) -> traffic.Count:
    return traffic.extrapolate_grid(_corner_counts(kind, r), (m, k, n))


def _gemm_count(m, k, n) -> traffic.Count:
    x = torch.empty(m, k, dtype=DTYPE, device="meta")
    w = torch.empty(n, k, dtype=DTYPE, device="meta")
    return traffic.count_eager(lambda: x @ w.t())


def _model_note(what: str) -> str:
    return (f"{traffic.H100_SXM.describe()}; {what}; Triton kernels counted under the interpreter at M,K,N in "
            f"{{{CORNERS[0]},{CORNERS[1]}}} and extrapolated multilinearly (distinct bytes per launch); "
            f"NF4 blocksize {BLOCKSIZE} with double quant, bf16; modeled")


@pytest.mark.parametrize("m,k,n", GPU_SHAPES, ids=lambda v: str(v))
def test_modeled_dequant_gemm(m, k, n, record):
    roofline = traffic.H100_SXM
    fused = _count("fused", m, k, n)
    split = traffic.Count(_count("dequant", m, k, n).launches + _gemm_count(m, k, n).launches)
    act_bytes = 2 * (m * k + m * n)  # x read and y written, bf16, in both
    gb, us = 1e9, 1e6
    common = dict(kind="modeled-h100", case=f"forward M={m} K={k} N={n}", shape=_shape(m, k, n), dtype="bfloat16",
                  model=_model_note("ours: one fused dequant-GEMM launch; peer: our Triton dequant to bf16 W, then "
                                    "the GEMM as an aten mm"), note="modeled",
                  peer_name="dequantize, then GEMM")
    record(**common, metric="time", unit="us", ours=fused.time(roofline) * us, peer=split.time(roofline) * us,
           ours_upper_bound=fused.time(roofline, raw=True) * us)
    record(**common, metric="bytes moved", unit="GB", ours=fused.bytes / gb, peer=split.bytes / gb,
           ours_upper_bound=fused.raw_bytes / gb)
    record(**common | {"peer_name": "bf16 weight read by a GEMM (2 B/param)"}, metric="weight bytes",
           unit="GB", ours=(fused.bytes - act_bytes) / gb, peer=2 * k * n / gb, target="<= 0.30",
           dequant_then_gemm_weight_bytes=(split.bytes - act_bytes) / gb)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,k,n", GPU_SHAPES, ids=lambda v: str(v))
def test_modeled_qlora_step(m, k, n, r, record):
    from benchmarks import bench_lora

    roofline = traffic.H100_SXM
    ours = _count("qlora", m, k, n, r)
    lora = bench_lora.count_ours(m, k, n, r, 0.0)
    us, gb = 1e6, 1e9
    common = dict(kind="modeled-h100", case=f"QLoRA fwd+bwd M={m} K={k} N={n} r={r}", shape=_shape(m, k, n, r),
                  dtype="bfloat16", model=_model_note("ours: NF4 fused QLoRA op fwd+bwd; peer: our fused LoRA op "
                                                      "on a bf16 base, counted alike"),
                  note="modeled", peer_name="peftkern LoRA step, bf16 base",
                  launches={"ours": len(ours.launches), "peer": len(lora.launches)})
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=lora.time(roofline) * us,
           target="<= 1.05", ours_upper_bound=ours.time(roofline, raw=True) * us)
    record(**common, metric="bytes moved", unit="GB", ours=ours.bytes / gb, peer=lora.bytes / gb)


# ---------------------------------------------------------------------------------------------
# static: the compiled kernels
# ---------------------------------------------------------------------------------------------

def test_static_kernels(record):
    # a config that fails to compile or spills is a finding, reported in its row (ok=False)
    reports = static.kernel_reports("peftkern.ops.nf4", archs=("sm_80", "sm_90"), limit=pick(None, 1))
    static.record_reports(record, reports)
    assert reports
