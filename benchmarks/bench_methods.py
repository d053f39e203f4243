"""PEFT methods side by side on one model: LoRA, DoRA, (IA)^3, AdaLoRA and BitFit, peftkern against
peft's implementation of each (BitFit, which peft lacks: the model with only its biases trainable).

* measured-cpu: one training step (forward with labels, loss, backward; AdaLoRA's loss carries its
  orthogonality regularizer in both) on a small Qwen2-style model (attention biases, so BitFit has
  something to train), fp32, interleaved medians; peak live tensor bytes of the step; trainable
  parameters; inference forward time with the adapter, and after merge_and_unload, over the base model.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from benchmarks import memory
from benchmarks.harness import interleaved, median, pick, spread

METHODS = ("lora", "dora", "ia3", "adalora", "bitfit")
PEER_NAMES = {"lora": "peft LoRA", "dora": "peft DoRA", "ia3": "peft IA3", "adalora": "peft AdaLoRA",
              "bitfit": "torch: biases unfrozen"}
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=2048)
MID = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=4, vocab_size=32000)  # BENCHMARKS.md's mid-size row: a real vocabulary
QUICK = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96)
SIZES = pick(full={"tiny": TINY, "mid": MID}, quick={"tiny": QUICK})
MODEL = pick(TINY, QUICK)  # the default size of the builders (the memory subprocess calls them by name)
BATCH, SEQ = pick((4, 128), (2, 8))
ROUNDS = pick(9, 2)
CPU_THREADS = pick((1, os.cpu_count() or 1), (1,))  # one thread, and the machine's default
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


def base_model(seed=0, size=None):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.Qwen2Config(**(size or MODEL), max_position_embeddings=SEQ)
    return tf.Qwen2ForCausalLM(config).float()


def _configs(package):
    """The same settings for both packages (peft's and peftkern's classes share the field names)."""
    return {
        "lora": package.LoraConfig(**LORA, task_type="CAUSAL_LM"),
        "dora": package.LoraConfig(**LORA, use_dora=True, task_type="CAUSAL_LM"),
        "ia3": package.IA3Config(task_type="CAUSAL_LM"),
        "adalora": package.AdaLoraConfig(init_r=16, target_r=8, lora_alpha=32, target_modules="all-linear",
                                         total_step=100, tinit=10, tfinal=10, task_type="CAUSAL_LM"),
    }


def build_model(method: str, impl: str, seed: int = 0, size=None):
    model = base_model(seed, size)
    if impl == "base":
        return model
    if method == "bitfit":
        if impl == "ours":
            import peftkern

            return peftkern.get_peft_model(model, peftkern.BitFitConfig(task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
        return model
    if impl == "ours":
        import peftkern

        return peftkern.get_peft_model(model, _configs(peftkern)[method])
    import peft

    return peft.get_peft_model(model, _configs(peft)[method])


def build_step(method: str, impl: str, seed: int = 0, size=None):
    """One training step of ``method`` in ``impl`` ("ours" | "peer") on a model of ``size`` (a config
    dict; default MODEL): the memory builder too."""
    size = size or MODEL
    model = build_model(method, impl, seed, size).train()
    with torch.no_grad():  # the adapters live: B, E and the vectors away from their identity start
        gen = torch.Generator().manual_seed(seed + 7)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, size["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            for p in params:
                p.grad = None

    step.model, step.ids = model, ids
    return step


def _forward(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids)
    return run


def _case(method: str, size: dict, threads: int) -> str:
    return (f"{method}: train step, Qwen2 {size['num_hidden_layers']}x{size['hidden_size']} vocab {size['vocab_size']}, "
            f"{BATCH}x{SEQ} tokens, {threads} thread(s)")


@pytest.mark.parametrize("threads", CPU_THREADS, ids=lambda t: f"{t}thread")
@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("method", METHODS)
def test_method_cpu(method, size_name, threads, timer, record):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _measure(method, SIZES[size_name], threads, timer, record)
    finally:
        torch.set_num_threads(before)


def _measure(method, size, threads, timer, record):
    rounds = ROUNDS
    steps = {"ours": build_step(method, "ours", size=size), "peer": build_step(method, "peer", size=size)}
    ours_params = sum(p.numel() for p in steps["ours"].model.parameters() if p.requires_grad)
    peer_params = sum(p.numel() for p in steps["peer"].model.parameters() if p.requires_grad)
    medians = timer(steps, rounds=rounds)
    ms = {name: 1e3 * s for name, s in medians.items()}
    noise = ", ".join(f"{name} IQR/median {spread(s):.0%}" for name, s in timer.samples.items())
    common = dict(kind="measured-cpu", case=_case(method, size, threads),
                  shape={"batch": BATCH, "seq": SEQ, "threads": threads, **size}, dtype="float32")
    record(**common, metric="step time", unit="ms", ours=ms["ours"], peer=ms["peer"], peer_name=PEER_NAMES[method],
           note=f"torch faces; {rounds} interleaved rounds; {noise}")
    record(**common, metric="trainable parameters", unit="params", ours=ours_params, peer=peer_params,
           peer_name=PEER_NAMES[method], total=sum(p.numel() for p in steps["ours"].model.parameters()))
    live = memory.warm_live_peaks_mib(steps)
    record(**common, metric="peak live tensor bytes", unit="MiB", ours=live["ours"], peer=live["peer"],
           peer_name=PEER_NAMES[method], note="TorchDispatchMode tracker, one step after a warm-up step")

    base = base_model(size=size).eval()
    ours = steps["ours"].model.eval()
    merged = copy.deepcopy(ours).merge_and_unload()
    ids = steps["ours"].ids
    samples = interleaved({"adapted": _forward(ours, ids), "merged": _forward(merged, ids),
                           "base": _forward(base, ids)}, rounds=rounds)  # (pytest-benchmark times one call per test)
    fwd = {name: median(s) for name, s in samples.items()}
    record(**common, metric="inference forward, adapter unmerged", unit="ms", ours=1e3 * fwd["adapted"],
           peer=1e3 * fwd["base"], peer_name="base model")
    record(**common, metric="inference forward, after merge_and_unload", unit="ms", ours=1e3 * fwd["merged"],
           peer=1e3 * fwd["base"], peer_name="base model")
