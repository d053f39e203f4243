"""EditRequest: one fact to write into a model, with the prompts that measure the edit.

A request reads as a sentence to complete: ``prompt`` names the ``subject`` (written ``{}`` in the
prompt, as CounterFact does, or spelled out in it), and the model should continue it with
``target_new`` instead of ``target_true``. The continuation is the prompt, one space, then the
target (no space is added when the prompt ends with whitespace or the target starts with it).

Files hold one request per line (JSON Lines), in this flat form or in CounterFact's nested one::

    {"prompt": "The capital of {} is", "subject": "Velora", "target_new": "Pelm", "target_true": "Tamsk",
     "paraphrase_prompts": ["Velora's capital is"],
     "neighborhood_prompts": [{"prompt": "The capital of Drusk is", "target": "Pelm"}]}
    {"requested_rewrite": {"prompt": "{} plays the", "subject": "Mira Tolan",
                           "target_new": {"str": "harp"}, "target_true": {"str": "piano"}}, ...}

A neighbourhood prompt given as a plain string (CounterFact's form) is answered by ``target_true``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


class EditError(ValueError):
    """A request, layer or setting that cannot be edited; the message names the field and value."""


@dataclass(frozen=True)
class Neighbour:
    """A prompt about another subject, and the answer the edit must not change."""
    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One edit: ``prompt`` (with ``{}`` for the subject, or containing it), ``subject``, the new
    object ``target_new``, the current one ``target_true`` (optional; needed for the comparison
    metrics), and evaluation prompts (paraphrases of the edit, neighbourhood prompts, and prompts
    to generate from for fluency)."""
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[Neighbour, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    case_id: str | int | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise EditError(f"request {name} must be a string, got {type(value).__name__}: {value!r}")
        if not self.subject.strip():
            raise EditError(f"request subject is empty (prompt {self.prompt!r})")
        if not self.target_new.strip():
            raise EditError(f"request target_new {self.target_new!r} is empty (prompt {self.prompt!r})")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise EditError(f"request target_true must be a string or None, got {self.target_true!r}")
        self.subject_span()  # the subject must be in the prompt

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1) if "{}" in self.prompt else self.prompt

    def subject_span(self) -> tuple[int, int]:
        """Character range [start, end) of the subject in :attr:`text`."""
        if "{}" in self.prompt:
            start = self.prompt.index("{}")
            return start, start + len(self.subject)
        start = self.prompt.find(self.subject)
        if start < 0:
            raise EditError(f"subject {self.subject!r} not found in prompt {self.prompt!r} (write the prompt with "
                            "'{}' where the subject goes, or include the subject verbatim)")
        return start, start + len(self.subject)

    def as_dict(self) -> dict:
        """The flat JSON form (what :func:`load_requests` reads back)."""
        out = {"prompt": self.prompt, "subject": self.subject, "target_new": self.target_new}
        if self.target_true is not None:
            out["target_true"] = self.target_true
        if self.paraphrase_prompts:
            out["paraphrase_prompts"] = list(self.paraphrase_prompts)
        if self.neighborhood_prompts:
            out["neighborhood_prompts"] = [{"prompt": n.prompt, "target": n.target} for n in self.neighborhood_prompts]
        if self.generation_prompts:
            out["generation_prompts"] = list(self.generation_prompts)
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out


def join_target(prompt_text: str, target: str) -> str:
    """``prompt_text`` continued by ``target``: one space between them unless either side has one."""
    if not prompt_text or prompt_text[-1].isspace() or target[:1].isspace():
        return prompt_text + target
    return prompt_text + " " + target


_FLAT_KEYS = {"prompt", "subject", "target_new", "target_true", "paraphrase_prompts", "neighborhood_prompts",
              "generation_prompts", "case_id"}
# CounterFact records carry further evaluation fields peftkern does not use; they are read and ignored.
_COUNTERFACT_EXTRA = {"pararel_idx", "attribute_prompts", "dependency_prompts"}


def request_from_dict(record: dict, where: str = "request") -> EditRequest:
    """An EditRequest from the flat form or CounterFact's nested form; unknown keys are an error
    naming them (``where`` prefixes every message, e.g. ``"edits.jsonl:3"``)."""
    if not isinstance(record, dict):
        raise EditError(f"{where}: expected a JSON object, got {type(record).__name__}")
    record = dict(record)
    if "requested_rewrite" in record:
        rewrite = record.pop("requested_rewrite")
        if not isinstance(rewrite, dict):
            raise EditError(f"{where}: requested_rewrite must be an object")
        unknown = set(rewrite) - {"prompt", "subject", "target_new", "target_true", "relation_id"}
        if unknown:
            raise EditError(f"{where}: unknown requested_rewrite keys {sorted(unknown)}")
        for key in ("prompt", "subject", "target_new", "target_true"):
            if key in record:
                raise EditError(f"{where}: {key!r} given both at the top level and in requested_rewrite")
            if key in rewrite:
                value = rewrite[key]
                record[key] = value["str"] if isinstance(value, dict) and "str" in value else value
        for key in _COUNTERFACT_EXTRA:
            record.pop(key, None)
    unknown = set(record) - _FLAT_KEYS
    if unknown:
        raise EditError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(_FLAT_KEYS)}")
    for key in ("prompt", "subject", "target_new"):
        if key not in record:
            raise EditError(f"{where}: missing {key!r}")
    neighbours = []
    for i, item in enumerate(record.get("neighborhood_prompts") or []):
        if isinstance(item, str):
            if record.get("target_true") is None:
                raise EditError(f"{where}: neighborhood_prompts[{i}] is a plain string, which needs target_true")
            neighbours.append(Neighbour(item, record["target_true"]))
        elif isinstance(item, dict) and set(item) == {"prompt", "target"}:
            neighbours.append(Neighbour(str(item["prompt"]), str(item["target"])))
        else:
            raise EditError(f"{where}: neighborhood_prompts[{i}] must be a string or {{'prompt', 'target'}}, got {item!r}")
    try:
        return EditRequest(
            prompt=record["prompt"], subject=record["subject"], target_new=record["target_new"],
            target_true=record.get("target_true"),
            paraphrase_prompts=tuple(_strings(record.get("paraphrase_prompts"), "paraphrase_prompts", where)),
            neighborhood_prompts=tuple(neighbours),
            generation_prompts=tuple(_strings(record.get("generation_prompts"), "generation_prompts", where)),
            case_id=record.get("case_id"))
    except EditError as exc:
        raise EditError(f"{where}: {exc}") from None


def _strings(value, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise EditError(f"{where}: {name} must be a list of strings, got {value!r}")
    return list(value)


def as_request(request: EditRequest | dict) -> EditRequest:
    return request if isinstance(request, EditRequest) else request_from_dict(request)


def load_requests(path: str | os.PathLike) -> list[EditRequest]:
    """Requests from a JSON Lines file (or a JSON list); errors name the file and line."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EditError(f"{path}: not valid JSON: {exc}") from None
        return [request_from_dict(r, f"{path}[{i}]") for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EditError(f"{path}:{lineno}: not valid JSON: {exc}") from None
        out.append(request_from_dict(record, f"{path}:{lineno}"))
    if not out:
        raise EditError(f"{path}: no requests")
    return out


def save_requests(requests, path: str | os.PathLike) -> None:
    """Write requests as JSON Lines (flat form)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps(as_request(r).as_dict(), ensure_ascii=False) + "\n")
