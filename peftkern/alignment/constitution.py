"""A constitution: principles, each with a critique request and a revision request, optional rule
checks (a rule-based critic), optional few-shot examples; read from YAML or JSON and checked, every
error naming the file and the key (``default.yaml: principles[2]: missing 'revision_request'``).

Layout (YAML; JSON with the same keys)::

    name: tasks                       # optional, default: the file's stem
    comparison: "Which answer ..."    # optional: the RLAIF question; {principle} is replaced by the principle
    principles:
      - name: answer-only
        critique_request: "Point out where the answer says more than the result."
        revision_request: "Rewrite the answer as the result alone."
        comparison: "..."             # optional, this principle's own RLAIF question
        checks: [{type: one_line}, {type: max_words, n: 1}]   # optional: peftkern.evaluation.rules checks
    examples:                          # optional few-shot chains shown before the critique / revision
      - {prompt: "...", answer: "...", critique: "...", revision: "..."}

``checks`` take the rule types of :mod:`peftkern.evaluation.rules` plus ``task_form`` (the form a
bundled question of the embedded model asks for: capitals, lower case or digits).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from peftkern.evaluation import rules
from peftkern.evaluation.suites import task_form_check

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constitutions")
BUNDLED = ("default", "tasks")
EXTRA_RULE_TYPES = ("task_form",)
DEFAULT_COMPARISON = ("Consider the conversation below and two possible answers.\n{principle}\n"
                      "Conversation:\n{prompt}\nOptions:\n(A) {a}\n(B) {b}\nThe better answer is")
_PRINCIPLE_KEYS = ("name", "critique_request", "revision_request", "comparison", "checks")
_EXAMPLE_KEYS = ("prompt", "answer", "critique", "revision")


class ConstitutionError(ValueError):
    """A constitution file that cannot be used; the message names the file and the key."""


@dataclass
class Principle:
    name: str
    critique_request: str
    revision_request: str
    comparison: str | None = None        # this principle's RLAIF question (default: the constitution's)
    checks: list[dict] = field(default_factory=list)

    def follows(self, output: str, prompt) -> bool | None:
        """Whether ``output`` passes every check (None when the principle has none)."""
        if not self.checks:
            return None
        return all(check_rule(output, rule, prompt) for rule in self.checks)

    def failed(self, output: str, prompt) -> list[str]:
        """The types of the checks ``output`` fails."""
        return [r["type"] for r in self.checks if not check_rule(output, r, prompt)]


@dataclass
class Constitution:
    name: str
    principles: list[Principle]
    comparison: str = DEFAULT_COMPARISON
    examples: list[dict] = field(default_factory=list)
    path: str | None = None

    @property
    def has_checks(self) -> bool:
        return any(p.checks for p in self.principles)

    def follows(self, output: str, prompt) -> bool | None:
        """Whether ``output`` passes every principle's checks (None when no principle has checks)."""
        verdicts = [p.follows(output, prompt) for p in self.principles if p.checks]
        return all(verdicts) if verdicts else None

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(f"{self.path or self.name}: no principle named {name!r} "
                       f"(principles: {', '.join(p.name for p in self.principles)})")


