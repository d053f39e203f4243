"""Second-moment statistics of an edited projection's keys: C = E[k k^T] over the tokens of a text corpus.

ROME's and MEMIT's updates are least-squares solutions weighted by C (the keys the layer usually
sees), so an edit moves the weight in directions ordinary text rarely excites. C is estimated once
per (model, layer, corpus) and cached as safetensors under ``<cache>/edit-stats/`` (``$PEFTKERN_CACHE``
or ``~/.cache/peftkern``), keyed by a fingerprint of the parameters the keys depend on (everything
up to the edited projection, adapters included) and of the corpus, token budget and tokenizer: an
edit to this layer's projection keeps the cache valid, a change upstream does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkern.editing.facts import bundled_corpus
from peftkern.editing.hooks import capture, eval_mode
from peftkern.editing.layout import Layout, base_model, layout_of
from peftkern.editing.requests import EditError
from peftkern.editing.tokens import encode, model_device, pad
from peftkern.models.base import cache_root

FORMAT_VERSION = 1


@dataclass
class KeyStats:
    """``mom2``: E[k k^T], float64 [in, in], over ``count`` tokens of the corpus."""
    mom2: torch.Tensor
    count: int
    module: str


def _sample_bytes(t: torch.Tensor, n: int = 1024) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // n)
    sample = flat[::step][:n].to(torch.float64).cpu()
    total = flat.to(torch.float64).sum().cpu()
    return sample.numpy().tobytes() + total.numpy().tobytes()


def upstream_fingerprint(model, layout: Layout, layer: int) -> str:
    """Hash of the configuration and of every parameter the keys of ``layer``'s projection depend on
    (all but later layers, the final norm and head, and the projection itself)."""
    base = base_model(model)
    later = tuple(layout.layer.format(j) + "." for j in range(layer + 1, layout.n_layers))
    later += tuple(name + "." for name in layout.head)
    own = layout.down_name(layer) + "."
    h = hashlib.sha256()
    config = getattr(base, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
            cfg.pop(key, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in base.named_parameters():
        if name.startswith(later) or name.startswith(own):
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(_sample_bytes(p))
    return h.hexdigest()[:20]


def corpus_fingerprint(tok, corpus: list[str], n_tokens: int, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(f"{type(tok).__name__}:{len(tok)}:{n_tokens}:{max_length}:v{FORMAT_VERSION}".encode())
    h.update(json.dumps(encode(tok, "The quick brown fox, 1234."), separators=(",", ":")).encode())
    for text in corpus:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cache_path(cache_dir: str, model_fp: str, module: str, corpus_fp: str) -> str:
    return os.path.join(cache_dir, model_fp, f"{module}-{corpus_fp}.safetensors")


def _collect(model, tok, layout: Layout, layer: int, corpus: list[str], n_tokens: int, max_length: int,
             batch_size: int) -> tuple[torch.Tensor, int]:
    module = layout.down_name(layer)
    chunks = []
    for text in corpus:
        ids = encode(tok, text)
        for i in range(0, len(ids), max_length):
            if len(ids[i:i + max_length]) > 1 or i == 0:
                chunks.append(ids[i:i + max_length])
    if not chunks:
        raise EditError("the statistics corpus is empty")
    device = model_device(model)
    mom2, count = None, 0
    base = base_model(model)
    with torch.no_grad(), eval_mode(model), capture(base, [module], what="input") as seen:
        for i in range(0, len(chunks), batch_size):
            batch = pad(tok, chunks[i:i + batch_size], device)
            model(**batch.as_kwargs())
            keys = seen[module][batch.attention_mask.bool()].to(torch.float64)
            keys = keys[: n_tokens - count]
            mom2 = keys.t() @ keys if mom2 is None else mom2.addmm_(keys.t(), keys)
            count += keys.shape[0]
            if count >= n_tokens:
                break
    return (mom2 / count).cpu(), count


def key_statistics(model, tok, layer: int, corpus: list[str] | None = None, n_tokens: int = 100_000,
                   max_length: int = 128, batch_size: int = 16, cache: bool = True,
                   cache_dir: str | None = None) -> KeyStats:
    """E[k k^T] of the keys entering layer ``layer``'s edited projection, over up to ``n_tokens``
    tokens of ``corpus`` (default: :func:`peftkern.editing.facts.bundled_corpus`), in chunks of
    ``max_length``. Read from / written to the cache unless ``cache=False``."""
    layout = layout_of(model)
    layout.check_layer(layer)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise EditError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    corpus = bundled_corpus() if corpus is None else list(corpus)
    if not all(isinstance(t, str) for t in corpus):
        raise EditError("the statistics corpus must be a list of strings")
    module = layout.down_name(layer)
    cache_dir = cache_dir or os.path.join(cache_root(), "edit-stats")
    model_fp = upstream_fingerprint(model, layout, layer)
    corpus_fp = corpus_fingerprint(tok, corpus, n_tokens, max_length)
    path = _cache_path(cache_dir, model_fp, module, corpus_fp)
    if cache and os.path.isfile(path):
        try:
            tensors = load_file(path)
            return KeyStats(tensors["mom2"], int(tensors["count"].item()), module)
        except (SafetensorError, KeyError, OSError, RuntimeError):
            pass  # a damaged cache file is recomputed and replaced
    mom2, count = _collect(model, tok, layout, layer, corpus, n_tokens, max_length, batch_size)
    if cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        try:
            save_file({"mom2": mom2.contiguous(), "count": torch.tensor([count], dtype=torch.int64)}, tmp,
                      metadata={"module": module, "model": model_fp, "corpus": corpus_fp, "version": str(FORMAT_VERSION)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return KeyStats(mom2, count, module)
