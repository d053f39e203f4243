"""MEMIT (Meng et al. 2023, arXiv 2210.07229): many facts at once, spread over several layers.

1. For each request i, z_i = h_i + delta_i: h_i is the residual stream after the last edited
   layer L at the subject's last token (averaged over the prefix contexts), delta_i the shift
   that makes the model say the new object (:func:`~peftkern.editing.compute.optimize_delta`,
   applied at L's MLP output, which adds to that residual).
2. For each edited layer l in increasing order, with the updates of the layers before it in place:
   K = the keys k_i at l [in, n], R = (z_i - h_i) / (layers left, l included) [out, n] with h_i
   measured now, and the batched least-squares update (eq. 14)

       Delta_l = R K^T (lambda C_l + K K^T)^-1        (C_l = E[k k^T] over a text corpus)

   which keeps W's outputs on the corpus keys (weighted by lambda) while moving the new keys by R.
Each layer's update has rank n: A = ((lambda C + K K^T)^-1 K)^T [n, in], B = R [out, n].
The model is not changed (earlier layers' updates are applied with forward hooks while later
layers are computed).
"""
from __future__ import annotations

import torch

from peftkern.editing.compute import ValueSettings, mean_at, optimize_delta
from peftkern.editing.edit import Edit
from peftkern.editing.hooks import low_rank_updates
from peftkern.editing.layout import base_model, layout_of
from peftkern.editing.requests import EditError, EditRequest
from peftkern.editing.rome import check_rank, check_request, resolve_stats, solve_cov
from peftkern.editing.sampling import context_prefixes
from peftkern.editing.tokens import model_device
from peftkern.editing.trace import peak_layer


def default_layers(model, tok, requests: list[EditRequest], span: int | None = None, samples: int = 10,
                   seed: int = 0) -> tuple[list[int], dict]:
    """The ``span`` layers ending at :func:`~peftkern.editing.trace.peak_layer` (the MLP indirect
    effect at the subject's last token, averaged over up to 10 requests' traces); default span: a
    quarter of the layers, at least 2 when the model has 4 or more (fewer when the peak is lower)."""
    layout = layout_of(model)
    peak, effect = peak_layer(model, tok, requests, samples=samples, seed=seed)
    if span is None:
        span = max(2 if layout.n_layers >= 4 else 1, layout.n_layers // 4)
    return list(range(max(0, peak - span + 1), peak + 1)), {"mean_mlp_effect": effect, "peak": peak}


def memit(model, tok, requests: list[EditRequest | dict], layers: list[int] | None = None, *,
          mom2_weight: float = 1e4, prefixes: list[str] | None = None, n_prefixes: int = 10, prefix_length: int = 10,
          stats=None, corpus: list[str] | None = None, n_stat_tokens: int = 100_000, cov_ridge: float = 0.0,
          settings: ValueSettings | None = None, trace_samples: int = 10, seed: int = 0, cache: bool = True) -> Edit:
    """Compute the MEMIT edit writing all ``requests`` into ``layers`` (default: located by causal
    tracing, :func:`default_layers`). ``mom2_weight`` is the paper's lambda weighting the corpus
    statistics against the new keys. Other arguments as in :func:`peftkern.editing.rome`; ``stats``
    may be a dict layer -> KeyStats/C. Returns an Edit (rank len(requests) per layer); the model is
    not changed."""
    layout = layout_of(model)
    if isinstance(requests, (dict, EditRequest)):
        raise EditError("memit takes a list of requests (use rome for one, or pass [request])")
    requests = [check_request(tok, r) for r in requests]
    if not requests:
        raise EditError("memit needs at least one request")
    if not float(mom2_weight) >= 0:
        raise EditError(f"mom2_weight must be >= 0, got {mom2_weight!r}")
    settings = (settings or ValueSettings()).check()
    info: dict = {}
    if layers is None:
        layers, info["layer_choice"] = default_layers(model, tok, requests, samples=trace_samples, seed=seed)
    if isinstance(layers, int) or not layers:
        raise EditError(f"layers must be a non-empty list of layer indices, got {layers!r}")
    layers = sorted({layout.check_layer(l, "layers entry") for l in layers})
    key_stats = {l: resolve_stats(model, tok, l, stats, corpus, n_stat_tokens, cache) for l in layers}
    if not mom2_weight:
        for s in key_stats.values():
            check_rank(s, cov_ridge)
    if prefixes is None:
        prefixes = context_prefixes(model, tok, n=n_prefixes, length=prefix_length, seed=seed)
    top = layers[-1]
    residual_at = layout.layer.format(top)
    deltas, records = [], []
    for r in requests:
        delta, record = optimize_delta(model, tok, layout, top, r, prefixes, settings, anchor="hidden")
        deltas.append(delta.cpu().to(torch.float64))
        records.append(record)
    h_start = mean_at(model, tok, residual_at, "output", requests, prefixes)
    z = h_start + torch.stack(deltas)                       # [n, out]
    device = model_device(model)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    per_layer = []
    for i, layer in enumerate(layers):
        module = layout.down_name(layer)
        live = {n: (a.to(device), b.to(device)) for n, (a, b) in factors.items()}
        with low_rank_updates(base_model(model), live):
            keys = mean_at(model, tok, module, "input", requests, prefixes)          # [n, in]
            h_now = mean_at(model, tok, residual_at, "output", requests, prefixes)  # [n, out]
        resid = (z - h_now) / (len(layers) - i)                                     # [n, out]
        system = mom2_weight * key_stats[layer].mom2.to(torch.float64) + keys.t() @ keys
        adj = solve_cov(system, keys.t(), cov_ridge, module)                         # [in, n]
        factors[module] = (adj.t().contiguous(), resid.t().contiguous())
        per_layer.append({"layer": layer, "residual_norm": float(resid.norm(dim=1).mean() * (len(layers) - i))})
    info.update(values=records, layers=per_layer, prefixes=list(prefixes), mom2_weight=float(mom2_weight))
    return Edit("memit", factors, layers, requests, info, fan_in_fan_out=layout.family == "gpt2")
