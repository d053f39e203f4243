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
   lambda is given (``mom2_weight``, the paper's absolute weight) or set per layer relative to the
   keys (``mom2_scale`` w, the default): lambda_l = w * mean_i k_i^T C_l^-1 k_i. One request then
   writes a / (lambda + a) of its residual (a = k^T C^-1 k; Sherman-Morrison), about 1 / (1 + w)
   at every layer of every model, where one absolute lambda writes 63% at one layer and 98% at
   another.
Each layer's update has rank n: A = ((lambda C + K K^T)^-1 K)^T [n, in], B = R [out, n].
The model is not changed (earlier layers' updates are applied with forward hooks while later
layers are computed).
"""
from __future__ import annotations

import torch

from peftkern.editing.compute import ValueSettings, mean_at, optimize_delta
from peftkern.editing.defaults import DEFAULT_MOM2_SCALE
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
    peak, effect = peak_layer(model, tok, requests, samples=samples, seed=seed)
    return layer_window(peak, layout_of(model).n_layers, span), {"mean_mlp_effect": effect, "peak": peak}


def layer_window(peak: int, n_layers: int, span: int | None = None) -> list[int]:
    """The ``span`` layers ending at ``peak`` (default span: a quarter of the layers, at least 2 when
    the model has 4 or more; fewer when the peak is lower)."""
    if span is None:
        span = max(2 if n_layers >= 4 else 1, n_layers // 4)
    return list(range(max(0, peak - span + 1), peak + 1))


def key_scores(mom2: torch.Tensor, keys: torch.Tensor, ridge: float, module: str) -> torch.Tensor:
    """a_i = k_i^T C^-1 k_i for keys [n, in] (float64 [n]): how far each key lies outside the corpus's
    key distribution (the corpus's own keys average ``in``, the key width)."""
    return (keys * solve_cov(mom2, keys.t(), ridge, module).t()).sum(1)


def layer_weight(mom2: torch.Tensor, keys: torch.Tensor, mom2_weight: float | None, mom2_scale: float, ridge: float,
                 module: str) -> tuple[float, float]:
    """(lambda for this layer, mean k^T C^-1 k of ``keys``): ``mom2_weight`` when given, else
    ``mom2_scale`` times the mean score of the keys."""
    mean_score = float(key_scores(mom2, keys, ridge, module).mean())
    if mom2_weight is not None:
        return float(mom2_weight), mean_score
    if not mean_score > 0:
        raise EditError(f"k^T C^-1 k of the edit keys at {module} is {mean_score:.3g}; the key statistics do not fit "
                        "this model (recompute them) or are ill-conditioned (cov_ridge > 0)")
    return mom2_scale * mean_score, mean_score


def memit(model, tok, requests: list[EditRequest | dict], layers: list[int] | None = None, *,
          mom2_weight: float | None = None, mom2_scale: float | None = None, prefixes: list[str] | None = None, n_prefixes: int = 10, prefix_length: int = 10,
          stats=None, corpus: list[str] | None = None, n_stat_tokens: int = 100_000, cov_ridge: float = 0.0,
          settings: ValueSettings | None = None, trace_samples: int = 10, seed: int = 0, cache: bool = True) -> Edit:
    """Compute the MEMIT edit writing all ``requests`` into ``layers`` (default: located by causal
    tracing, :func:`default_layers`). lambda, the weight of the corpus statistics against the new
    keys, is ``mom2_weight`` (the paper's absolute value, the same at every layer) or, by default,
    ``mom2_scale`` (default :data:`peftkern.editing.defaults.DEFAULT_MOM2_SCALE`) times the mean k^T C^-1 k of the requests' keys
    at each layer; give one of the two. Other arguments as in :func:`peftkern.editing.rome`; ``stats``
    may be a dict layer -> KeyStats/C. Returns an Edit (rank len(requests) per layer); the model is
    not changed."""
    layout = layout_of(model)
    if isinstance(requests, (dict, EditRequest)):
        raise EditError("memit takes a list of requests (use rome for one, or pass [request])")
    requests = [check_request(tok, r) for r in requests]
    if not requests:
        raise EditError("memit needs at least one request")
    if mom2_weight is not None and mom2_scale is not None:
        raise EditError("give mom2_weight (an absolute lambda) or mom2_scale (lambda relative to the keys), not both")
    if mom2_weight is not None and not float(mom2_weight) >= 0:
        raise EditError(f"mom2_weight must be >= 0, got {mom2_weight!r}")
    if mom2_scale is None:
        mom2_scale = DEFAULT_MOM2_SCALE
    if not float(mom2_scale) >= 0:
        raise EditError(f"mom2_scale must be >= 0, got {mom2_scale!r}")
    settings = (settings or ValueSettings()).check()
    info: dict = {}
    if layers is None:
        layers, info["layer_choice"] = default_layers(model, tok, requests, samples=trace_samples, seed=seed)
    if isinstance(layers, int) or not layers:
        raise EditError(f"layers must be a non-empty list of layer indices, got {layers!r}")
    layers = sorted({layout.check_layer(l, "layers entry") for l in layers})
    key_stats = {l: resolve_stats(model, tok, l, stats, corpus, n_stat_tokens, cache) for l in layers}
    if mom2_weight is None or not mom2_weight:   # C^-1 is needed: lambda relative to k^T C^-1 k, or lambda 0
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
        mom2 = key_stats[layer].mom2.to(torch.float64)
        lam, mean_score = layer_weight(mom2, keys, mom2_weight, mom2_scale, cov_ridge, module)
        system = lam * mom2 + keys.t() @ keys
        adj = solve_cov(system, keys.t(), cov_ridge, module)                         # [in, n]
        factors[module] = (adj.t().contiguous(), resid.t().contiguous())
        per_layer.append({"layer": layer, "residual_norm": float(resid.norm(dim=1).mean() * (len(layers) - i)),
                          "mom2_weight": lam, "mean_key_score": mean_score})
    info.update(values=records, layers=per_layer, prefixes=list(prefixes),
                mom2_weight=None if mom2_weight is None else float(mom2_weight),
                mom2_scale=None if mom2_weight is not None else float(mom2_scale))
    return Edit("memit", factors, layers, requests, info, fan_in_fan_out=layout.family == "gpt2")
