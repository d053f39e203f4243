"""The diagonal Fisher information of a model's trainable parameters, for EWC: estimation, the
safetensors file, and the checks that tie a file to the model a run trains.

    F_j = 1/N sum_i (d l_i / d theta_j)^2

over N examples, with l_i the example's loss as SFT trains on it: the mean negative log-likelihood
of its label tokens. ``kind="empirical"`` takes the labels from the data; ``kind="true"`` draws
each labelled token from the model's own next-token distribution (the Fisher of the model's
predictive distribution, whose expectation this is a one-sample estimate of). The gradients are
per example (batch size 1), so F is the mean of squares, not the square of the mean.

The file holds one fp32 tensor per trainable parameter, keyed by the causal LM's parameter names
(LoRA factors under their adapter's names when the run trains an adapter), and metadata: the
format, the kind, N, and a SHA-256 of the parameter values F was estimated at, so a run anchored
elsewhere is told so.
"""
from __future__ import annotations

import hashlib
import os

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from peftkern.train.atomic import atomic_write_bytes
from peftkern.train.data import IGNORE_INDEX
from peftkern.train.errors import ConfigError, PathError
from peftkern.train.model import base_causal_lm, head_of

FORMAT = "peftkern-fisher"
KINDS = ("empirical", "true")


def trainable_parameters(lm: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter of every parameter of the causal LM that requires grad, in model order."""
    return {name: p for name, p in lm.named_parameters() if p.requires_grad}


def parameter_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``params`` (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _sampled_labels(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """``labels`` with every labelled token replaced by a draw from the model's next-token distribution."""
    with torch.no_grad():
        hidden = model(ids, mask, want_hidden=True)["hidden"][:, :-1]
        head = base_causal_lm(model.lm).get_output_embeddings()  # the module: a LoRA on the head counts too
        where = labels[:, 1:] != IGNORE_INDEX
        logits = head(hidden[where].to(head_of(model.lm)["weight"].dtype)).float()
        draws = torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator).view(-1)
    sampled = labels.clone()
    sampled[:, 1:][where] = draws.to(labels.device)
    return sampled


def example_loss(model: nn.Module, example: dict, device: torch.device, kind: str = "empirical",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The mean label-token NLL of one tokenized example (``input_ids``, ``labels`` lists) under
    ``model`` (a :class:`peftkern.train.model.LMWithHeads`); with ``kind="true"`` the labels are
    drawn from the model first."""
    ids = torch.tensor([example["input_ids"]], dtype=torch.long, device=device)
    labels = torch.tensor([example["labels"]], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    if kind == "true":
        labels = _sampled_labels(model, ids, mask, labels, generator)
    count = (labels[:, 1:] != IGNORE_INDEX).sum()
    if int(count) == 0:
        raise ConfigError("a Fisher example has no label token to score")
    return -model(ids, mask, labels)["logps"].sum() / count


def estimate_fisher(model: nn.Module, examples: list[dict], kind: str = "empirical", samples: int | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher {name: fp32 tensor on the CPU} of ``model.lm``'s trainable parameters.

    ``model``: an ``LMWithHeads``; ``examples``: tokenized SFT examples; ``samples``: how many of them
    (a seeded random subset; None or more than there are: all), ``seed`` also seeds the label
    draws of the true Fisher. The model is put in eval mode (no dropout) for the estimate and
    restored after; gradients already on the parameters are left untouched.
    """
    if kind not in KINDS:
        raise ConfigError(f"Fisher kind must be one of {KINDS}, got {kind!r}")
    if not examples:
        raise ConfigError("no examples to estimate the Fisher on")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"samples must be an int >= 1, got {samples!r}")
    params = trainable_parameters(model.lm)
    if not params:
        raise ConfigError("the model has no trainable parameter to estimate a Fisher for")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=gen).tolist()[: samples or len(examples)]
    device = next(iter(params.values())).device
    sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()}
    names, tensors = list(params), list(params.values())
    was_training = model.training
    model.eval()
    try:
        for i in order:
            loss = example_loss(model, examples[i], device, kind, gen)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    sums[name].addcmul_(g.float(), g.float())
    finally:
        model.train(was_training)
    return {name: (s / len(order)).cpu() for name, s in sums.items()}


# -- the file -----------------------------------------------------------------------------------

