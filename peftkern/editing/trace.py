"""Causal tracing (ROME, section 2): which hidden states carry a fact.

Three runs of the prompt: clean; corrupted (Gaussian noise added to the subject's token
embeddings, ``samples`` draws); and corrupted with one state restored to its clean value. A
state is (token position, layer) of one of: the block's output (``"hidden"``), the MLP's output
(``"mlp"``) or the attention's output (``"attn"``); for the last two a ``window`` of adjacent
layers is restored together, as in the paper. The score of a state is the probability of the
target continuation (teacher-forced, all its tokens) with it restored, averaged over the noise
draws; its indirect effect is that minus the corrupted probability.

The noise's standard deviation defaults to 3 times the standard deviation of the embedding
matrix's entries (the paper: 3 times that of subject embeddings over a dataset).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from peftkern.editing.hooks import capture, edit_output, eval_mode
from peftkern.editing.layout import Layout, base_model, layout_of
from peftkern.editing.requests import EditError, EditRequest, as_request
from peftkern.editing.tokens import model_device, pad, subject_tokens, target_ids

KINDS = ("hidden", "mlp", "attn")


@dataclass
class Trace:
    """``scores[i, l]``: P(target) with the state at (``positions[i]``, layer l) restored."""
    scores: torch.Tensor
    clean: float
    corrupted: float
    kind: str
    window: int
    positions: list[int]
    tokens: list[str]
    subject: tuple[int, int]   # first and last token of the subject
    target: str

    @property
    def effect(self) -> torch.Tensor:
        """Indirect effect of each state: restored minus corrupted probability."""
        return self.scores - self.corrupted

    def as_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window, "clean": self.clean, "corrupted": self.corrupted,
                "positions": self.positions, "tokens": self.tokens, "subject": list(self.subject),
                "target": self.target, "scores": self.scores.tolist()}


def _module_template(layout: Layout, kind: str) -> str:
    return {"hidden": layout.layer, "mlp": layout.mlp, "attn": layout.attn}[kind]


def _window(layer: int, window: int, n_layers: int) -> list[int]:
    start = max(0, layer - window // 2)
    return list(range(start, min(n_layers, start + window)))


def _target_prob(logits: torch.Tensor, first: int, target: list[int]) -> torch.Tensor:
    """P(target | prompt) per row: product of the target tokens' probabilities [rows]."""
    logp = torch.log_softmax(logits[:, first:first + len(target)].float(), dim=-1)
    idx = torch.tensor(target, device=logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return logp.gather(-1, idx).squeeze(-1).sum(-1).exp()


@torch.no_grad()
def causal_trace(model, tok, request: EditRequest | dict, kind: str = "mlp", positions: str | list[int] = "all",
                 window: int = 1, samples: int = 10, noise: float | None = None, seed: int = 0,
                 target: str | None = None) -> Trace:
    """Trace ``request``'s prompt. ``target``: the continuation whose probability is measured
    (default: ``target_true``, the fact the model knows; else ``target_new``). ``positions``:
    ``"all"``, ``"subject_last"`` or a list of token indices."""
    request = as_request(request)
    if kind not in KINDS:
        raise EditError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise EditError(f"samples must be a positive integer, got {samples!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise EditError(f"window must be a positive integer, got {window!r}")
    layout = layout_of(model)
    base = base_model(model)
    device = model_device(model)
    target = target if target is not None else (request.target_true or request.target_new)
    text = request.text
    start, end = request.subject_span()
    first_subj, last_subj = subject_tokens(tok, text, (start, end))
    prompt, tgt = target_ids(tok, text, target)
    row = prompt + tgt[:-1]
    if positions == "all":
        positions = list(range(len(prompt)))
    elif positions == "subject_last":
        positions = [last_subj]
    elif not all(isinstance(p, int) and 0 <= p < len(prompt) for p in positions):
        raise EditError(f"positions must be 'all', 'subject_last' or token indices in [0, {len(prompt)}), got {positions!r}")
    positions = list(positions)
    batch = pad(tok, [row] * (samples + 1), device)
    embed = base.get_submodule(layout.embed)
    if noise is None:
        noise = 3.0 * float(embed.weight.float().std())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((samples, last_subj - first_subj + 1, embed.weight.shape[1]), generator=gen) * noise
    eps = eps.to(device)

    def corrupt(out):
        out = out.clone()
        out[1:, first_subj:last_subj + 1] += eps.to(out.dtype)
        return out

    template = _module_template(layout, kind)
    names = [template.format(l) for l in range(layout.n_layers)]
    first = len(prompt) - 1
    with eval_mode(model):
        with capture(base, names) as clean_states:
            clean = float(_target_prob(model(**batch.as_kwargs()).logits[:1], first, tgt)[0])
        clean_states = {k: v[0].clone() for k, v in clean_states.items()}
        with edit_output(base, layout.embed, corrupt):
            low = float(_target_prob(model(**batch.as_kwargs()).logits[1:], first, tgt).mean())
            scores = torch.zeros(len(positions), layout.n_layers)
            for i, pos in enumerate(positions):
                for layer in range(layout.n_layers):
                    restored = [names[l] for l in (_window(layer, window, layout.n_layers) if kind != "hidden" else [layer])]
                    with contextlib.ExitStack() as stack:
                        for name in restored:
                            stack.enter_context(edit_output(base, name, _restore(clean_states[name], pos)))
                        probs = _target_prob(model(**batch.as_kwargs()).logits[1:], first, tgt)
                    scores[i, layer] = float(probs.mean())
    tokens = [tok.decode([t]) for t in prompt]
    return Trace(scores, clean, low, kind, window if kind != "hidden" else 1, positions, tokens,
                 (first_subj, last_subj), target)


def _restore(clean: torch.Tensor, pos: int):
    def fn(out):
        out = out.clone()
        out[1:, pos] = clean[pos].to(out.dtype)
        return out
    return fn


def locate_layer(model, tok, request: EditRequest | dict, kind: str = "mlp", window: int = 1, samples: int = 10,
                 seed: int = 0) -> tuple[int, Trace]:
    """The layer whose ``kind`` state at the subject's last token has the largest indirect effect
    on the known answer (the paper's choice of the edited layer), and the trace behind it. When
    the subject is not at the end of the prompt, the last layer is left out: its MLP output at the
    subject reaches no later token."""
    trace = causal_trace(model, tok, request, kind=kind, positions="subject_last", window=window,
                         samples=samples, seed=seed)
    return int(reachable_effect(trace).argmax()), trace


def reachable_effect(trace: Trace) -> torch.Tensor:
    """The first traced position's effect per layer, without the last layer when the subject is not
    the prompt's last token (that layer's MLP output at the subject reaches no later token)."""
    effect = trace.effect[0]
    if trace.subject[1] < len(trace.tokens) - 1 and len(effect) > 1:
        effect = effect[:-1]
    return effect


def peak_layer(model, tok, requests: list, samples: int = 10, seed: int = 0, max_requests: int = 10) -> tuple[int, list[float]]:
    """The layer with the largest MLP indirect effect at the subject's last token, averaged over the
    traces of up to ``max_requests`` requests (how the papers chose their layers), and that mean
    effect per layer (the last layer left out as in :func:`locate_layer`)."""
    traces = [causal_trace(model, tok, r, kind="mlp", positions="subject_last", samples=samples, seed=seed)
              for r in requests[:max_requests]]
    effect = torch.stack([reachable_effect(t) for t in traces]).mean(0)
    return int(effect.argmax()), effect.tolist()
