"""Run logging: one JSON object per line in ``<out>/log.jsonl`` and a progress bar on the terminal."""
from __future__ import annotations

import json
import math
import os
import sys
import time


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
        record = {k: _plain(v) for k, v in record.items()}
        record.setdefault("elapsed", round(time.time() - self.start, 3))
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "elapsed"}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _truncate_after(path: str, step: int) -> None:
    """On resume, drop log lines of steps after ``step`` (they are about to be run again)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        from peftkern.train.checkpoint import atomic_write_text

        atomic_write_text(path, "".join(kept))


def read_log(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
