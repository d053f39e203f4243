"""Per-unit losses over token log-probs, for ``peftkern.ops.logprobs.fused_unit_loss``: what a loss
sees of one chunk, how it returns its gradient, the table of registered losses, and how a batch
is cut into chunks of whole units.

A *unit* is the smallest group of sequences whose loss does not depend on any other: a
preference pair (DPO family, SimPO, CPO, ORPO), one sequence (KTO with a detached KL reference
point, GRPO with sequence-level importance sampling), or one token (SFT cross-entropy, GRPO with
token-level importance sampling: a *token-local* loss). The batch is laid out [G, U, T]: U units
of G sequences (G = 2 for pairs: the U chosen sequences, then the U rejected ones), each sequence
T tokens long, flattened to positions p = (g * U + u) * T + t.

For each chunk of whole units the op computes the chunk's per-token statistics, calls the
registered loss once, and turns the loss's gradient with respect to those statistics into the
gradient of the head's inputs before the next chunk (three vocabulary GEMMs: logits, G W, G^T h).
A unit whose tokens do not fit in one chunk is *split*: its statistics are gathered block by
block, the loss is called once with all of them, and the blocks are recomputed for the gradient.

Writing a loss (the extension point; see docs/losses.md):

    def my_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
        s = chunk.sequence_sums(chunk.logp)              # [G, Uc] sequence log-probs
        ref = tensors[0].view(chunk.group, -1)[:, chunk.u0:chunk.u1]
        value = ...                                      # this chunk's share of the loss (0-dim fp32)
        alpha = ...                                      # d value / d s, [G, Uc]
        return UnitGrads(value, chunk.per_token(alpha))  # d value / d logp of every token

    register_unit_loss("my_loss", my_loss)

The function must be exact (the analytic gradient of its value), use only torch ops on the tiny
per-token tensors it is given, and never look at another chunk: the op sums the values of all
chunks and never calls it twice on one unit.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch


class UnitGrads(NamedTuple):
    """What a unit loss returns for one chunk: its value (0-dim fp32, the chunk's share of the loss)
    and the gradient of that value with respect to each token statistic it read ([n] fp32, or None
    for a statistic the value does not depend on)."""

    value: torch.Tensor
    d_logp: torch.Tensor | None
    d_entropy: torch.Tensor | None = None
    d_mean_logp: torch.Tensor | None = None


@dataclasses.dataclass
class UnitChunk:
    """One chunk as a loss sees it.

    ``pos`` [n] int64: flat positions (into the [G * U * T] token grid) of the chunk's tokens;
    ``scored`` [n] bool: whether each carries a target (the rest are ignored positions, whose
    statistics are 0 and whose gradients the op drops); ``logp`` [n] fp32: log p(target);
    ``entropy`` / ``mean_logp`` [n] fp32 when the op was asked for them, else None.
    ``u0:u1`` is the range of whole units in the chunk (``None`` for a token-local loss, whose
    chunks may cut sequences anywhere). ``group``, ``num_units``, ``seq_len``: the layout G, U, T.
    """

    pos: torch.Tensor
    scored: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None
    mean_logp: torch.Tensor | None
    u0: int | None
    u1: int | None
    group: int
    num_units: int
    seq_len: int

    @property
    def sequence(self) -> torch.Tensor:
        """[n] the sequence (0 .. G * U - 1) of each token."""
        return torch.div(self.pos, self.seq_len, rounding_mode="floor")

    def _slot(self) -> torch.Tensor:
        """[n] index of each token's sequence in the [G, Uc] layout of this chunk's units."""
        if self.u0 is None:
            raise ValueError("sequence sums need whole units: register this loss with token_local=False")
        seq = self.sequence
        g = torch.div(seq, self.num_units, rounding_mode="floor")
        return g * (self.u1 - self.u0) + (seq - g * self.num_units - self.u0)

    def sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """[n] per-token values -> [G, Uc] their sum over each sequence of the chunk's units
        (0 for a sequence with no tokens: an empty unit still has its loss)."""
        out = values.new_zeros(self.group * (self.u1 - self.u0))
        return out.index_add_(0, self._slot(), values).view(self.group, -1)

    def sequence_tokens(self) -> torch.Tensor:
        """[G, Uc] fp32: how many scored tokens each sequence has."""
        return self.sequence_sums(self.scored.float())

    def per_token(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """[G, Uc] -> [n]: each token gets its sequence's value."""
        return per_sequence.reshape(-1).index_select(0, self._slot())

    def unit_slice(self, values: torch.Tensor) -> torch.Tensor:
        """A per-sequence tensor of the whole batch ([G * U] or [G * U, ...]) -> [G, Uc, ...], this
        chunk's units."""
        grid = values.reshape(self.group, self.num_units, *values.shape[1:])
        return grid[:, self.u0:self.u1]


LossFn = Callable[[UnitChunk, list, list, str], UnitGrads]


@dataclasses.dataclass(frozen=True)
class UnitLoss:
    """A registered loss: ``fn(chunk, tensors, scalars, variant) -> UnitGrads``. ``token_local``:
    each token's gradient depends on that token's statistics alone (chunks may cut units)."""

    name: str
    fn: LossFn
    token_local: bool = False


_LOSSES: dict[str, UnitLoss] = {}


def register_unit_loss(name: str, fn: LossFn, *, token_local: bool = False) -> UnitLoss:
    """Make ``fn`` callable by name from ``fused_unit_loss`` (the registered op takes the name, so
    ``torch.compile`` traces through it). Registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_unit_loss: name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"register_unit_loss: fn must be callable, got {type(fn).__name__}")
    entry = UnitLoss(name, fn, bool(token_local))
    _LOSSES[name] = entry
    return entry


def unit_loss(name: str) -> UnitLoss:
    if name not in _LOSSES:
        raise ValueError(f"no unit loss {name!r} is registered (known: {', '.join(sorted(_LOSSES)) or 'none'})")
    return _LOSSES[name]


def linear_loss(chunk: UnitChunk, tensors: list, scalars: list, variant: str) -> UnitGrads:
    """sum_i c_logp[i] logp[i] + c_mean[i] mean_logp[i] (tensors: c_logp [N], optionally c_mean [N]):
    SFT cross-entropy with label smoothing, or any fixed linear functional of the log-probs."""
    c_logp = tensors[0].index_select(0, chunk.pos)
    value = torch.dot(c_logp, chunk.logp)
    c_mean = None
    if len(tensors) > 1:
        c_mean = tensors[1].index_select(0, chunk.pos)
        value = value + torch.dot(c_mean, chunk.mean_logp)
    return UnitGrads(value, c_logp, None, c_mean)


register_unit_loss("linear", linear_loss, token_local=True)


# ---------------------------------------------------------------------------------------------
# cutting a batch into chunks
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ChunkPlan:
    """Positions of one chunk; ``blocks`` (a list of position tensors) when it is one unit too large
    for a chunk, processed block by block."""

    pos: torch.Tensor
    u0: int | None
    u1: int | None
    blocks: list | None = None


def _unit_positions(layout, u0: int, u1: int, device) -> torch.Tensor:
    """Every position of units u0 .. u1 - 1, ordered by sequence then token."""
    G, U, T = layout
    starts = (torch.arange(G, device=device) * U + u0) * T
    span = torch.arange((u1 - u0) * T, device=device)
    return (starts[:, None] + span[None, :]).reshape(-1)


def _blocks(pos: torch.Tensor, size: int) -> list:
    return [pos[s:s + size] for s in range(0, pos.numel(), size)] or [pos]


def plan_compact(scored: torch.Tensor, layout, chunk: int, token_local: bool) -> list[ChunkPlan]:
    """Chunks of at most ``chunk`` scored tokens (ignored positions left out: they cost nothing),
    whole units unless ``token_local``; a unit with more scored tokens than ``chunk`` is split into
    blocks. Reads the per-unit counts on the host (the torch face's plan)."""
    G, U, T = layout
    if token_local:
        pos = scored.nonzero().squeeze(1)
        return [ChunkPlan(p, None, None) for p in _blocks(pos, chunk)] if pos.numel() else []
    counts = scored.view(G, U, T).sum((0, 2)).tolist()
    grid = scored.view(G, U, T)

    def positions(u0, u1):
        g, u, t = grid[:, u0:u1].nonzero().unbind(1)
        return (g * U + u + u0) * T + t

    plans, start, used = [], 0, 0
    for u, n in enumerate(counts):
        if n > chunk:
            if start < u:
                plans.append(ChunkPlan(positions(start, u), start, u))
            pos = positions(u, u + 1)
            plans.append(ChunkPlan(pos, u, u + 1, _blocks(pos, chunk)))
            start, used = u + 1, 0
        elif used + n > chunk:
            plans.append(ChunkPlan(positions(start, u), start, u))
            start, used = u, n
        else:
            used += n
    if start < U:
        plans.append(ChunkPlan(positions(start, U), start, U))
    return plans


def plan_dense(num_tokens: int, layout, chunk: int, token_local: bool, device) -> list[ChunkPlan]:
    """Chunks from the shapes alone (no host sync; the Triton face's plan): every position of
    ``chunk // (G * T)`` whole units per chunk (ignored positions included: the kernels skip their
    tiles), or ``chunk`` consecutive tokens for a token-local loss; a unit longer than ``chunk`` is
    split into blocks."""
    G, U, T = layout
    if token_local:
        return [ChunkPlan(torch.arange(s, min(s + chunk, num_tokens), device=device), None, None)
                for s in range(0, num_tokens, chunk)]
    per_unit = G * T
    if per_unit > chunk:
        plans = []
        for u in range(U):
            pos = _unit_positions(layout, u, u + 1, device)
            plans.append(ChunkPlan(pos, u, u + 1, _blocks(pos, chunk)))
        return plans
    step = max(1, chunk // max(per_unit, 1))
    return [ChunkPlan(_unit_positions(layout, u, min(u + step, U), device), u, min(u + step, U))
            for u in range(0, U, step)]
