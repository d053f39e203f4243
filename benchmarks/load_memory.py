"""Peak host memory of loading and training one step on a ~1B-parameter Llama checkpoint (measured,
CPU), each case in a fresh process, one after another.

    python benchmarks/load_memory.py --dir /tmp/llama1b            # makes the checkpoint if missing
    python benchmarks/load_memory.py --dir /tmp/llama1b --cases nf4,bf16 --json out.json

The checkpoint is TinyLlama-1.1B's architecture (hidden 2048, 22 layers, GQA 32/4 heads,
intermediate 5632, vocab 32000, untied head) with random weights (std 0.02), bf16, in 2 safetensors
shards plus the embedded byte tokenizer; it is written one tensor at a time and never committed.

Each case runs ``peftkern sft --model DIR --max-steps 1 ...`` (a load-only twin stops after the
model is built and prepared and one no-grad forward of 8 tokens has read every weight; an ``-act``
twin reports the bytes the step's forward saves for its backward) in a fresh process under ``MALLOC_MMAP_THRESHOLD_=65536``
(docs/BENCHMARKS.md: glibc otherwise keeps freed blocks in RSS and peaks drift); the figure is
the child's ``ru_maxrss``. The baseline is a fresh process that imports everything the run imports
and builds the model class on the meta device; "extra" is the peak minus that baseline.
Reference bytes: the bf16 checkpoint's tensors, and the NF4 model's (4-bit linears: codes, 8-bit
absmax, fp32 nested absmax and the 256-entry code per weight; 16-bit embeddings, head and norms).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    # name: (sft flags, what it shows)
    "nf4": (["--quant", "nf4"], "QLoRA: linears quantized as read, bf16 embeddings/head (--dtype auto = bf16)"),
    "nf4-fp32": (["--quant", "nf4", "--dtype", "fp32"], "the same, embeddings/head/norms in fp32"),
    "bf16": (["--dtype", "bf16"], "LoRA on the bf16 model, no quantization"),
    "fp32": (["--dtype", "fp32"], "LoRA on the model in fp32"),
}


def make_checkpoint(directory: str) -> None:
    """The random bf16 checkpoint in two shards, one tensor at a time."""
    import torch
    import transformers

    from peftkern.models import build_byte_tokenizer
    from peftkern.quant.layout import empty_causal_lm
    from peftkern.quant.shards import ShardWriter

    config = transformers.LlamaConfig(**CONFIG)
    config.dtype = torch.bfloat16
    model = empty_causal_lm(config, torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    os.makedirs(directory, exist_ok=True)
    writer = ShardWriter(directory, max_shard_bytes=int(total * 0.6))  # two shards
    g = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        writer.add(key, t)
        del t
    writer.close()
    config.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)


def reference_bytes(directory: str) -> dict:
    import torch

    from peftkern.quant.layout import empty_causal_lm, quantized_linears, read_config

    model = empty_causal_lm(read_config(directory), torch.bfloat16)
    targets = quantized_linears(model)
    nf4 = dense = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.removesuffix(".weight") in targets:
            blocks = -(-n // 64)
            nf4 += (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
        else:
            dense += 2 * n
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "bf16_bytes": 2 * params, "nf4_model_bytes": nf4 + dense, "nf4_linear_bytes": nf4,
            "bf16_other_bytes": dense,
            "shard_bytes": sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                               if f.endswith(".safetensors"))}


# The load-only twin: the model built and its adapters added, then one forward of 8 tokens with no
# gradient, which reads every weight: weights kept in their stored dtype stay in the mapped file
# until first used (as transformers 5 does), so the load alone would not count them.
LOAD_ONLY = """
import sys, torch
from peftkern.cli import _parser
from peftkern.train.config import config_from_args
from peftkern.train.loading import load_lm
from peftkern.train.model import prepare_lm
args = _parser().parse_args(sys.argv[1:])
cfg = config_from_args(args, "sft")
lm = prepare_lm(cfg, load_lm(cfg, quiet=True))
with torch.no_grad():
    lm(torch.arange(1, 9)[None])
print(sum(p.numel() for p in lm.parameters() if p.requires_grad))
"""

# What one step's forward keeps for its backward ("activations"): the bytes of every tensor autograd
# saves that is not a parameter or buffer (hidden states, norms' fp32 inputs, the compute-dtype
# copies of the adapters), unique storages, for the step's first micro-batch; not a peak RSS.
ACTIVATIONS = """
import json, sys, torch
from peftkern.cli import _parser
from peftkern.train.config import config_from_args
from peftkern.train.run import build_trainer
cfg = config_from_args(_parser().parse_args(sys.argv[1:]), "sft")
trainer = build_trainer("sft", cfg)
batch = trainer.to_device(trainer.collate(trainer.micro_batches(0)[0]))
owned = {t.untyped_storage().data_ptr() for t in list(trainer.module.parameters()) + list(trainer.module.buffers())}
saved = {}
def pack(t):
    storage = t.untyped_storage()
    if storage.data_ptr() not in owned:
        saved[storage.data_ptr()] = storage.nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss, _ = trainer.loss(trainer.model, batch)
trainable = sum(p.numel() * p.element_size() for p in trainer.module.parameters() if p.requires_grad)
print(json.dumps({"activation_bytes": sum(saved.values()), "tokens": int(batch["input_ids"].numel()),
                  "trainable_bytes": trainable}))
