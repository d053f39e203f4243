"""Rule constraints as logits processors: a regular expression or a JSON-schema-like format the whole
output must match, words it must not contain, words it must contain.

Each is a ``transformers.LogitsProcessor`` (``processor(input_ids [B, T], scores [B, V]) -> scores``):
tokens that would break the rule get ``-inf``. They work in ``peftkern.generate`` (which tells them
``max_new_tokens`` and the end-of-sequence ids) and in transformers' ``generate`` (pass
``max_new_tokens`` / ``eos_token_ids`` to the constructor). The first call of a generation records
the prompt width; later calls read the tokens chosen since. Text is the concatenation of the tokens'
texts (``vocab.token_texts``); special tokens other than end-of-sequence are never allowed.

With ``max_new_tokens`` known, formats are closed in time: a token is allowed only if a match can
still be completed in the tokens left (counting one character per token, which byte-level and
byte-fallback vocabularies always offer), and required words are written out when the tokens left
are just enough for them.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from peftkern.generate.constraints.regex import RegexDFA, compile_regex
from peftkern.generate.constraints.schema import schema_to_regex
from peftkern.generate.constraints.vocab import token_texts


class TextConstraint(LogitsProcessor):
    """Shared bookkeeping: prompt width, per-row state, rows that have ended, the token budget."""

    def __init__(self, tokenizer, max_new_tokens: int | None = None, eos_token_ids=None):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos = _ids(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_id)
        self.reset()

    def prepare(self, eos_token_ids=None, max_new_tokens: int | None = None) -> None:
        """Fill in what the constructor was not told (peftkern.generate calls this)."""
        if not self.eos and eos_token_ids is not None:
            self.eos = _ids(eos_token_ids)
        if self.max_new_tokens is None and max_new_tokens is not None:
            self.max_new_tokens = max_new_tokens

    def reset(self) -> None:
        self._width = None
        self._prompt = None
        self._states = None
        self._ended = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        batch, width = input_ids.shape
        if self._width is None or width <= self._width or batch != len(self._states):
            self._prompt = width
            self._states = [self.start_state() for _ in range(batch)]
            self._ended = [False] * batch
            self._texts = token_texts(self.tokenizer, scores.shape[-1])
            self.begin(batch)
        else:
            for t in range(self._width, width):
                for row in range(batch):
                    if self._ended[row]:
                        continue
                    tok = int(input_ids[row, t])
                    if tok in self.eos:
                        self._ended[row] = True
                    else:
                        self._states[row] = self.advance(row, self._states[row], tok)
        self._width = width
        remaining = None if self.max_new_tokens is None else self.max_new_tokens - (width - self._prompt)
        allowed = torch.ones_like(scores, dtype=torch.bool)
        for row in range(batch):
            if not self._ended[row]:
                allowed[row] = self.allowed(row, self._states[row], remaining, scores.shape[-1]).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def _eos_mask(self, vocab: int, on: bool) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool)
        if on:
            for e in self.eos:
                if e < vocab:
                    mask[e] = True
        return mask

    # subclasses -----------------------------------------------------------------------------------
    def begin(self, batch: int) -> None:
        """A new generation of ``batch`` rows starts."""

    def start_state(self):
        raise NotImplementedError

    def advance(self, row: int, state, token: int):
        raise NotImplementedError

    def allowed(self, row: int, state, remaining: int | None, vocab: int) -> torch.Tensor:
        """[V] bool: tokens allowed next."""
        raise NotImplementedError


class RegexConstraint(TextConstraint):
    """The whole output matches ``pattern`` (see constraints.regex for the syntax). End-of-sequence
    is allowed only on a match; when a match cannot grow further, it is the only token left."""

    def __init__(self, tokenizer, pattern: str, max_new_tokens: int | None = None, eos_token_ids=None):
        self.dfa: RegexDFA = compile_regex(pattern)
        self._table: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(tokenizer, max_new_tokens, eos_token_ids)
        if not self.eos:
            raise ValueError("a format constraint needs the end-of-sequence token id to end the output on a match; "
                             "the tokenizer has none: pass eos_token_ids")

    def prepare(self, eos_token_ids=None, max_new_tokens: int | None = None) -> None:
        super().prepare(eos_token_ids, max_new_tokens)
        need = self.dfa.distance[0]
        if self.max_new_tokens is not None and need > self.max_new_tokens:
            raise ValueError(f"the format {self.dfa.pattern!r} needs at least {need} characters, more than "
                             f"max_new_tokens={self.max_new_tokens}")

    def start_state(self):
        return 0

    def advance(self, row, state, token):
        if state < 0:
            return state
        nxt, _ = self._moves(state, len(self._texts))
        return int(nxt[token]) if token < len(nxt) else -1

    def _moves(self, state: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(next state per token, -1 if not allowed; distance to a match after each token)."""
        hit = self._table.get(state)
        if hit is None or len(hit[0]) != vocab:
            nxt = torch.full((vocab,), -1, dtype=torch.long)
            dist = torch.full((vocab,), RegexDFA.UNREACHABLE, dtype=torch.long)
            for i, text in enumerate(self._texts[:vocab]):
                if text is None:
                    continue
                s = self.dfa.walk(state, text)
                if s >= 0:
                    nxt[i] = s
                    dist[i] = self.dfa.distance[s]
            hit = self._table[state] = (nxt, dist)
        return hit

    def allowed(self, row, state, remaining, vocab):
        if state < 0:  # a token this constraint did not allow was forced in: nothing more to enforce
            return torch.ones(vocab, dtype=torch.bool)
        _, dist = self._moves(state, vocab)
        limit = RegexDFA.UNREACHABLE - 1 if remaining is None else remaining - 1
        ok = dist <= limit
        ok |= self._eos_mask(vocab, self.dfa.accepting[state])
        return ok

    def is_match(self, text: str) -> bool:
        return self.dfa.fullmatch(text)


