"""The embedded tiny model after learning the bundled facts: the base the editing experiments edit.

The pretrained tiny Llama (:func:`peftkern.train.pretrain.build_pretrained_tiny`) knows none of the invented
facts. This fine-tunes all its weights on them, deterministically: each step a batch of
``<|bos|>sentence<|end|>`` rows, three quarters fact sentences (every fact in each of its three
phrasings, drawn at random) and one quarter sentences of the base's own corpus (rehearsal, so it
keeps its skills), loss on every token, AdamW (no weight decay), linear warm-up then cosine decay
to a tenth. Built once (1121 s of wall time from the shipped 2.76M base on a busy 2-core machine),
then read from the cache (``$PEFTKERN_CACHE`` or ``~/.cache/peftkern``), keyed by these settings and
the facts file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile

import torch

from peftkern.editing.facts import FACTS_PATH, fact_sentences
from peftkern.editing.requests import EditError
from peftkern.editing.tokens import encode, pad
from peftkern.models import build_byte_tokenizer, cached_path, load_cached_tiny, tasks
from peftkern.models.base import cache_root

LEARN = dict(steps=1200, batch_size=32, fact_share=0.75, lr=3e-3, warmup=20, min_lr_ratio=0.1, seed=0,
             rehearsal_sentences=3000)


def _key(settings: dict) -> str:
    with open(FACTS_PATH, "rb") as fh:
        facts = hashlib.sha256(fh.read()).hexdigest()
    blob = json.dumps({"learn": settings, "base": os.path.basename(cached_path()), "facts": facts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_with_facts(quiet: bool = False, settings: dict | None = None, cache: bool = True, base=None):
    """The pretrained tiny model fine-tuned on the bundled facts (``LlamaForCausalLM``, fp32, eval mode).

    When it is not cached yet it is learned from the pretrained tiny base: ``base`` (the model, or a
    function returning it; the CLI passes ``peftkern.train.pretrain.build_pretrained_tiny``, which
    trains the base when that is not cached either), else the cached base."""
    from transformers import LlamaForCausalLM

    settings = {**LEARN, **(settings or {})}
    path = os.path.join(cache_root(), f"tiny-facts-{_key(settings)}")
    if cache and os.path.isfile(os.path.join(path, "config.json")):
        return LlamaForCausalLM.from_pretrained(path).eval()
    start = base() if callable(base) and not isinstance(base, torch.nn.Module) else base
    start = start if start is not None else load_cached_tiny()
    if start is None:
        raise EditError("the pretrained tiny base is not in the cache; build it first (peftkern demo, or "
                        "peftkern.train.pretrain.build_pretrained_tiny()), or pass base=")
    model = learn_facts(start, settings, quiet)
    if cache:
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root(), prefix=".tiny-facts-")
        try:
            model.save_pretrained(tmp)
            build_byte_tokenizer().save_pretrained(tmp)
            os.replace(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):  # not another process finishing first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model


def learn_facts(model, settings: dict | None = None, quiet: bool = True):
    """Fine-tune ``model`` (in place) on the bundled fact sentences as described in the module docstring."""
    s = {**LEARN, **(settings or {})}
    tok = build_byte_tokenizer()
    facts = fact_sentences()
    rehearse = tasks.pretraining_text(tasks.questions(s["rehearsal_sentences"], s["seed"] + 123, distinct=False))
    rng = random.Random(s["seed"])
    n_facts = round(s["batch_size"] * s["fact_share"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
        model.train()
        for step in range(s["steps"]):
            texts = [rng.choice(facts) for _ in range(n_facts)] + \
                [rng.choice(rehearse) for _ in range(s["batch_size"] - n_facts)]
            batch = pad(tok, [encode(tok, t) + [tok.eos_token_id] for t in texts])
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            progress = step / max(1, s["steps"] - 1)
            scale = min(1.0, (step + 1) / s["warmup"]) * \
                (s["min_lr_ratio"] + (1 - s["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))
            for group in opt.param_groups:
                group["lr"] = s["lr"] * scale
            loss = model(**batch.as_kwargs(), labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not quiet and step % 100 == 0:
                print(f"learning the bundled facts: step {step}/{s['steps']} loss {loss.item():.3f}", flush=True)
    return model.eval()