"""

# The peers' load, for comparison: transformers' from_pretrained in bf16 / fp32, and with bitsandbytes
# NF4 (double quant, bf16 compute: what QLoRA recipes use); no training step. transformers 5 leaves
# bf16 weights memory-mapped from the shards, read on first use, so the load is followed by one
# forward of 8 tokens (which reads every weight) to count what a loaded model holds.
PEER_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
kind, directory = sys.argv[1], sys.argv[2]
quant = None
if kind == "hf-nf4":
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
dtype = torch.float32 if kind == "hf-fp32" else torch.bfloat16
model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization_config=quant)
with torch.no_grad():
    model(torch.arange(1, 9)[None])
print(sum(p.numel() for p in model.parameters()))
"""
PEERS = {"hf-bf16": "transformers from_pretrained, dtype=bf16", "hf-fp32": "transformers from_pretrained, dtype=fp32",
         "hf-nf4": "transformers from_pretrained with bitsandbytes NF4 (double quant, bf16 compute)"}

BASELINE = """
import torch, transformers, peftkern.cli, peftkern.train.run, peftkern.train.sft, peftkern.train.pretrained
from peftkern.quant.layout import empty_causal_lm, read_config
import sys
empty_causal_lm(read_config(sys.argv[1]), torch.bfloat16)
"""


# A fresh, small process forks the measured one: Linux starts a child's ru_maxrss at the RSS of the
# process it was forked (or vforked) from, so forking from this driver would count the driver's own.
LAUNCHER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]), file=sys.stderr)
"""


def _child(argv: list[str], threads: int | None = None) -> dict:
    """Run ``argv`` in a fresh process (``threads`` torch threads, default: torch's); its own peak RSS
    (``wait4``'s rusage of that child)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    start = time.time()
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *argv], env=env, capture_output=True, text=True)
    code, maxrss = json.loads(done.stderr.strip().splitlines()[-1])
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return {"peak_bytes": maxrss * 1024, "seconds": round(time.time() - start, 1), "stdout": done.stdout[-300:]}


def _sft_args(directory: str, data: str, flags: list[str]) -> list[str]:
    out = os.path.join(tempfile.mkdtemp(), "run")
    return ["sft", "--model", directory, "--data", data, "--max-steps", "1", "--batch-size", "2", "--max-length", "64",
            "--lora-r", "16", "--out", out, "--quiet", *flags]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="checkpoint folder (made when it has no config.json)")
    p.add_argument("--cases", default="baseline,nf4-load,nf4,bf16-load,bf16", help=f"comma-separated from baseline, "
                   f"{', '.join(CASES)}, each optionally with '-load' (the load-only twin) or '-act' (the bytes the "
                   f"step's forward saves for its backward), or the peers' load-only "
                   f"{', '.join(PEERS)}; run one after another")
    p.add_argument("--python", default=sys.executable, help="interpreter of the runs (default: this one)")
    p.add_argument("--repo", default=ROOT, help="peftkern checkout the runs import (default: this one; e.g. main's "
                   "to measure the code before streaming loads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run (OMP_NUM_THREADS; default: "
                   "torch's own, the core count)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        print(f"making the random 1.1B checkpoint in {args.dir} ...", flush=True)
        make_checkpoint(args.dir)
    refs = reference_bytes(args.dir)
    data = os.path.join(tempfile.mkdtemp(), "data.jsonl")
    with open(data, "w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."}) + "\n")
    results = {"reference": refs, "threads": args.threads, "load_average_before": os.getloadavg(), "cases": {}}
    os.environ["PYTHONPATH"] = args.repo
    for case in args.cases.split(","):
        if case.endswith("-act"):  # what the step's forward saves for its backward (not a peak)
            flags, _ = CASES[case.removesuffix("-act")]
            res = _child([args.python, "-c", ACTIVATIONS, *_sft_args(args.dir, data, flags)], args.threads)
            res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
            results["cases"][case] = res
            print(f"{case:<14} activations {res['activation_bytes'] / 2**20:.1f} MiB ({res['tokens']} tokens)", flush=True)
            continue
        name, load_only = case.removesuffix("-load"), case.endswith("-load")
        if name == "baseline":
            res = _child([args.python, "-c", BASELINE, args.dir], args.threads)
        elif name in PEERS:
            res = _child([args.python, "-c", PEER_LOAD, name, args.dir], args.threads)
        else:
            flags, _ = CASES[name]
            sft = _sft_args(args.dir, data, flags)
            argv = [args.python, "-c", LOAD_ONLY, *sft] if load_only else [args.python, "-m", "peftkern", *sft]
            res = _child(argv, args.threads)
        results["cases"][case] = res
        print(f"{case:<14} peak {res['peak_bytes'] / 2**30:6.2f} GiB  ({res['seconds']} s)", flush=True)
    results["load_average_after"] = os.getloadavg()
    base = results["cases"].get("baseline", {}).get("peak_bytes")
    for case, res in results["cases"].items():
        if base and case != "baseline" and "peak_bytes" in res and not case.endswith("-act"):
            res["extra_bytes"] = res["peak_bytes"] - base
            ref = refs["nf4_model_bytes"] if "nf4" in case else refs["bf16_bytes"]
            res["extra_over_reference"] = round(res["extra_bytes"] / ref, 3)
            res["peak_over_reference"] = round(res["peak_bytes"] / ref, 3)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
