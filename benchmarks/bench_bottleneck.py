"""Bottleneck adapters, forward + backward: peftkern's fused op against the unfused torch form
(``h + nn.Sequential(Linear, ReLU, Linear)(h)``, the way adapters are usually written).

* measured-cpu: a training step of a small Llama (4 blocks, hidden 256, Houlsby adapters, reduction
  factor 16) with peftkern's BottleneckLayer (torch face) against the same model with the adapters
  as nn.Sequential modules in forward hooks, fp32, interleaved medians (1 thread and the machine's default).
* modeled-h100: bytes and roofline time of the adapter alone (what it adds to a base model step),
  our Triton kernels counted under the interpreter vs the unfused aten sequence on meta tensors,
  bf16, h and the adapter's weights needing gradients (target: fused bytes <= 0.5x unfused).
* static: registers, spills, shared memory of every bottleneck kernel config on sm_80 and sm_90.
"""
from __future__ import annotations

import functools
import itertools
import os

import pytest
import torch
from torch import nn

from benchmarks import static, traffic
from benchmarks.harness import pick, spread

CPU_MODELS = pick(full=[(4, 256, 8, 128)], quick=[(2, 32, 2, 16)])  # (blocks, hidden, batch, sequence)
CPU_ROUNDS = pick(15, 3)
CPU_THREADS = pick((1, os.cpu_count() or 1), (1,))  # one thread, and the machine's default
GPU_SHAPES = pick(full=[(m, h, r) for m in (4096, 16384) for (h, r) in ((4096, 64), (4096, 256), (8192, 256))],
                  quick=[(512, 384, 16)])
CORNERS = (128, 256)
MODELED_DTYPE = torch.bfloat16


class _Unfused(nn.Module):
    """h + Sequential(Linear(hidden, bottleneck), ReLU, Linear(bottleneck, hidden))(h)."""

    def __init__(self, hidden, bottleneck, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(hidden, bottleneck, dtype=dtype, device=device), nn.ReLU(),
                                 nn.Linear(bottleneck, hidden, dtype=dtype, device=device))

    def forward(self, h):
        return h + self.seq(h)


def _llama(blocks, hidden):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                            num_hidden_layers=blocks, num_attention_heads=max(1, hidden // 64),
                            max_position_embeddings=512)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).float()


def _paired_steps(blocks, hidden, batch, seq):
    """Both contenders on one base: ours, and the same adapter weights as nn.Sequential hooks."""
    from peftkern.tuners import BottleneckConfig, get_peft_model
    from peftkern.tuners.bottleneck import BottleneckLayer

    ours = get_peft_model(_llama(blocks, hidden), BottleneckConfig(placement="houlsby", reduction_factor=16))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    unfused = _llama(blocks, hidden)
    for p in unfused.parameters():
        p.requires_grad_(False)
    for name, layer in ours.model.named_modules():
        if not isinstance(layer, BottleneckLayer):
            continue
        module = _Unfused(hidden, layer.adapter_down["default"].out_features)
        with torch.no_grad():
            module.seq[0].load_state_dict(layer.adapter_down["default"].state_dict())
            module.seq[2].load_state_dict(layer.adapter_up["default"].state_dict())
        target = unfused.get_submodule(name)
        target.add_module("unfused_adapter", module)
        target.register_forward_hook(lambda m, args, out: (m.unfused_adapter(out[0]),) + tuple(out[1:])
                                     if isinstance(out, tuple) else m.unfused_adapter(out))
    ids = torch.randint(0, 512, (batch, seq), generator=gen)
    steps = {}
    for impl, model in (("ours", ours), ("unfused", unfused)):
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, params=params):
            try:
                model(input_ids=ids, labels=ids).loss.backward()
            finally:
                for p in params:
                    p.grad = None

        step.model = model
        steps[impl] = step
    return steps, ids


