"""Rule checks for instruction following: each check is a dict ``{"type": ..., ...}`` and
``check(output, rule, prompt) -> bool``. The types:

``max_words`` / ``min_words`` (``n``), ``max_chars`` (``n``), ``sentences`` (exactly ``n``),
``uppercase`` / ``lowercase`` (every letter; at least one letter), ``title_case``, ``one_line``,
``contains`` / ``excludes`` (``words``; ``case_sensitive``, default true), ``starts_with`` /
``ends_with`` (``text``; ``strip_punctuation`` for the end), ``regex`` (``pattern``, whole output
after stripping whitespace, Python syntax), ``json`` (parses; optional ``schema``, the
JSON-schema-like subset of peftkern.generate.constraints), ``no_echo`` (the output does not repeat
the user's request, nor contain ``text`` if given).
"""
from __future__ import annotations

import json
import re
import string

from peftkern.generate.constraints import matches_schema

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _need(rule: dict, key: str):
    if key not in rule:
        raise ValueError(f"rule {rule!r}: missing {key!r}")
    return rule[key]


def _user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _letters(text: str) -> list[str]:
    return [c for c in text if c.isalpha()]


def check(output: str, rule: dict, prompt=None) -> bool:
    """Whether ``output`` follows ``rule``; an unknown rule type is a ValueError."""
    kind = rule.get("type")
    text = output.strip()
    if kind == "max_words":
        return len(words(text)) <= int(_need(rule, "n"))
    if kind == "min_words":
        return len(words(text)) >= int(_need(rule, "n"))
    if kind == "max_chars":
        return len(text) <= int(_need(rule, "n"))
    if kind == "sentences":
        parts = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        return len(parts) == int(_need(rule, "n")) and bool(text) and text[-1] in ".!?"
    if kind in ("uppercase", "lowercase"):
        letters = _letters(text)
        return bool(letters) and all(c.isupper() if kind == "uppercase" else c.islower() for c in letters)
    if kind == "title_case":
        ws = words(text)
        return bool(ws) and all(w[0].isupper() for w in ws if len(w) > 3)
    if kind == "one_line":
        return bool(text) and "\n" not in text
    if kind in ("contains", "excludes"):
        targets = _need(rule, "words")
        targets = [targets] if isinstance(targets, str) else list(targets)
        hay = text if rule.get("case_sensitive", True) else text.lower()
        found = [(t if rule.get("case_sensitive", True) else t.lower()) in hay for t in targets]
        return all(found) if kind == "contains" else not any(found)
    if kind == "starts_with":
        return text.startswith(_need(rule, "text"))
    if kind == "ends_with":
        end = text.rstrip(string.punctuation + " ") if rule.get("strip_punctuation") else text
        return end.endswith(_need(rule, "text"))
    if kind == "regex":
        return re.fullmatch(_need(rule, "pattern"), text) is not None
    if kind == "json":
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return "schema" not in rule or matches_schema(value, rule["schema"])
    if kind == "no_echo":
        banned = rule.get("text") or _user_text(prompt)
        return bool(text) and (not banned or banned.strip().lower() not in text.lower())
    raise ValueError(f"unknown rule type {kind!r} in {rule!r}")


RULE_TYPES = ("max_words", "min_words", "max_chars", "sentences", "uppercase", "lowercase", "title_case", "one_line",
              "contains", "excludes", "starts_with", "ends_with", "regex", "json", "no_echo")


def validate_rules(rules, where: str) -> None:
    """Raise ValueError naming ``where`` for a malformed list of rules."""
    if not isinstance(rules, list) or not rules:
        raise ValueError(f"{where}: 'checks' must be a non-empty list of rules")
    for r in rules:
        if not isinstance(r, dict) or r.get("type") not in RULE_TYPES:
            raise ValueError(f"{where}: rule {r!r} has no known 'type' (types: {list(RULE_TYPES)})")
        if r["type"] == "regex":
            try:
                re.compile(_need(r, "pattern"))
            except re.error as exc:
                raise ValueError(f"{where}: invalid regular expression {r['pattern']!r}: {exc}") from None


REFUSAL = re.compile(r"\b(i can(no|')t|i cannot|i won'?t|i will not|i'm not able|i am not able|i'm unable|"
                     r"i am unable|sorry|i apologi[sz]e|as an ai|not (?:able|going) to help|can't help|"
                     r"cannot help|can't assist|cannot assist|against (?:my|the) (?:policy|guidelines))\b", re.I)


def is_refusal(output: str) -> bool:
    """A refusal phrase ("I can't", "I won't", "Sorry", ...) in the output."""
    return REFUSAL.search(output) is not None
