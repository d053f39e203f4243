"""Soft prompts side by side with peft's implementation of each: prompt tuning, prefix tuning and
P-tuning (MLP encoder), 20 virtual tokens.

* measured-cpu: one training step (forward with labels, loss, backward) through the adapted
  model's own forward, fp32, interleaved medians, at 1 torch thread and at 2 (this machine's
  default; the mid-size model at 1 only); peak live tensor bytes of the step (TorchDispatchMode tracker); trainable parameters.
  Models: the embedded default (the tiny Llama, ``--model tiny``'s shape) and a mid-size Llama
  (hidden 512, 6 layers, vocab 32000; 8 x 256 tokens), the same weights and tokens for both.
"""
from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import memory
from benchmarks.harness import pick, spread

METHODS = ("prompt", "prefix", "ptuning")
PEER_NAMES = {"prompt": "peft PROMPT_TUNING", "prefix": "peft PREFIX_TUNING", "ptuning": "peft P_TUNING"}
VIRTUAL = pick(20, 4)
MODELS = pick(
    full={"embedded": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=263, batch=16, seq=128),
          "mid": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000, batch=8, seq=256)},
    quick={"embedded": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, batch=2, seq=8)})
ROUNDS = pick(4, 2)
# (model, torch threads): the mid-size model at 1 thread only (a step takes ~10 s on the shared 2-core machine)
CASES = pick([("embedded", 1), ("embedded", 2), ("mid", 1)], [("embedded", 1)])


def base_model(name: str, seed: int = 0):
    import transformers as tf

    sizes = {k: v for k, v in MODELS[name].items() if k not in ("batch", "seq")}
    torch.manual_seed(seed)
    config = tf.LlamaConfig(**sizes, max_position_embeddings=MODELS[name]["seq"] + VIRTUAL, rms_norm_eps=1e-5,
                            tie_word_embeddings=False, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(config).float()


def _config(package, method: str):
    kw = dict(num_virtual_tokens=VIRTUAL, task_type="CAUSAL_LM")
    return {"prompt": package.PromptTuningConfig, "prefix": package.PrefixTuningConfig,
            "ptuning": package.PromptEncoderConfig}[method](**kw)


def build_model(method: str, impl: str, model: str = "embedded", seed: int = 0):
    base = base_model(model, seed)
    if impl == "ours":
        import peftkern

        return peftkern.get_peft_model(base, _config(peftkern, method))
    import peft

    return peft.get_peft_model(base, _config(peft, method))


def build_step(method: str, impl: str, model: str = "embedded", seed: int = 0, encoder_state=None):
    """One training step of ``method`` in ``impl`` ("ours" | "peer"); both get the same encoder weights."""
    adapted = build_model(method, impl, model, seed).train()
    encoder = adapted.model.prompt_encoder["default"] if impl == "ours" else adapted.prompt_encoder["default"]
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    sizes = MODELS[model]
    ids = torch.randint(0, sizes["vocab_size"], (sizes["batch"], sizes["seq"]),
                        generator=torch.Generator().manual_seed(seed + 1))
    params = [p for p in adapted.parameters() if p.requires_grad]

    def step():
        try:
            adapted(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        finally:
            for p in params:
                p.grad = None

    step.model, step.encoder = adapted, encoder
    return step


def _case(method: str, model: str, threads: int) -> str:
    s = MODELS[model]
    return (f"{method}: train step, {VIRTUAL} virtual tokens, {model} Llama {s['num_hidden_layers']}x"
            f"{s['hidden_size']} vocab {s['vocab_size']}, {s['batch']}x{s['seq']} tokens, {threads} thread(s)")


@pytest.mark.parametrize(("model", "threads"), CASES)
@pytest.mark.parametrize("method", METHODS)
def test_soft_prompt_cpu(method, model, threads, timer, record):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peer = build_step(method, "peer", model)
        ours = build_step(method, "ours", model, encoder_state=copy.deepcopy(peer.encoder.state_dict()))
        steps = {"ours": ours, "peer": peer}
        medians = timer(steps, rounds=ROUNDS)
        noise = ", ".join(f"{name} IQR/median {spread(s):.0%}" for name, s in timer.samples.items())
        sizes = MODELS[model]
        common = dict(kind="measured-cpu", case=_case(method, model, threads), dtype="float32",
                      shape={**sizes, "virtual_tokens": VIRTUAL, "threads": threads})
        record(**common, metric="step time", unit="ms", ours=1e3 * medians["ours"], peer=1e3 * medians["peer"],
               peer_name=PEER_NAMES[method], note=f"{ROUNDS} interleaved rounds; {noise}")
        if threads != 1:
            return
        counts = {name: sum(p.numel() for p in s.model.parameters() if p.requires_grad) for name, s in steps.items()}
        record(**common, metric="trainable parameters", unit="params", ours=counts["ours"], peer=counts["peer"],
               peer_name=PEER_NAMES[method], total=sum(p.numel() for p in ours.model.parameters()))
        live = memory.warm_live_peaks_mib(steps)
        record(**common, metric="peak live tensor bytes", unit="MiB", ours=live["ours"], peer=live["peer"],
               peer_name=PEER_NAMES[method], note="TorchDispatchMode tracker, one step after a warm-up step")
    finally:
        torch.set_num_threads(before)
