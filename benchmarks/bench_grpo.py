"""GRPO: one loss step from hidden states, and one trainer step end to end.

* measured-cpu, loss step: forward + backward of the GRPO loss (dapo, token-level ratio, beta 0.04,
  old and reference log-probs given as the rollout holds them) on G = 8 completions of 4 prompts, 256
  completion tokens each, hidden 512, vocab 32000, fp32: ours (``fused_grpo_loss``: gradients formed
  in the forward pass) against the naive path (full logits, log-softmax, TRL's loss code's formula
  through ``grpo_loss``) and Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (compiled=False, its default
  chunk of one completion). Time at 1 and 2 torch threads (interleaved medians); peak RSS in a fresh
  process and peak live tensor bytes.
* modeled-h100, loss step: vocab 128256, 16 prompts x 8 completions x 1024 tokens, hidden 4096,
  bf16; our Triton kernels counted under the interpreter, the naive aten sequence on meta tensors.
* measured-cpu, end to end: one optimizer step of ``peftkern grpo`` against TRL 1.16's GRPOTrainer
  + PEFT (LoRA r 16 on every linear) on the same model, prompts and reward, each step sampling G = 8
  completions of 4 prompts and training on them (dapo, beta 0, one iteration, temperature 1, fp32
  on both sides: TRL's bf16 default off; TRL's default gradient checkpointing on, as a user gets it):
  the embedded tiny Llama with the bundled exact-answer reward (16 tokens at most), and a mid-size
  Llama (hidden 512, 4 layers, vocab 32000, 128 tokens, a 24-word prompt) with a reward on the
  completion ids. Time (interleaved medians, 1 and 2 threads) and peak RSS (fresh process).
"""
from __future__ import annotations

import functools
import itertools
import os
import tempfile

import pytest
import torch

from benchmarks import memory, traffic
from benchmarks.harness import pick, spread

# (prompts, G, completion tokens, vocab, hidden)
LOSS_CPU = pick(full=[(4, 8, 256, 32000, 512)], quick=[(2, 2, 16, 500, 32)], shared=[(1, 8, 256, 32000, 512)])
THREADS = pick((1, 2), (1,))
ROUNDS = pick(5, 2)
BETA, LOSS_TYPE = 0.04, "dapo"
PEERS = {"naive": "naive torch (full logits) + TRL's formula", "liger": "Liger LigerFusedLinearGRPOLoss (torch)"}
TIME_TARGETS = {"naive": "<= 0.85", "liger": "< 1"}
MEMORY_TARGETS = {"naive": "<= 0.10", "liger": "< 1"}

GPU = pick(full=dict(prompts=16, g=8, seq=1024, v=128256, h=4096), quick=dict(prompts=2, g=2, seq=64, v=1024, h=256))
# one trainer step end to end: (prompts, G, completion tokens, model); "demo" = the embedded tiny Llama
# (byte vocab: overheads dominate), "mid" = a Llama of hidden 512, 4 layers, vocab 32000 (the [B, T, V]
# logits count), over a word-level tokenizer of 32000 ids
E2E_CASES = pick(full=[dict(prompts=4, g=8, completion=16, size="demo"), dict(prompts=4, g=8, completion=128, size="mid")],
                 quick=[dict(prompts=2, g=2, completion=4, size="micro")])
E2E_THREADS = pick((1, 2), (1,))
E2E_ROUNDS = pick(3, 2)
MID = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=512)
MID_PROMPT_WORDS = 24