def user_text(prompt) -> str:
    """The last user turn of a conversation, or the prompt string."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def check_rule(output: str, rule: dict, prompt) -> bool:
    """One check: ``task_form`` here, the rest by :func:`peftkern.evaluation.rules.check`."""
    if rule.get("type") == "task_form":
        return rules.check(output, task_form_check(user_text(prompt)), prompt)
    return rules.check(output, rule, prompt)


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConstitutionError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _read(path: str):
    if not os.path.isfile(path):
        raise ConstitutionError(f"{path}: no such constitution file"
                                + (" (a directory)" if os.path.isdir(path) else "")
                                + f"; or name a bundled one: {', '.join(BUNDLED)}")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConstitutionError(f"{path}: not UTF-8 text (offset {exc.start})") from None
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConstitutionError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConstitutionError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None


def _checks(value, where: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConstitutionError(f"{where}: expected a list of rule checks, got {type(value).__name__}")
    plain = [r for r in value if not (isinstance(r, dict) and r.get("type") in EXTRA_RULE_TYPES)]
    if plain:
        try:
            rules.validate_rules(plain, where)
        except ValueError as exc:
            text = str(exc)
            raise ConstitutionError(text.replace("'checks' must be", "checks must be") + (
                f" (or one of {list(EXTRA_RULE_TYPES)})" if "known 'type'" in text else "")) from None
    return [dict(r) for r in value]


def parse_constitution(data, path: str) -> Constitution:
    """A Constitution from parsed YAML/JSON ``data``; ``path`` names it in errors."""
    if not isinstance(data, dict):
        raise ConstitutionError(f"{path}: expected a mapping with 'principles', got "
                                f"{'an empty file' if data is None else type(data).__name__}")
    unknown = sorted(set(data) - {"name", "principles", "examples", "comparison", "description"})
    if unknown:
        raise ConstitutionError(f"{path}: unknown key(s) {unknown} (known: name, description, principles, "
                                "comparison, examples)")
    raw = data.get("principles")
    if not isinstance(raw, list) or not raw:
        raise ConstitutionError(f"{path}: principles: expected a non-empty list of principles, got {raw!r}")
    principles, names = [], set()
    for i, p in enumerate(raw):
        where = f"{path}: principles[{i}]"
        if not isinstance(p, dict):
            raise ConstitutionError(f"{where}: expected a mapping, got {type(p).__name__}")
        bad = sorted(set(p) - set(_PRINCIPLE_KEYS))
        if bad:
            raise ConstitutionError(f"{where}: unknown key(s) {bad} (known: {', '.join(_PRINCIPLE_KEYS)})")
        for key in ("critique_request", "revision_request"):
            if key not in p:
                raise ConstitutionError(f"{where}: missing {key!r}")
        name = _text(p.get("name", f"principle-{i}"), f"{where}.name")
        if name in names:
            raise ConstitutionError(f"{where}.name: {name!r} is used twice")
        names.add(name)
        comparison = p.get("comparison")
        principles.append(Principle(
            name, _text(p["critique_request"], f"{where}.critique_request"),
            _text(p["revision_request"], f"{where}.revision_request"),
            None if comparison is None else _text(comparison, f"{where}.comparison"),
            _checks(p.get("checks"), f"{where}.checks")))
    examples = data.get("examples") or []
    if not isinstance(examples, list):
        raise ConstitutionError(f"{path}: examples: expected a list, got {type(examples).__name__}")
    for i, ex in enumerate(examples):
        where = f"{path}: examples[{i}]"
        if not isinstance(ex, dict):
            raise ConstitutionError(f"{where}: expected a mapping, got {type(ex).__name__}")
        for key in _EXAMPLE_KEYS:
            if key not in ex:
                raise ConstitutionError(f"{where}: missing {key!r}")
            _text(ex[key], f"{where}.{key}")
        bad = sorted(set(ex) - set(_EXAMPLE_KEYS))
        if bad:
            raise ConstitutionError(f"{where}: unknown key(s) {bad} (known: {', '.join(_EXAMPLE_KEYS)})")
    comparison = data.get("comparison", DEFAULT_COMPARISON)
    comparison = _text(comparison, f"{path}: comparison")
    for p in principles:
        template = p.comparison or comparison
        for slot in ("{a}", "{b}"):
            if slot not in template:
                raise ConstitutionError(f"{path}: comparison{' of ' + p.name if p.comparison else ''}: the template "
                                        f"needs {slot} (and may use {{prompt}}, {{principle}})")
    name = data.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Constitution(str(name), principles, comparison, [dict(e) for e in examples], path)


def load_constitution(spec: str | None = None) -> Constitution:
    """A bundled constitution by name (``default``, ``tasks``) or a YAML/JSON file."""
    spec = spec or "default"
    path = os.path.join(BUNDLED_DIR, f"{spec}.yaml") if spec in BUNDLED else spec
    return parse_constitution(_read(path), path)
