"""ROME (Meng et al. 2022, arXiv 2202.05262): one fact, one rank-one update of one layer's MLP
output projection.

Treating the projection W [out, in] as a linear associative memory that maps keys k to values
v = W k, the edit writes the new pair (k*, v*) while disturbing the keys of ordinary text least:

    minimize ||W' K - W K||  subject to  W' k* = v*     (K: the corpus's keys, C = K K^T / N)
    =>  W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)        (the paper's eq. 2)

- the layer: given, or located by causal tracing (the MLP state at the subject's last token with
  the largest indirect effect on the known answer);
- k*: the projection's input at the subject's last token, averaged over the prompt alone and
  the prompt after short prefixes the model writes itself;
- v* = W k* + delta, delta from :func:`peftkern.editing.compute.optimize_delta`, so
  v* - W k* = delta and the update is (delta) (C^-1 k*)^T / (k*^T C^-1 k*).

One k* is used throughout (as the paper writes it; the authors' code mixed the averaged key with
the prompt's own in the denominator, which Gupta et al. 2024 traced to collapses in sequential
editing). The update is returned as an :class:`~peftkern.editing.edit.Edit` of rank 1:
A = (C^-1 k*)^T / (k*^T C^-1 k*) [1, in], B = delta [out, 1] (float64). The model is not changed.
"""
from __future__ import annotations

import torch

from peftkern.editing.compute import ValueSettings, mean_at, optimize_delta
from peftkern.editing.edit import Edit, combine
from peftkern.editing.hooks import low_rank_updates
from peftkern.editing.layout import base_model, layout_of
from peftkern.editing.requests import EditError, EditRequest, as_request
from peftkern.editing.sampling import context_prefixes
from peftkern.editing.stats import KeyStats, key_statistics
from peftkern.editing.tokens import model_device, target_ids
from peftkern.editing.trace import locate_layer


def solve_cov(mom2: torch.Tensor, rhs: torch.Tensor, ridge: float, module: str) -> torch.Tensor:
    """(C + ridge * mean(diag C) I)^-1 rhs in float64; a singular C is an error naming the module."""
    c = mom2.to(torch.float64)
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    try:
        return torch.linalg.solve(c, rhs.to(torch.float64))
    except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError) for singular matrices
        raise EditError(f"the key statistics of {module} are singular ({exc}); estimate them on more tokens "
                        "(n_stat_tokens, a larger corpus) or pass cov_ridge > 0") from None


def check_request(tok, request: EditRequest | dict) -> EditRequest:
    """Parse ``request`` and check that its target tokenizes to something after its prompt."""
    request = as_request(request)
    target_ids(tok, request.text, request.target_new)
    return request


def resolve_stats(model, tok, layer: int, stats, corpus, n_stat_tokens: int, cache: bool) -> KeyStats:
    if stats is None:
        return key_statistics(model, tok, layer, corpus=corpus, n_tokens=n_stat_tokens, cache=cache)
    if isinstance(stats, dict):
        stats = stats.get(layer)
    if isinstance(stats, torch.Tensor):
        stats = KeyStats(stats, 0, layout_of(model).down_name(layer))
    if not isinstance(stats, KeyStats):
        raise EditError(f"stats must be a KeyStats, a tensor C, or a dict layer -> those (none for layer {layer})")
    return stats


def check_rank(stats: KeyStats, ridge: float) -> None:
    """C from fewer tokens than the key has dimensions is singular: say so before solving."""
    dim = stats.mom2.shape[0]
    if not ridge and 0 < stats.count < dim:
        raise EditError(f"the key statistics of {stats.module} are singular: {stats.count} tokens for {dim}-dimensional "
                        "keys; use a larger corpus / n_stat_tokens, or cov_ridge > 0")


def rome(model, tok, request: EditRequest | dict, layer: int | None = None, *, prefixes: list[str] | None = None,
         n_prefixes: int = 10, prefix_length: int = 10, stats=None, corpus: list[str] | None = None,
         n_stat_tokens: int = 100_000, cov_ridge: float = 0.0, settings: ValueSettings | None = None,
         trace_samples: int = 10, seed: int = 0, cache: bool = True) -> Edit:
    """Compute the ROME edit of ``request`` (an EditRequest or its dict) on ``model`` (a
    transformers causal LM or a PeftKernModel; its active adapters count as part of it).

    layer: the layer to edit (default: located by causal tracing). prefixes: the contexts for k*
    and v* (default: ``""`` and ``n_prefixes`` texts of ``prefix_length`` tokens the model
    samples, seeded by ``seed``). stats: precomputed key statistics (KeyStats or C) for the layer;
    otherwise :func:`key_statistics` on ``corpus`` (cached). settings: the optimization of delta.
    Returns an Edit (rank 1); the model is not changed. Apply it with ``edit.apply(model)``, save
    it with ``edit.save(model, dir)``."""
    layout = layout_of(model)
    request = check_request(tok, request)
    settings = (settings or ValueSettings()).check()
    info: dict = {}
    if layer is None:
        layer, trace = locate_layer(model, tok, request, samples=trace_samples, seed=seed)
        info["trace"] = trace.as_dict()
    layout.check_layer(layer)
    key_stats = resolve_stats(model, tok, layer, stats, corpus, n_stat_tokens, cache)
    check_rank(key_stats, cov_ridge)
    if prefixes is None:
        prefixes = context_prefixes(model, tok, n=n_prefixes, length=prefix_length, seed=seed)
    module = layout.down_name(layer)
    k_star = mean_at(model, tok, module, "input", [request], prefixes)[0]
    delta, record = optimize_delta(model, tok, layout, layer, request, prefixes, settings, anchor="mlp")
    u = solve_cov(key_stats.mom2, k_star, cov_ridge, module)
    denom = float(u @ k_star)
    if not denom > 0:
        raise EditError(f"k*^T C^-1 k* = {denom:.3g} at {module} is not positive; the key statistics do not fit "
                        "this model (recompute them) or are ill-conditioned (cov_ridge > 0)")
    a = (u / denom).view(1, -1)
    b = delta.cpu().to(torch.float64).view(-1, 1)
    info.update(value=record, layer=layer, k_norm=float(k_star.norm()), prefixes=list(prefixes))
    return Edit("rome", {module: (a, b)}, [layer], [request], info, fan_in_fan_out=layout.family == "gpt2")


def rome_sequential(model, tok, requests: list[EditRequest | dict], layer: int | None = None, **kwargs) -> Edit:
    """ROME applied to ``requests`` one after another, each computed on the model with the edits
    before it in place (as forward hooks: the model is not changed), combined into one Edit whose
    rank per module is the number of requests that edited it. Key statistics are those of the
    unedited model (as the papers' sequential runs). Keyword arguments as :func:`rome`."""
    if isinstance(requests, (dict, EditRequest)):
        raise EditError("rome_sequential takes a list of requests")
    requests = [check_request(tok, r) for r in requests]
    if not requests:
        raise EditError("rome_sequential needs at least one request")
    if layer is not None:
        layout_of(model).check_layer(layer)
    device = model_device(model)
    edits: list[Edit] = []
    for request in requests:
        done = combine(edits).factors if edits else {}
        with low_rank_updates(base_model(model), {n: (a.to(device), b.to(device)) for n, (a, b) in done.items()}):
            edits.append(rome(model, tok, request, layer, **kwargs))
    return combine(edits, "rome-sequential")
