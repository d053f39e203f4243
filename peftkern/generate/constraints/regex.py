"""Regular expressions compiled to a DFA whose states know how far they are from a match.

Decoding under a format needs three things Python's ``re`` cannot give: the state after a prefix (so
each token's text is checked from where the text so far left off), whether a state can still reach a
match, and the fewest characters that reach one (so the output can be closed before
``max_new_tokens``). This module parses a subset of Python's syntax into a Thompson NFA, builds the
whole DFA by subset construction, and computes each state's distance to acceptance.

Supported: literals and escapes (``\\n \\t \\xhh \\uhhhh``, escaped punctuation), ``.`` (any character
but newline), classes ``[a-z_]`` / ``[^...]``, ``\\d \\w \\s`` and their negations (ASCII meanings, as
with ``re.ASCII``), groups ``( )``, ``(?: )``, ``(?P<name> )``, alternation ``|``, quantifiers
``* + ? {m} {m,} {m,n}`` (lazy forms accepted: they match the same strings), ``^`` at the start and
``$`` at the end (the whole output must match anyway). Anything else (backreferences, lookaround,
inline flags, possessive quantifiers, ``\\b``) raises ValueError naming it and its position.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_CHAR = 0x10FFFF
MAX_REPEAT = 1000      # copies of a sub-pattern a bounded quantifier may expand to
MAX_DFA_STATES = 20000

# A character set: sorted, merged, inclusive (lo, hi) code point ranges.
CharSet = tuple


def _merge(ranges) -> CharSet:
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _negate(cs: CharSet) -> CharSet:
    out, start = [], 0
    for lo, hi in cs:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CHAR:
        out.append((start, MAX_CHAR))
    return tuple(out)


def _contains(cs: CharSet, code: int) -> bool:
    for lo, hi in cs:
        if code < lo:
            return False
        if code <= hi:
            return True
    return False


DIGIT = ((48, 57),)
WORD = _merge([(48, 57), (65, 90), (95, 95), (97, 122)])
SPACE = _merge([(9, 13), (32, 32)])
CLASS_ESCAPES = {"d": DIGIT, "D": _negate(DIGIT), "w": WORD, "W": _negate(WORD), "s": SPACE, "S": _negate(SPACE)}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
DOT = _negate(((10, 10),))


class RegexError(ValueError):
    """A pattern that is not valid, or uses a feature this engine does not support."""


# -- parsing ---------------------------------------------------------------------------------------
class _Parser:
    """Recursive descent over the pattern into tuples: ("set", CharSet), ("cat", [..]), ("alt", [..]),
    ("rep", node, min, max or None)."""

    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def fail(self, what: str, at: int | None = None):
        raise RegexError(f"regular expression {self.p!r}: {what} at position {self.i if at is None else at} "
                         "is not supported by the constrained decoder")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        node = self.alternation()
        if self.i != len(self.p):
            self.fail(f"unbalanced {self.p[self.i]!r}")
        return node

    def alternation(self):
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "^":
                if self.i != 0:
                    self.fail("'^' anywhere but the start")
                self.i += 1
                continue
            if self.peek() == "$":
                if self.i != len(self.p) - 1:
                    self.fail("'$' anywhere but the end")
                self.i += 1
                continue
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def quantified(self, node):
        while self.peek() is not None and self.peek() in "*+?{":
            start = self.i
            c = self.peek()
            if c == "{":
                m = re.match(r"\{(\d*)(,?)(\d*)\}", self.p[self.i:])
                if not m or (not m.group(1) and not m.group(3)):
                    return node  # a literal '{', as Python reads it
                low = int(m.group(1) or 0)
                high = low if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
                self.i += m.end()
            else:
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.i += 1
            if self.peek() == "+":
                self.fail("a possessive quantifier")
            if self.peek() == "?":
                self.i += 1  # lazy: same language
            if max(low, high or 0) > MAX_REPEAT:
                self.fail(f"a repetition count above {MAX_REPEAT}", start)
            node = ("rep", node, low, high)
        return node

    def atom(self):
        c = self.peek()
        if c == "(":
            start = self.i
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                end = self.p.find(">", self.i)
                self.i = end + 1
            elif self.peek() == "?":
                self.fail("this group kind (lookaround, inline flags, atomic group or conditional)", start)
            node = self.alternation()
            if self.peek() != ")":
                self.fail("an unterminated group", start)
            self.i += 1
            return node
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            self.i += 1
            return ("set", DOT)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        self.i += 1
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> CharSet:
        start = self.i
        self.i += 1
        c = self.peek()
        if c is None:
            self.fail("a trailing backslash", start)
        self.i += 1
        if c in CLASS_ESCAPES:
            return CLASS_ESCAPES[c]
        if c in CHAR_ESCAPES:
            code = ord(CHAR_ESCAPES[c])
        elif c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            self.i += width
            code = int(digits, 16)
        elif c == "b" and in_class:
            code = 8
        elif c.isalnum():
            self.fail(f"the escape \\{c}", start)
        else:
            code = ord(c)
        return ((code, code),)

    def char_class(self) -> CharSet:
        start = self.i
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                self.fail("an unterminated character class", start)
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "[" and self.p.startswith("[:", self.i):
                self.fail("POSIX classes")
            if c == "\\":
                cs = self.escape(in_class=True)
            else:
                self.i += 1
                cs = ((ord(c), ord(c)),)
            if len(cs) == 1 and cs[0][0] == cs[0][1] and self.peek() == "-" and self.i + 1 < len(self.p) \
                    and self.p[self.i + 1] != "]":
                self.i += 1
                if self.peek() == "\\":
                    hi = self.escape(in_class=True)
                    if len(hi) != 1 or hi[0][0] != hi[0][1]:
                        self.fail("a class escape as a range end")
                    hi_code = hi[0][0]
                else:
                    hi_code = ord(self.peek())
                    self.i += 1
                ranges.append((cs[0][0], hi_code))
            else:
                ranges.extend(cs)
        merged = _merge(ranges)
        return _negate(merged) if negated else merged


# -- NFA -----------------------------------------------------------------------------------------
class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[CharSet, int]]] = []

    def new(self) -> int:
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node, start: int) -> int:
        """Add ``node`` after ``start``; return its end state."""
        kind = node[0]
        if kind == "set":
            end = self.new()
            self.edges[start].append((node[1], end))
            return end
        if kind == "cat":
            for item in node[1]:
                start = self.build(item, start)
            return start
        if kind == "alt":
            end = self.new()
            for branch in node[1]:
                s = self.new()
                self.eps[start].append(s)
                self.eps[self.build(branch, s)].append(end)
            return end
        _, sub, low, high = node
        for _ in range(low):
            start = self.build(sub, start)
        if high is None:
            loop = self.new()
            self.eps[start].append(loop)
            self.eps[self.build(sub, loop)].append(loop)
            return loop
        end = self.new()
        self.eps[start].append(end)
        for _ in range(high - low):
            start = self.build(sub, start)
            self.eps[start].append(end)
        return end

    def closure(self, states) -> frozenset:
        seen = set(states)
        stack = list(states)
        while stack:
            for t in self.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


# -- DFA -----------------------------------------------------------------------------------------
@dataclass
class RegexDFA:
    """The DFA of a pattern: state 0 is the start; ``step(state, char)`` -> next state or -1 (no match
    can follow); ``accepting[s]``; ``distance[s]`` = fewest characters from ``s`` to a match (a large
    number when none can be reached; such states are never entered)."""
    pattern: str
    accepting: list[bool]
    distance: list[int]
    _nfa: _NFA = field(repr=False)
    _sets: list[frozenset] = field(repr=False)
    _index: dict = field(repr=False)
    _moves: dict = field(default_factory=dict, repr=False)

    UNREACHABLE = 1 << 30

    def step(self, state: int, char: str) -> int:
        key = (state, char)
        hit = self._moves.get(key)
        if hit is None:
            code = ord(char)
            targets = [t for s in self._sets[state] for cs, t in self._nfa.edges[s] if _contains(cs, code)]
            hit = self._index.get(self._nfa.closure(targets), -1) if targets else -1
            if hit >= 0 and self.distance[hit] >= self.UNREACHABLE:
                hit = -1
            self._moves[key] = hit
        return hit

    def walk(self, state: int, text: str) -> int:
        for ch in text:
            state = self.step(state, ch)
            if state < 0:
                return -1
        return state

    def fullmatch(self, text: str) -> bool:
        s = self.walk(0, text)
        return s >= 0 and self.accepting[s]


def compile_regex(pattern: str) -> RegexDFA:
    """The DFA of ``pattern`` (whole-string match). Raises RegexError for an invalid or unsupported
    pattern, or one whose match set is empty."""
    if not isinstance(pattern, str):
        raise RegexError(f"a regular expression must be a string, got {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RegexError(f"invalid regular expression {pattern!r}: {exc.msg} at position {exc.pos}") from None
    nfa = _NFA()
    start = nfa.new()
    accept = nfa.build(_Parser(pattern).parse(), start)

    sets = [nfa.closure([start])]
    index = {sets[0]: 0}
    graph: list[set[int]] = []
    i = 0
    while i < len(sets):
        moves = _symbol_moves(nfa, sets[i])
        succ = set()
        for targets in moves:
            key = nfa.closure(targets)
            if key not in index:
                if len(sets) >= MAX_DFA_STATES:
                    raise RegexError(f"regular expression {pattern!r} needs more than {MAX_DFA_STATES} DFA states")
                index[key] = len(sets)
                sets.append(key)
            succ.add(index[key])
        graph.append(succ)
        i += 1
    accepting = [accept in s for s in sets]
    distance = _distances(graph, accepting)
    if distance[0] >= RegexDFA.UNREACHABLE:
        raise RegexError(f"regular expression {pattern!r} matches no string")
    return RegexDFA(pattern, accepting, distance, nfa, sets, index)


def _symbol_moves(nfa: _NFA, states: frozenset) -> list[list[int]]:
    """For each class of characters that moves ``states`` alike, the NFA states it moves to."""
    edges = [e for s in states for e in nfa.edges[s]]
    if not edges:
        return []
    cuts = {0, MAX_CHAR + 1}
    for cs, _ in edges:
        for lo, hi in cs:
            cuts.update((lo, hi + 1))
    points = sorted(cuts)
    out, seen = [], set()
    for lo in points[:-1]:
        targets = tuple(sorted(t for cs, t in edges if _contains(cs, lo)))
        if targets and targets not in seen:
            seen.add(targets)
            out.append(list(targets))
    return out


def _distances(graph: list[set[int]], accepting: list[bool]) -> list[int]:
    """Fewest characters from each state to an accepting one (BFS on the reversed graph)."""
    reverse: list[list[int]] = [[] for _ in graph]
    for s, succ in enumerate(graph):
        for t in succ:
            reverse[t].append(s)
    dist = [RegexDFA.UNREACHABLE] * len(graph)
    frontier = [s for s, a in enumerate(accepting) if a]
    for s in frontier:
        dist[s] = 0
    while frontier:
        nxt = []
        for t in frontier:
            for s in reverse[t]:
                if dist[s] > dist[t] + 1:
                    dist[s] = dist[t] + 1
                    nxt.append(s)
        frontier = nxt
    return dist