def _batch(prompts, g, seq, v, h, dtype, device, seed=0, ragged=True):
    """Hidden states, head, targets (completions of random lengths from seq / 2 to seq with
    ``ragged``; every token scored without: the modeled count must be affine in the sizes), old and
    reference log-probs, advantages."""
    gen = torch.Generator().manual_seed(seed)
    b = prompts * g
    hidden = torch.randn(b, seq, h, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    targets = torch.randint(0, v, (b, seq), generator=gen).to(device)
    lengths = torch.randint(seq // 2, seq + 1, (b,), generator=gen).to(device) if ragged else \
        torch.full((b,), seq, device=device)
    mask = torch.arange(seq, device=device)[None, :] < lengths[:, None]
    targets = targets.masked_fill(~mask, -100)
    # old and reference log-probs near the policy's (about -log V), advantages of a few groups
    base = -torch.log(torch.tensor(float(v)))
    old = (base + 0.1 * torch.randn(b, seq, generator=gen)).to(device) * mask
    ref = (base + 0.1 * torch.randn(b, seq, generator=gen)).to(device) * mask
    adv = torch.randn(b, generator=gen).to(device)
    return hidden, weight, targets, mask, old, ref, adv


def build_loss_step(impl: str, prompts: int, g: int, seq: int, v: int, h: int, dtype: str = "float32",
                    device: str = "cpu", chunk_size: int | None = None, ragged: bool = True):
    """One GRPO loss step of ``impl`` (forward, backward to hidden and weight)."""
    hidden, weight, targets, mask, old, ref, adv = _batch(prompts, g, seq, v, h, getattr(torch, dtype), device,
                                                          ragged=ragged)
    if impl == "ours":
        from peftkern.losses import fused_grpo_loss

        def loss_fn():
            return fused_grpo_loss(hidden, weight, targets, adv, old, ref, loss_type=LOSS_TYPE, beta=BETA,
                                   chunk_size=chunk_size).loss
    elif impl == "naive":
        from peftkern.losses import grpo_loss

        def loss_fn():
            logits = (hidden @ weight.t()).float()
            token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            return grpo_loss(token * mask, old, ref, adv, mask, loss_type=LOSS_TYPE, beta=BETA).loss
    elif impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, use_ref_model=True, loss_type=LOSS_TYPE)
        safe = targets.clamp(min=0)

        def loss_fn():
            return liger(hidden, weight, safe, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    else:
        raise ValueError(f"no GRPO contender {impl!r}")

    def step():
        hidden.grad = weight.grad = None
        loss_fn().backward()

    step.loss_fn = loss_fn
    return step


# ---------------------------------------------------------------------------------------------
# measured on the CPU: the loss step
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _case(prompts, g, seq, v, h):
    return (f"GRPO loss fwd+bwd ({LOSS_TYPE}, beta {BETA}) prompts={prompts} G={g} tokens={seq} V={v} H={h}",
            {"prompts": prompts, "G": g, "completion_tokens": seq, "V": v, "H": h})


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("prompts,g,seq,v,h", LOSS_CPU, ids=str)
def test_loss_time_cpu(prompts, g, seq, v, h, threads, timer, record):
    steps = {impl: build_loss_step(impl, prompts, g, seq, v, h) for impl in ("ours", "naive", "liger")}
    with torch.no_grad():
        values = {name: float(s.loss_fn()) for name, s in steps.items()}
    for name, value in values.items():
        assert abs(value - values["naive"]) <= 1e-4 * max(1.0, abs(values["naive"])), values
    medians = timer(steps, rounds=ROUNDS)
    case, shape = _case(prompts, g, seq, v, h)
    noise = ", ".join(f"{n} IQR/median {spread(s):.0%}" for n, s in timer.samples.items())
    for peer in ("naive", "liger"):
        record(kind="measured-cpu", case=case, shape={**shape, "threads": threads}, dtype="float32", unit="ms",
               metric=f"step time, {threads} thread(s)", ours=1e3 * medians["ours"], peer=1e3 * medians[peer],
               peer_name=PEERS[peer], target=TIME_TARGETS[peer],
               note=f"torch face; {len(timer.samples['ours'])} interleaved rounds; {noise}; "
                    f"load average {os.getloadavg()[0]:.1f}")


@pytest.mark.parametrize("prompts,g,seq,v,h", LOSS_CPU, ids=str)
def test_loss_memory_cpu(prompts, g, seq, v, h, record):
    mib = 2.0 ** 20
    case, shape = _case(prompts, g, seq, v, h)
    kwargs = dict(prompts=prompts, g=g, seq=seq, v=v, h=h)
    impls = ("ours", "naive", "liger")
    rss = {impl: memory.peak_rss("benchmarks.bench_grpo:build_loss_step", dict(impl=impl, **kwargs),
                                 preload=("peftkern.losses", "liger_kernel.chunked_loss")) for impl in impls}
    live = {}
    for impl in impls:
        step = build_loss_step(impl, **kwargs)
        step()
        live[impl] = memory.live_peak(step)
    for peer in ("naive", "liger"):
        record(kind="measured-cpu", case=case, shape=shape, dtype="float32", unit="MiB",
               metric="peak RSS extra (fresh process)", ours=rss["ours"]["extra_bytes"] / mib,
               peer=rss[peer]["extra_bytes"] / mib, peer_name=PEERS[peer], target=MEMORY_TARGETS[peer],
               note=f"{rss['ours']['method']}; MALLOC_MMAP_THRESHOLD_={memory.MMAP_THRESHOLD}")
        record(kind="measured-cpu", case=case, shape=shape, dtype="float32", unit="MiB",
               metric="peak live tensor bytes", ours=live["ours"] / mib, peer=live[peer] / mib,
               peer_name=PEERS[peer], target=MEMORY_TARGETS[peer], note="TorchDispatchMode tracker")


# ---------------------------------------------------------------------------------------------
# modeled on the H100 roofline: the loss step
# ---------------------------------------------------------------------------------------------

# Our kernels are counted with the number of chunks the Triton face cuts the target into (the same
# launch sequence) at (tokens per chunk, V, H) corners, then extrapolated multilinearly (exact for
# tile multiples); GRPO at token level is token-local, so chunks are runs of tokens.
CORNERS = ((64, 128), (128, 256), (64, 128))


def _chunks(n: int, v: int) -> int:
    from peftkern.ops.logprobs import default_chunk_size

    return -(-n // default_chunk_size(n, v, "triton"))


def _ours_for_count(chunks, chunk_tokens, v, h):
    import peftkern

    # one completion per chunk: [chunks, chunk_tokens] tokens, every one scored
    inner = build_loss_step("ours", chunks, 1, chunk_tokens, v, h, dtype="bfloat16", chunk_size=chunk_tokens,
                            ragged=False)

    def step():
        with peftkern.backend.use("triton"):
            inner()

    return step


@functools.lru_cache(maxsize=None)
def _corner_counts(chunks: int) -> dict:
    return {c: traffic.count_triton(_ours_for_count(chunks, *c)) for c in itertools.product(*CORNERS)}


def test_modeled_h100(record):
    p = GPU
    n, v, h = p["prompts"] * p["g"] * p["seq"], p["v"], p["h"]
    chunks = _chunks(n, v)
    ours = traffic.extrapolate_grid(_corner_counts(chunks), (n // chunks, v, h))
    naive = traffic.count_eager(build_loss_step("naive", p["prompts"], p["g"], p["seq"], v, h, dtype="bfloat16",
                                                device="meta", ragged=False))
    roofline = traffic.H100_SXM
    model = (f"{roofline.describe()}; ours: Triton kernels (+ launcher aten ops) counted under the interpreter on "
             f"{chunks} chunk(s) (as the Triton face cuts {n} tokens at V={v}) at (tokens per chunk, V, H) corners "
             f"{CORNERS[0]} x {CORNERS[1]} x {CORNERS[2]}, extrapolated multilinearly (exact for tile multiples), "
             "distinct bytes per launch (raw masked requests in ours_upper_bound); naive: aten ops on meta "
             "tensors at this shape (bf16 logits, fp32 log-softmax and loss)")
    case = (f"GRPO loss fwd+bwd ({LOSS_TYPE}, beta {BETA}, old/ref given) prompts={p['prompts']} G={p['g']} "
            f"tokens={p['seq']} V={v} H={h}")
    common = dict(kind="modeled-h100", case=case, shape={"tokens": n, "V": v, "H": h, "chunks": chunks},
                  dtype="bfloat16", model=model, launches={"ours": len(ours.launches), "naive": len(naive.launches)},
                  peer_name=PEERS["naive"], note="modeled")
    gb, us = 1e9, 1e6
    record(**common, metric="bytes moved", unit="GB", ours=ours.bytes / gb, peer=naive.bytes / gb,
           ours_upper_bound=ours.raw_bytes / gb)
    record(**common, metric="step time", unit="us", ours=ours.time(roofline) * us, peer=naive.time(roofline) * us,
           target="<= 0.80", ours_upper_bound=ours.time(roofline, raw=True) * us, flops_ours=ours.flops,
           flops_naive=naive.flops)


# ---------------------------------------------------------------------------------------------
# measured on the CPU: one trainer step end to end against TRL's GRPOTrainer + PEFT
# ---------------------------------------------------------------------------------------------

def low_ids_reward(prompts, completions, completion_ids, **columns):
    """The mid case's reward (TRL's convention): the share of a completion's ids below 16000."""
    return [sum(t < 16000 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def word_tokenizer(vocab: int):
    """A word-level tokenizer of ``vocab`` ids ("w3" .. ; 0 pad, 1 end, 2 start) for the mid model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def _e2e_setup(prompts: int, size: str):
    """(model, tokenizer, prompt records, reward function, its 'module:function') of a case."""
    from peftkern.models import build_byte_tokenizer, build_tiny_model, tasks
    from peftkern.train.rewards import exact_answer

    if size in ("demo", "micro"):
        train, _ = tasks.split(prompts * 50, 4)
        return (build_tiny_model(size), build_byte_tokenizer(), tasks.prompt_records(train), exact_answer,
                "peftkern.train.rewards:exact_answer")
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(pad_token_id=0, eos_token_id=1, bos_token_id=2, **MID))
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(3, MID["vocab_size"], (prompts * 50, MID_PROMPT_WORDS), generator=gen).tolist()
    records = [{"prompt": " ".join(f"w{i}" for i in row)} for row in words]
    return model, word_tokenizer(MID["vocab_size"]), records, low_ids_reward, "benchmarks.bench_grpo:low_ids_reward"


def _ours_e2e(prompts, g, completion, size):
    from peftkern.train.config import TrainConfig
    from peftkern.train.grpo import GRPOTrainer, online_prompts
    from peftkern.train.model import LMWithHeads, prepare_lm

    model, tok, records, _, spec = _e2e_setup(prompts, size)
    cfg = TrainConfig(model="tiny" if size != "mid" else "mid", reward_fn=None if size != "mid" else spec,
                      lora_r=16, lora_alpha=32, batch_size=prompts, lr=1e-3, max_steps=1000, num_generations=g,
                      max_completion_length=completion, max_length=completion + 64, out=tempfile.mkdtemp(),
                      quiet=True, strategy="none", loss_type="dapo", beta=0.0, num_iterations=1,
                      temperature=1.0).check()
    torch.manual_seed(0)
    trainer = GRPOTrainer(cfg, LMWithHeads(prepare_lm(cfg, model)), tok, online_prompts(tok, records, cfg))
    trainer.prepare()
    state = {"step": 0}

    def step():
        trainer.train_step(state["step"])
        state["step"] += 1

    step.trainer = trainer
    return step


def _trl_e2e(prompts, g, completion, size):
    import logging

    from datasets import Dataset
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    model, tok, records, reward, _ = _e2e_setup(prompts, size)
    torch.manual_seed(0)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=prompts * g, num_generations=g,
                      max_completion_length=completion, learning_rate=1e-3, report_to="none", use_cpu=True,
                      bf16=False, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                      logging_steps=10 ** 6, loss_type="dapo", beta=0.0, num_iterations=1, temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(records),
                          processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                      task_type="CAUSAL_LM"))
    loader = iter(trainer.get_train_dataloader())
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()

    def step():
        trainer.training_step(trainer.model, next(loader), None)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step.trainer = trainer
    return step


def build_e2e_step(impl: str, prompts: int, g: int, completion: int, size: str):
    """The step callable of ``impl`` ("ours" or "trl"), one step already taken."""
    step = (_ours_e2e if impl == "ours" else _trl_e2e)(prompts, g, completion, size)
    step()
    return step


def _e2e_case(p):
    model = ("tiny Llama 'demo' (byte vocab), exact-answer reward" if p["size"] != "mid" else
             f"Llama hidden {MID['hidden_size']}, {MID['num_hidden_layers']} layers, vocab {MID['vocab_size']}, "
             f"{MID_PROMPT_WORDS}-token prompts, reward on the ids")
    return (f"GRPO step end to end (sample G={p['g']} x {p['prompts']} prompts, <= {p['completion']} tokens, "
            f"reward, loss dapo beta 0, AdamW), LoRA r=16 all-linear, {model}", dict(p))


@pytest.mark.parametrize("threads", E2E_THREADS, indirect=True)
@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: c["size"])
def test_e2e_time(case, threads, timer, record):
    pytest.importorskip("trl")
    name, shape = _e2e_case(case)
    steps = {impl: build_e2e_step(impl, **case) for impl in ("ours", "trl")}
    medians = timer(steps, rounds=E2E_ROUNDS, warmup=0)  # each builder has taken a step already
    record(kind="measured-cpu", case=name, shape={**shape, "threads": threads}, dtype="float32",
           metric=f"step time, {threads} thread(s)", unit="s", ours=medians["ours"], peer=medians["trl"],
           peer_name="PEFT + TRL GRPOTrainer", target="<= 0.50",
           note=f"{len(timer.samples['ours'])} interleaved rounds; "
           f"ours IQR/median {spread(timer.samples['ours']):.0%}, trl {spread(timer.samples['trl']):.0%}; "
           + ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} s" for k, v in timer.samples.items())
           + f"; load average {os.getloadavg()[0]:.1f}")


@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: c["size"])
def test_e2e_memory(case, record):
    pytest.importorskip("trl")
    name, shape = _e2e_case(case)
    peaks = {impl: memory.peak_rss("benchmarks.bench_grpo:build_e2e_step", dict(impl=impl, **case),
                                   preload=("trl", "peft", "transformers", "peftkern.train.grpo"))["extra_bytes"]
             for impl in ("ours", "trl")}
    record(kind="measured-cpu", case=name, shape=shape, dtype="float32", metric="peak RSS extra (fresh process)",
           unit="MiB", ours=peaks["ours"] / 2 ** 20, peer=peaks["trl"] / 2 ** 20, peer_name="PEFT + TRL GRPOTrainer",
           target="<= 0.50", note=f"{torch.get_num_threads()} torch thread(s); load average {os.getloadavg()[0]:.1f}")