class JsonConstraint(RegexConstraint):
    """The output is JSON of ``schema``, a JSON-schema-like dict (see constraints.schema), written
    compactly with ``", "`` and ``": "`` separators and properties in the schema's order."""

    def __init__(self, tokenizer, schema: dict, max_new_tokens: int | None = None, eos_token_ids=None):
        self.schema = schema
        super().__init__(tokenizer, schema_to_regex(schema), max_new_tokens, eos_token_ids)


class BannedWords(TextConstraint):
    """The output never contains any of ``words`` (as substrings; case-insensitive unless
    ``case_sensitive``), whichever tokens would spell them."""

    def __init__(self, tokenizer, words, case_sensitive: bool = False, eos_token_ids=None):
        self.words = [w if case_sensitive else w.lower() for w in _word_list(words, "banned")]
        self.case_sensitive = case_sensitive
        self._tables = None
        super().__init__(tokenizer, None, eos_token_ids)

    def _fold(self, text: str) -> str:
        return text if self.case_sensitive else text.lower()

    def _build(self, vocab: int) -> None:
        texts = [None if t is None else self._fold(t) for t in self._texts[:vocab]]
        self._always = torch.tensor([t is None or any(w in t for w in self.words) for t in texts], dtype=torch.bool)
        self._completes = {}  # (word, k): tokens whose text starts with word[k:]
        for w in self.words:
            for k in range(1, len(w)):
                rest = w[k:]
                self._completes[(w, k)] = torch.tensor([t is not None and t.startswith(rest) for t in texts],
                                                       dtype=torch.bool)
        self._tables = vocab

    def start_state(self):
        return ""

    def advance(self, row, state, token):
        text = self._texts[token] if token < len(self._texts) else None
        keep = max(len(w) for w in self.words)
        return (state + self._fold(text or ""))[-keep:]

    def allowed(self, row, state, remaining, vocab):
        if self._tables != vocab:
            self._build(vocab)
        banned = self._always.clone()
        for w in self.words:
            for k in range(1, len(w)):
                if state.endswith(w[:k]):
                    banned |= self._completes[(w, k)]
        ok = ~banned
        ok |= self._eos_mask(vocab, True)
        return ok


class RequiredWords(TextConstraint):
    """The output contains every one of ``words`` (case-sensitive unless ``case_sensitive=False``).

    End-of-sequence waits until all are present; when the tokens left are just enough to write the
    missing ones, they are written out (each after a space), so every output has them as long as
    ``max_new_tokens`` leaves room."""

    def __init__(self, tokenizer, words, case_sensitive: bool = True, max_new_tokens: int | None = None,
                 eos_token_ids=None):
        self.words = _word_list(words, "required")
        self.case_sensitive = case_sensitive
        self._spelled = {w: list(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in self.words}
        for w, ids in self._spelled.items():
            if w not in tokenizer.decode(ids):
                raise ValueError(f"required word {w!r}: the tokenizer does not spell it back from its own tokens")
        super().__init__(tokenizer, max_new_tokens, eos_token_ids)

    def prepare(self, eos_token_ids=None, max_new_tokens: int | None = None) -> None:
        super().prepare(eos_token_ids, max_new_tokens)
        need = sum(len(ids) for ids in self._spelled.values())
        if self.max_new_tokens is not None and need > self.max_new_tokens:
            raise ValueError(f"the required words {self.words} take {need} tokens, more than "
                             f"max_new_tokens={self.max_new_tokens}")

    def start_state(self):
        return {"text": "", "queue": []}

    def advance(self, row, state, token):
        if state["queue"] and state["queue"][0] == token:
            state["queue"].pop(0)
        text = self._texts[token] if token < len(self._texts) else None
        state["text"] += text or ""
        return state

    def _missing(self, text: str) -> list[str]:
        hay = text if self.case_sensitive else text.lower()
        return [w for w in self.words if (w if self.case_sensitive else w.lower()) not in hay]

    def allowed(self, row, state, remaining, vocab):
        only = None
        missing = self._missing(state["text"])
        if state["queue"]:
            only = state["queue"][0]
        elif missing and remaining is not None and remaining <= sum(len(self._spelled[w]) for w in missing):
            state["queue"] = list(self._spelled[missing[0]])
            only = state["queue"][0]
        if only is not None:
            ok = torch.zeros(vocab, dtype=torch.bool)
            ok[only] = True
            return ok
        return ~self._eos_mask(vocab, bool(missing))


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]


def _word_list(words, kind: str) -> list[str]:
    if isinstance(words, str):
        words = [words]
    words = list(words)
    if not words or any(not isinstance(w, str) or not w for w in words):
        raise ValueError(f"{kind} words must be a non-empty list of non-empty strings, got {words!r}")
    return words
