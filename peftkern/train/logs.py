"""Run logging: one JSON object per line in ``<out>/log.jsonl`` and a progress bar on the terminal.

Both ``log.jsonl`` and ``metrics.json`` are strict JSON: a non-finite number (a NaN loss, an infinite
gradient norm) is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``; :func:`read_log` and
:func:`read_json` turn those back into floats. A torn last line of ``log.jsonl`` (a write cut by a
kill) is skipped on reading; a damaged line before the last is an error naming file and line."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

from peftkern.train.errors import RunWarning, TrainError

NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class LogError(TrainError, ValueError):
    """A log line that cannot be read (other than a torn last line)."""


def json_safe(value):
    """``value`` with tensors as numbers and non-finite floats as "nan" / "inf" / "-inf", recursively."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value, indent: int | None = None) -> str:
    """Strict JSON (no bare NaN / Infinity) of ``value`` through :func:`json_safe`."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


def _numbers_back(value):
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    if isinstance(value, dict):
        return {k: _numbers_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_back(v) for v in value]
    return value


class RunLog:
    """Append records to ``path`` (JSONL) and show a tqdm bar titled ``desc`` (rank 0 only)."""

    def __init__(self, path: str | None, desc: str, total: int, initial: int = 0, enabled: bool = True,
                 quiet: bool = False):
        self.path, self.enabled = path, enabled
        self.start = time.time()
        self.bar = None
        if enabled and path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            _truncate_after(path, initial)
        if enabled and not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                            leave=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = json_safe(record)
        record.setdefault("elapsed", round(time.time() - self.start, 3))
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "elapsed"}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_lines(path: str) -> tuple[list[str], list[dict]]:
    """(raw lines kept, their records): blank lines dropped, a torn last line dropped with a warning."""
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
    lines, records = [], []
    numbered = [(i, ln) for i, ln in enumerate(raw, 1) if ln.strip()]
    for pos, (line_no, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except (ValueError, RecursionError) as exc:
            if pos == len(numbered) - 1:
                warnings.warn(f"{path}:{line_no}: skipping a torn last line (a write cut short)", RunWarning,
                              stacklevel=3)
                break
            raise LogError(f"{path}:{line_no}: not a JSON log record ({exc})") from None
        lines.append(line if line.endswith("\n") else line + "\n")
        records.append(record)
    return lines, records


def _truncate_after(path: str, step: int) -> None:
    """On resume, drop log lines of steps after ``step`` (they are about to be run again) and a torn
    last line."""
    if not os.path.isfile(path):
        return
    lines, records = _read_lines(path)
    kept = [ln for ln, r in zip(lines, records) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    with open(path, "rb") as f:
        before = f.read().decode("utf-8", errors="replace")
    if "".join(kept) != before:
        from peftkern.train.atomic import atomic_write_text

        atomic_write_text(path, "".join(kept))


def read_log(path: str) -> list[dict]:
    """The records of a ``log.jsonl`` ("nan" / "inf" strings back as floats)."""
    return [_numbers_back(r) for r in _read_lines(path)[1]]


def read_json(path: str):
    """A JSON file written by :func:`dumps` ("nan" / "inf" strings back as floats)."""
    with open(path, encoding="utf-8") as f:
        return _numbers_back(json.load(f))
