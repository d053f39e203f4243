"""The demo's base model: the tiny Llama trained briefly (full weights) on the bundled plain-text
corpus, so it knows the skills but not the chat format. The corpus states facts as sentences
("7 + 8 is 15.", "'kel' reversed is lek."); the chat-format prompts held out from fine-tuning may
ask about facts it stated, as a user asks a pretrained model about what it read. Built once, then read from the cache
(``$PEFTKERN_CACHE`` or ``~/.cache/peftkern``), keyed by everything that shapes it."""
from __future__ import annotations

import hashlib
import json
import os

from peftkern.models import tasks
from peftkern.models.tiny import BOS_ID, END_ID, SIZES, build_tiny_model

# ~3 minutes of one CPU core; enough for the skills in plain-text form (measured on held-out sentences:
# upper ~2/3, reverse and add nearly all right after 1000 steps at these settings).
PRETRAIN = dict(size="demo", questions=30000, steps=800, batch_size=16, seq_len=128, lr=5e-3, warmup=20, seed=0)
CORPUS_VERSION = 2


def cache_root() -> str:
    return os.environ.get("PEFTKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peftkern")


def _key(settings: dict) -> str:
    blob = json.dumps({"settings": settings, "arch": SIZES[settings["size"]], "corpus": CORPUS_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def corpus_examples(n_questions: int, seq_len: int, seed: int = 0) -> list[dict]:
    """The plain-text corpus as packed rows of ``seq_len`` tokens (bos sentence end, repeated)."""
    from peftkern.models.tokenizer import build_byte_tokenizer
    from peftkern.train.data import pack

    tok = build_byte_tokenizer()
    items = tasks.questions(n_questions, seed + 7, distinct=False)
    docs = []
    for text in tasks.pretraining_text(items):
        ids = [BOS_ID] + tok(text, add_special_tokens=False)["input_ids"] + [END_ID]
        docs.append({"input_ids": ids, "labels": ids})
    return pack(docs, seq_len)


def _path(settings: dict) -> str:
    return os.path.join(cache_root(), f"tiny-{settings['size']}-{_key(settings)}")


def is_cached(settings: dict | None = None) -> bool:
    """Whether the base for these settings is already in the cache."""
    return os.path.isfile(os.path.join(_path({**PRETRAIN, **(settings or {})}), "config.json"))


def pretrained_tiny(quiet: bool = False, settings: dict | None = None, cache: bool = True):
    """The pretrained tiny base (``LlamaForCausalLM``, fp32), from the cache or trained now (a couple of
    minutes on 2 CPU cores for the demo size)."""
    from transformers import LlamaForCausalLM

    settings = {**PRETRAIN, **(settings or {})}
    path = _path(settings)
    if cache and os.path.isfile(os.path.join(path, "config.json")):
        return LlamaForCausalLM.from_pretrained(path)
    model = _pretrain(settings, quiet)
    if cache:
        from peftkern.train.checkpoint import atomic_dir

        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
    return model


def _pretrain(settings: dict, quiet: bool):
    import tempfile

    from peftkern.models.tokenizer import build_byte_tokenizer
    from peftkern.train.config import TrainConfig
    from peftkern.train.model import LMWithHeads
    from peftkern.train.sft import SFTTrainer

    lm = build_tiny_model(settings["size"], seed=settings["seed"])
    examples = corpus_examples(settings["questions"], settings["seq_len"], settings["seed"])
    with tempfile.TemporaryDirectory(prefix="peftkern-pretrain-") as out:
        cfg = TrainConfig(model="tiny", lora_r=0, lr=settings["lr"], batch_size=settings["batch_size"],
                          max_steps=settings["steps"], warmup_steps=settings["warmup"], schedule="cosine",
                          min_lr_ratio=0.1, out=out, log_every=10, seed=settings["seed"], quiet=quiet,
                          weight_decay=0.0, strategy="none").check()
        trainer = SFTTrainer(cfg, LMWithHeads(lm), build_byte_tokenizer(), examples)
        trainer.kind = "pretrain base"
        trainer.save = lambda step, state: None  # nothing to resume: the cache is the product
        trainer.save_outputs = lambda summary: None
        trainer.train()
    return lm.eval()
