"""The two measured pieces of every edit: keys k (the projection's input at the subject's last
token, averaged over prefix contexts) and the shift delta of the projection's output that makes
the model say the new object (v* = W k* + delta).

delta minimizes, as in ROME (eq. 4) and MEMIT (eq. 16), with the subject's output shifted by delta
in every prompt:

    mean_j -log P(target | x_j + prompt)                      (x_j: the prefix contexts)
    + kl_factor * KL(P_new(. | p') || P_old(. | p'))          (p': "{subject} is a": keeps what the subject is)
    + weight_decay * ||delta||^2 / ||v0||^2                   (v0: the unshifted output or residual, see ``anchor``)

with Adam, and ||delta|| clamped to ``clamp_factor * ||v0||`` after each step. The target's log
probability is averaged over its tokens, so multi-token targets (the byte-level tiny model's are
a few bytes) weigh like one-token ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peftkern.editing.hooks import capture, edit_output, eval_mode
from peftkern.editing.layout import Layout, base_model
from peftkern.editing.requests import EditError, EditRequest
from peftkern.editing.tokens import encode, model_device, pad, subject_tokens, target_ids


@dataclass(frozen=True)
class ValueSettings:
    """How delta is optimized (defaults: the papers' GPT-2 XL settings, with 25 steps)."""
    steps: int = 25
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_factor: float = 4.0
    stop_loss: float = 0.05
    kl_prompts: tuple[str, ...] = ("{} is a",)

    def check(self) -> "ValueSettings":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise EditError(f"steps must be a positive integer, got {self.steps!r}")
        for name in ("lr", "clamp_factor"):
            if not float(getattr(self, name)) > 0:
                raise EditError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("kl_factor", "weight_decay", "stop_loss"):
            if not float(getattr(self, name)) >= 0:
                raise EditError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for p in self.kl_prompts:
            if "{}" not in p:
                raise EditError(f"kl_prompts entries need '{{}}' for the subject, got {p!r}")
        return self


def lookup(tok, prefix: str, request: EditRequest) -> tuple[list[int], int]:
    """(ids of prefix + prompt, index of the subject's last token)."""
    text = prefix + request.text
    start, end = request.subject_span()
    ids = encode(tok, text)
    return ids, subject_tokens(tok, text, (start + len(prefix), end + len(prefix)))[1]


def mean_at(model, tok, module: str, what: str, requests: list[EditRequest], prefixes: list[str],
            batch_size: int = 64) -> torch.Tensor:
    """The ``what`` ("input" or "output") of ``module`` at each request's subject-last token,
    averaged over ``prefixes``: [n_requests, dim], float64."""
    rows, where = [], []
    for r in requests:
        for p in prefixes:
            ids, last = lookup(tok, p, r)
            rows.append(ids)
            where.append(last)
    device = model_device(model)
    out = []
    with torch.no_grad(), eval_mode(model), capture(base_model(model), [module], what=what) as seen:
        for i in range(0, len(rows), batch_size):
            batch = pad(tok, rows[i:i + batch_size], device)
            model(**batch.as_kwargs())
            pos = torch.tensor(where[i:i + batch_size], device=device)
            out.append(seen[module][torch.arange(len(pos), device=device), pos].to(torch.float64))
    return torch.cat(out).view(len(requests), len(prefixes), -1).mean(1).cpu()


def optimize_delta(model, tok, layout: Layout, layer: int, request: EditRequest, prefixes: list[str],
                   settings: ValueSettings, anchor: str = "mlp") -> tuple[torch.Tensor, dict]:
    """delta [out] (float32, on the model's device) for ``request`` at ``layer``'s projection output.

    ``anchor`` names the vector v0 whose norm scales the decay and clamp: ``"mlp"`` (the
    projection's output, ROME) or ``"hidden"`` (the block's output residual, MEMIT). Returns delta
    and a record of the optimization (losses, target probability, norms, steps)."""
    device = model_device(model)
    base = base_model(model)
    down = layout.down_name(layer)
    rows, looks, labels = [], [], []
    for p in prefixes:
        ids, last = lookup(tok, p, request)
        prompt, target = target_ids(tok, p + request.text, request.target_new)
        rows.append(prompt + target[:-1])
        looks.append(last)
        labels.append((len(prompt) - 1, target))
    n_rewrite = len(rows)
    kl_at = []
    for template in settings.kl_prompts:
        kl_request = EditRequest(template, request.subject, request.target_new)
        ids, last = lookup(tok, "", kl_request)
        rows.append(ids)
        looks.append(last)
        kl_at.append(len(ids) - 1)
    batch = pad(tok, rows, device)
    n, width = batch.input_ids.shape
    at = torch.zeros((n, width, 1), device=device)
    at[torch.arange(n), torch.tensor(looks)] = 1.0
    label_ids = torch.full((n_rewrite, width), -100, dtype=torch.long)
    for i, (start, target) in enumerate(labels):
        label_ids[i, start:start + len(target)] = torch.tensor(target)
    label_ids = label_ids.to(device)
    label_mask = label_ids != -100
    kl_rows = torch.arange(n_rewrite, n, device=device)
    kl_pos = torch.tensor(kl_at, device=device)
    anchor_module = {"mlp": down, "hidden": layout.layer.format(layer)}[anchor]

    def losses(logits):
        logp = F.log_softmax(logits[:n_rewrite].float(), dim=-1)
        token_lp = logp.gather(-1, label_ids.clamp_min(0).unsqueeze(-1)).squeeze(-1) * label_mask
        nll_each = -token_lp.sum(1) / label_mask.sum(1)
        kl_lp = F.log_softmax(logits[kl_rows, kl_pos].float(), dim=-1)
        return nll_each, kl_lp

    with eval_mode(model):
        with torch.no_grad(), capture(base, [anchor_module]) as seen:
            logits = model(**batch.as_kwargs()).logits
            nll0, kl_init = losses(logits)
            v0 = seen[anchor_module][torch.arange(n_rewrite), torch.tensor(looks[:n_rewrite])].float().mean(0)
        v0_norm = float(v0.norm())
        if not v0_norm > 0:
            raise EditError(f"the {anchor} output at the subject of {request.text!r} is zero at layer {layer}; "
                            "cannot scale the decay and clamp")
        delta = torch.zeros(v0.shape[-1], device=device, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=settings.lr)
        max_norm = settings.clamp_factor * v0_norm
        record = {"nll_start": float(nll0.mean()), "steps": 0}
        with edit_output(base, down, lambda out: out + (at * delta).to(out.dtype)):
            for step in range(settings.steps + 1):
                logits = model(**batch.as_kwargs()).logits
                nll_each, kl_lp = losses(logits)
                nll = nll_each.mean()
                kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1).mean() if len(kl_at) else nll * 0
                decay = settings.weight_decay * delta.pow(2).sum() / v0_norm ** 2
                loss = nll + settings.kl_factor * kl + decay
                record.update(nll=nll.item(), kl=kl.item(), decay=decay.item(),
                              target_prob=torch.exp(-nll_each.detach()).mean().item())
                if step == settings.steps or loss.item() < settings.stop_loss:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                delta.grad = grad
                opt.step()
                record["steps"] = step + 1
                with torch.no_grad():
                    norm = delta.norm()
                    if norm > max_norm:
                        delta.mul_(max_norm / norm)
    delta = delta.detach()
    record.update(delta_norm=float(delta.norm()), anchor_norm=v0_norm)
    return delta, record
