"""Reading instruction data with a location for every record, and writing JSONL atomically.

Sources: a JSONL file (one object per line), a JSON file holding an array of objects (Alpaca's and
ShareGPT's releases), a directory written by ``datasets.Dataset.save_to_disk``, a
``datasets.Dataset`` or a list of dicts. Every record carries where it came from (``file:line``, or
``record i`` for in-memory rows), so every later error can name it.

Two modes: strict (the first problem raises :class:`DataError`) and tolerant (problems are collected
and reading goes on where it can: a JSONL file line by line; a JSON array stops at the first
syntax error, since nothing after it can be located).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from peftkern.train.atomic import atomic_write_text
from peftkern.train.data import DataError, Record


@dataclass
class Problem:
    """One thing wrong with the data: where (``file:line``), which field (or None) and what."""
    where: str
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field + ': ' if self.field else ''}{self.message}"

    def as_dict(self) -> dict:
        return {"where": self.where, "field": self.field, "message": self.message}


def fail(problem: Problem, problems: list[Problem] | None) -> None:
    """Raise ``problem`` as a DataError (strict: ``problems`` is None) or collect it."""
    if problems is None:
        raise DataError(str(problem))
    problems.append(problem)


def problem_from(exc: DataError, where: str) -> Problem:
    """A DataError raised about the record at ``where`` as a Problem (the location not repeated)."""
    text = str(exc)
    return Problem(where, None, text[len(where) + 2:] if text.startswith(where + ": ") else text)


def read_records(source, problems: list[Problem] | None = None) -> list[Record]:
    """Records (``Record(data, where)``) from a path, a ``datasets.Dataset`` or a list of dicts.

    ``problems`` None: strict, the first bad line raises DataError naming file and line. A list:
    bad lines are appended to it as :class:`Problem` and skipped.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return _rows(_load_saved_dataset(path), path, problems)
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such data file")
        with open(path, "rb") as f:
            raw = f.read()
        if raw.lstrip().startswith(b"["):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw.count(b"\n", 0, exc.start) + 1
                raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
            return _json_array(text, path, problems)
        return _jsonl(raw, path, problems)
    return _rows(source, None, problems)


def _rows(rows, path: str | None, problems) -> list[Record]:
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: record {i}" if path else f"record {i}"
        if not isinstance(row, dict):
            fail(Problem(where, None, f"expected an object (dict), got {type(row).__name__}"), problems)
            continue
        out.append(Record(dict(row), where))
    return out


def _load_saved_dataset(path: str):
    if not os.path.isfile(os.path.join(path, "dataset_info.json")) and \
            not os.path.isfile(os.path.join(path, "state.json")):
        raise DataError(f"{path}: a directory, but not one written by datasets' save_to_disk")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs the 'datasets' package") from None
    return datasets.load_from_disk(path)


def _jsonl(raw: bytes, path: str, problems) -> list[Record]:
    out = []
    for line_no, raw_line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{line_no}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(Problem(where, None, f"not UTF-8 text (byte {raw_line[exc.start]:#04x} at column {exc.start + 1})"),
                 problems)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            fail(Problem(where, None, f"not valid JSON ({exc.msg} at column {exc.colno})"), problems)
            continue
        if not isinstance(obj, dict):
            fail(Problem(where, None, f"expected a JSON object, got {type(obj).__name__}"), problems)
            continue
        out.append(Record(obj, where))
    return out


def _json_array(text: str, path: str, problems) -> list[Record]:
    """Elements of a top-level JSON array, each located at the line where it starts."""
    decoder = json.JSONDecoder()
    out: list[Record] = []
    i = _skip_ws(text, text.index("[") + 1)
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    if i < len(text) and text[i] == "]":
        return out
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            fail(Problem(f"{path}:{exc.lineno}", None, f"not valid JSON ({exc.msg} at column {exc.colno})"), problems)
            return out
        where = f"{path}:{line_at(i)}"
        if isinstance(obj, dict):
            out.append(Record(obj, where))
        else:
            fail(Problem(where, None, f"expected a JSON object, got {type(obj).__name__}"), problems)
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            rest = text[i + 1:].strip()
            if rest:
                fail(Problem(f"{path}:{line_at(i)}", None, "text after the closing ']'"), problems)
            return out
        fail(Problem(f"{path}:{line_at(min(i, len(text)))}", None, "expected ',' or ']' after an element"), problems)
        return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def write_jsonl(records: list[dict], path: str) -> str:
    """One JSON object per line, written through a temp file and renamed (nothing half-written)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def write_json(obj, path: str) -> str:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    return path