@pytest.mark.parametrize("threads", CPU_THREADS, ids=lambda t: f"{t}thread")
@pytest.mark.parametrize("blocks,hidden,batch,seq", CPU_MODELS, ids=lambda v: str(v))
def test_model_step_cpu(blocks, hidden, batch, seq, threads, timer, record):
    steps, ids = _paired_steps(blocks, hidden, batch, seq)
    with torch.no_grad():
        torch.testing.assert_close(steps["ours"].model(input_ids=ids).logits,
                                   steps["unfused"].model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        medians = timer(steps, rounds=CPU_ROUNDS)
    finally:
        torch.set_num_threads(before)
    ms = {name: 1e3 * s for name, s in medians.items()}
    note = (f"torch face; {threads} thread(s); {len(timer.samples['ours'])} interleaved rounds; "
            + ", ".join(f"{name} IQR/median {spread(s):.0%}" for name, s in timer.samples.items()))
    record(kind="measured-cpu", case=f"Llama step blocks={blocks} hidden={hidden} batch={batch} seq={seq} houlsby "
           f"r=16 threads={threads}", shape={"blocks": blocks, "hidden": hidden, "batch": batch, "seq": seq},
           dtype="float32",
           unit="ms", metric="train step time", ours=ms["ours"], peer=ms["unfused"],
           peer_name="nn.Sequential adapters (hooks)", note=note)


def _ours_step_for_count(m, h, r):
    dt = MODELED_DTYPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, h, generator=gen).to(dt).requires_grad_(True)
    weights = [(0.05 * torch.randn(*shape, generator=gen)).to(dt).requires_grad_(True)
               for shape in ((r, h), (r,), (h, r), (h,))]
    dy = torch.randn(m, h, generator=gen).to(dt)

    def step():
        import peftkern
        from peftkern.ops.bottleneck import bottleneck_adapter

        with peftkern.backend.use("triton"):
            bottleneck_adapter(x, *weights, 1.0, "relu").backward(dy)

    return step


@functools.lru_cache(maxsize=None)
def ours_corner_counts(r: int) -> dict:
    return {corner: traffic.count_triton(_ours_step_for_count(*corner, r))
            for corner in itertools.product(CORNERS, repeat=2)}


def count_unfused_step(m, h, r) -> traffic.Count:
    module = _Unfused(h, r, MODELED_DTYPE, device="meta")
    x = torch.empty(m, h, dtype=MODELED_DTYPE, device="meta").requires_grad_(True)
    dy = torch.empty(m, h, dtype=MODELED_DTYPE, device="meta")
    return traffic.count_eager(lambda: module(x).backward(dy))


@pytest.mark.parametrize("m,h,r", GPU_SHAPES, ids=lambda v: str(v))
def test_modeled_h100(m, h, r, record):
    if not traffic.interpreting():
        pytest.skip("our kernels are counted under Triton's interpreter (TRITON_INTERPRET=1, a CPU-only run)")
    roofline = traffic.H100_SXM
    ours = traffic.extrapolate_grid(ours_corner_counts(r), (m, h))
    unfused = count_unfused_step(m, h, r)
    model = (f"{roofline.describe()}; ours: Triton kernels counted under the interpreter at M,H in "
             f"{{{CORNERS[0]},{CORNERS[1]}}} (bottleneck {r}) and extrapolated multilinearly; unfused: aten ops of "
             f"h + Sequential(Linear, ReLU, Linear)(h) counted on meta tensors at this shape; bf16, h and the four "
             f"adapter tensors need gradients; distinct bytes per launch (re-reads of a row block hit L2)")
    us, gb = 1e6, 1e9
    common = dict(kind="modeled-h100", case=f"fwd+bwd M={m} H={h} R={r}", shape={"M": m, "H": h, "R": r},
                  dtype="bfloat16", model=model,
                  launches={"ours": len(ours.launches), "unfused": len(unfused.launches)})
    record(**common, metric="adapter bytes (beyond the base model step)", unit="GB", ours=ours.bytes / gb,
           peer=unfused.bytes / gb, peer_name="unfused torch", target="<= 0.5", ours_raw=ours.raw_bytes / gb,
           note="modeled; raw (no L2 reuse) in ours_raw")
    record(**common, metric="adapter step time", unit="us", ours=ours.time(roofline) * us,
           peer=unfused.time(roofline) * us, peer_name="unfused torch", note="modeled")


def test_static_kernels(record):
    reports = static.kernel_reports("peftkern.ops.bottleneck", archs=pick(("sm_80", "sm_90"), ("sm_80",)),
                                    limit=pick(None, 1))
    static.record_reports(record, reports)
    assert reports