def save_fisher(path: str, fisher: dict[str, torch.Tensor], kind: str, samples: int, fingerprint: str,
                extra: dict[str, str] | None = None) -> None:
    """Write ``fisher`` as safetensors (atomically: a crash leaves the previous file whole)."""
    metadata = {"format": FORMAT, "kind": kind, "samples": str(samples), "anchor_sha256": fingerprint,
                **{k: str(v) for k, v in (extra or {}).items()}}
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in fisher.items()}
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise PathError(f"--out {path}: the folder {parent} does not exist")
    atomic_write_bytes(path, save_safetensors(tensors, metadata=metadata))


def load_fisher(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a Fisher file; a missing, unreadable or foreign file raises naming it."""
    if not os.path.isfile(path):
        raise PathError(f"--ewc {path}: no such Fisher file (write one with 'peftkern fisher')")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own errors name no file
        raise ConfigError(f"--ewc {path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"--ewc {path}: not a Fisher file written by 'peftkern fisher' "
                          f"(metadata format {metadata.get('format')!r})")
    return tensors, metadata


def match_fisher(fisher: dict[str, torch.Tensor], params: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``fisher`` checked against the parameters a run trains: the same names and shapes, finite and
    >= 0. Raises ConfigError naming the first parameters that differ."""
    missing = [n for n in params if n not in fisher]
    unknown = [n for n in fisher if n not in params]
    if missing or unknown:
        raise ConfigError(
            f"--ewc {path}: the Fisher is for other parameters than this run trains: "
            f"{len(missing)} trained parameter(s) have none (e.g. {missing[:3]}), {len(unknown)} Fisher tensor(s) "
            f"match no trained parameter (e.g. {unknown[:3]}); estimate it with the same --model, --lora-r, "
            "--target-modules and --dora as the run")
    for name, p in params.items():
        f = fisher[name]
        if tuple(f.shape) != tuple(p.shape):
            raise ConfigError(f"--ewc {path}: {name} has shape {tuple(f.shape)} in the Fisher file but "
                              f"{tuple(p.shape)} in the model")
        if not f.is_floating_point() or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ConfigError(f"--ewc {path}: {name} holds values that are not finite and >= 0")
    return {name: fisher[name] for name in params}


# -- a run anchored to its start: --ewc F / --l2sp ---------------------------------------------------

def wants_anchors(cfg) -> bool:
    """Whether the run asks for the anchored penalty (``--ewc`` or ``--l2sp``)."""
    return bool(getattr(cfg, "ewc", None)) or bool(getattr(cfg, "l2sp", False))


def attach_anchors(optimizer, lm: nn.Module, cfg, warn=None) -> None:
    """Anchor every trainable parameter of ``lm`` at its value now (the run's start) in ``optimizer``
    (a :class:`peftkern.optim.PagedAdamW`), with ``--ewc``'s Fisher (checked against the parameters,
    stored in ``--ewc-fisher-bits``) or F = 1 for ``--l2sp``; the strength is ``--ewc-lambda``.

    A Fisher estimated at other parameter values than these (another checkpoint, another adapter
    initialisation seed) is reported through ``warn``: EWC's anchor is where F was measured.
    """
    if not wants_anchors(cfg):
        return
    from peftkern.optim import PagedAdamW

    if not isinstance(optimizer, PagedAdamW):
        raise ConfigError("--ewc / --l2sp fold the penalty into peftkern's AdamW; this run's optimizer is "
                          f"{type(optimizer).__name__}")
    params = trainable_parameters(lm)
    if any(hasattr(p, "full_tensor") for p in params.values()):
        raise ConfigError("--ewc / --l2sp do not support --strategy fsdp2 (sharded parameters); use ddp")
    fisher = None
    if cfg.ewc:
        tensors, metadata = load_fisher(cfg.ewc)
        fisher = match_fisher(tensors, params, cfg.ewc)
        saved = metadata.get("anchor_sha256")
        if warn is not None and saved and saved != parameter_fingerprint(params):
            warn(f"--ewc {cfg.ewc}: the Fisher was estimated at other parameter values than this run starts from "
                 "(another model or checkpoint, or another --seed for the adapter); the anchor is this run's start")
    for group in optimizer.param_groups:
        group["anchor_lambda"] = float(cfg.ewc_lambda)
    for name, p in params.items():
        optimizer.set_anchor(p, fisher=None if fisher is None else fisher[name].to(p.device),
                             fisher_bits=cfg.ewc_fisher_bits)
