"""Work done in chunks that survives a kill: each chunk's records go to ``<dir>/part-NNNNN.jsonl``
atomically (peftkern.train.atomic), next to ``<dir>/settings.json``, so a step started again with
the same settings skips the chunks already written and redoes at most the one it was in.

Every chunk draws its randomness from its own seed, so a resumed step writes what an uninterrupted
one would have."""
from __future__ import annotations

import json
import os

from tqdm import tqdm

from peftkern.train.atomic import atomic_write_text, remove_temp_entries


class ResumeError(ValueError):
    """A step's directory holds the work of other settings; the message names the setting."""


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, records) -> None:
    """``records`` as JSON lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class ChunkStore:
    """The chunks of one step in ``directory``; ``settings`` (JSON-ready) must match what is there."""

    def __init__(self, directory: str, settings: dict):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        remove_temp_entries(directory)
        path = os.path.join(directory, "settings.json")
        settings = json.loads(json.dumps(settings))
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if changed:
                key = changed[0]
                raise ResumeError(f"{directory}: holds the work of other settings ({key}: {old.get(key)!r} there, "
                                  f"{settings.get(key)!r} now); use another output directory or delete it")
        else:
            atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))

    def _part(self, index: int) -> str:
        return os.path.join(self.directory, f"part-{index:05d}.jsonl")

    def done(self, index: int) -> bool:
        return os.path.isfile(self._part(index))

    def write(self, index: int, records: list[dict]) -> None:
        write_jsonl(self._part(index), records)

    def read(self, index: int) -> list[dict]:
        return read_jsonl(self._part(index))

    def run(self, items: list, chunk_size: int, work, desc: str | None = None) -> list[dict]:
        """``work(chunk_index, chunk_items) -> records`` for each chunk not yet written; every record in order.
        ``desc``: show a progress bar (items) with this title."""
        out = []
        bar = tqdm(total=len(items), desc=desc, unit="prompt", leave=False) if desc else None
        try:
            for index, start in enumerate(range(0, len(items), chunk_size)):
                if not self.done(index):
                    self.write(index, work(index, items[start:start + chunk_size]))
                out += self.read(index)
                if bar is not None:
                    bar.update(min(start + chunk_size, len(items)) - start)
        finally:
            if bar is not None:
                bar.close()
        return out
