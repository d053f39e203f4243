"""The labels database: SQLite through the standard library, one file, every label committed as it
arrives (WAL journal, so several raters' requests read while one writes).

Tables: ``schema_version`` (one row; a file of another version is refused, never altered),
``meta`` (settings such as raters_per_item, the session-cookie key), ``items``, ``raters``,
``assignments`` (which answer order each rater saw: ``shown[j]`` = file index shown at position j,
and when it was served), ``labels`` (one per rater, item and kind: the value in the file's order;
a new label from the same rater replaces the old one), ``skips``.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import sqlite3
import time
from contextlib import contextmanager

from peftkern.labeling.items import Item, LabelError, UnknownItem, canonical_value

SCHEMA_VERSION = 1
LEASE_SECONDS = 30 * 60  # an item served to a rater is held for them this long before others may take its slot

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id TEXT PRIMARY KEY, position INTEGER NOT NULL, task TEXT NOT NULL, prompt TEXT NOT NULL,
                    completions TEXT NOT NULL, priority REAL);
CREATE TABLE raters (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE assignments (rater TEXT NOT NULL, item_id TEXT NOT NULL REFERENCES items(id), shown TEXT NOT NULL,
                          served REAL NOT NULL, PRIMARY KEY (rater, item_id));
CREATE TABLE labels (rater TEXT NOT NULL, item_id TEXT NOT NULL REFERENCES items(id), kind TEXT NOT NULL,
                     value TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', shown TEXT NOT NULL,
                     created REAL NOT NULL, PRIMARY KEY (rater, item_id, kind));
CREATE TABLE skips (rater TEXT NOT NULL, item_id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (rater, item_id));
"""


class SchemaError(ValueError):
    """A file that is not a labels database of this version."""


class LabelDB:
    """A labels database at ``path``. ``LabelDB.create_or_open(path, items, raters_per_item)`` makes
    or reuses one; ``LabelDB(path)`` opens an existing one (SchemaError when it is not one of ours)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise SchemaError(f"{path}: no such labels database (create it with 'peftkern label serve --data ...')")
        con = sqlite3.connect(path, timeout=30)
        try:
            check_schema(con, path)
        finally:
            con.close()

    @classmethod
    def create_or_open(cls, path: str, items: list[Item] | None, raters_per_item: int | None = None,
                       scale: int | None = None) -> LabelDB:
        """Open ``path`` (or create it) and add ``items`` that are not in it yet. An item id already
        present with other content raises SchemaError (the data file changed under the labels)."""
        if raters_per_item is not None and raters_per_item < 1:
            raise ValueError(f"--raters-per-item must be >= 1, got {raters_per_item}")
        if scale is not None and not 2 <= scale <= 10:
            raise ValueError(f"--scale must be between 2 and 10, got {scale}")
        fresh = not os.path.isfile(path) or os.path.getsize(path) == 0
        if fresh:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            con = sqlite3.connect(path)
            try:
                with con:
                    con.executescript(_SCHEMA)
                    con.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
                    con.executemany("INSERT INTO meta VALUES (?, ?)", [
                        ("raters_per_item", str(raters_per_item or 1)), ("scale", str(scale or 5)),
                        ("secret_key", secrets.token_hex(32)), ("order_seed", str(secrets.randbits(31)))])
            finally:
                con.close()
        db = cls(path)
        with db.transaction() as con:
            if raters_per_item is not None:
                con.execute("UPDATE meta SET value = ? WHERE key = 'raters_per_item'", (str(raters_per_item),))
            if scale is not None:
                con.execute("UPDATE meta SET value = ? WHERE key = 'scale'", (str(scale),))
            if items:
                db._add_items(con, items)
        return db

    # -- connections ------------------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    @contextmanager
    def reading(self):
        con = self.connect()
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self):
        con = self.connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.commit()
        except BaseException:
            con.rollback()
            raise
        finally:
            con.close()

    def _add_items(self, con, items: list[Item]) -> None:
        stored = {r["id"]: r for r in con.execute("SELECT id, prompt, completions, task FROM items")}
        top = con.execute("SELECT COALESCE(MAX(position), -1) FROM items").fetchone()[0]
        for item in items:
            prompt, completions = json.dumps(item.prompt, ensure_ascii=False), json.dumps(item.completions,
                                                                                          ensure_ascii=False)
            old = stored.get(item.id)
            if old is None:
                top += 1
                con.execute("INSERT INTO items (id, position, task, prompt, completions) VALUES (?, ?, ?, ?, ?)",
                            (item.id, top, item.task, prompt, completions))
            elif (old["prompt"], old["completions"], old["task"]) != (prompt, completions, item.task):
                raise SchemaError(f"{self.path}: item {item.id!r} is stored with other content (prompt, answers or "
                                  "task) than the data file gives; its labels would no longer match. Use a new "
                                  "--db for new data, or give the changed items new ids")

    # -- reading ----------------------------------------------------------------------------------
    def setting(self, key: str) -> str:
        with self.reading() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise SchemaError(f"{self.path}: the meta table has no {key!r}")
        return row["value"]

    @property
    def raters_per_item(self) -> int:
        return int(self.setting("raters_per_item"))

    @property
    def scale(self) -> int:
        return int(self.setting("scale"))

    def items(self) -> list[Item]:
        with self.reading() as con:
            rows = con.execute("SELECT * FROM items ORDER BY position").fetchall()
        return [_item(r) for r in rows]

    def item(self, item_id: str, con=None) -> Item:
        own = con is None
        con = con or self.connect()
        try:
            row = con.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        finally:
            if own:
                con.close()
        if row is None:
            raise UnknownItem(f"no item {item_id!r} in the labels database {os.path.basename(self.path)}")
        return _item(row)

    def labels(self, kind: str | None = None) -> list[dict]:
        """Every label: {rater, item_id, kind, value (file order), reason, shown, created}."""
        query, args = "SELECT * FROM labels", ()
        if kind is not None:
            query, args = query + " WHERE kind = ?", (kind,)
        with self.reading() as con:
            rows = con.execute(query + " ORDER BY created", args).fetchall()
        return [dict(r, value=json.loads(r["value"]), shown=json.loads(r["shown"])) for r in rows]

    def raters(self) -> list[str]:
        with self.reading() as con:
            return [r["name"] for r in con.execute("SELECT name FROM raters ORDER BY created")]

    # -- writing ----------------------------------------------------------------------------------
    def add_rater(self, name: str) -> None:
        with self.transaction() as con:
            con.execute("INSERT OR IGNORE INTO raters VALUES (?, ?)", (name, time.time()))

    def set_priorities(self, priorities: dict[str, float]) -> None:
        """Active learning: items with a higher priority are served first (None: no priority)."""
        with self.transaction() as con:
            known = {r["id"] for r in con.execute("SELECT id FROM items")}
            missing = sorted(set(priorities) - known)
            if missing:
                raise LabelError(f"priorities for items not in {self.path}: {missing[:5]}")
            con.executemany("UPDATE items SET priority = ? WHERE id = ?", [(p, i) for i, p in priorities.items()])

    def next_item(self, rater: str, now: float | None = None) -> tuple[Item, list[int]] | None:
        """The item to show ``rater`` next and the answer order to show it in (file indices), or None
        when nothing is left for them. Order: the item already served to them and not yet labelled,
        then items not skipped before skipped ones, by priority (highest first), then file order.
        An item goes to at most raters_per_item raters (those who labelled or flagged it, plus those
        holding it, served less than LEASE_SECONDS ago)."""
        now = time.time() if now is None else now
        with self.transaction() as con:
            eligible = self._eligible(con, rater, now)
            if not eligible:
                return None
            item_id = eligible[0]
            row = con.execute("SELECT shown FROM assignments WHERE rater = ? AND item_id = ?",
                              (rater, item_id)).fetchone()
            item = self.item(item_id, con)
            if row is None:
                shown = list(range(item.k))
                seed = con.execute("SELECT value FROM meta WHERE key = 'order_seed'").fetchone()[0]
                random.Random(f"{seed}:{rater}:{item_id}").shuffle(shown)
                con.execute("INSERT INTO assignments VALUES (?, ?, ?, ?)", (rater, item_id, json.dumps(shown), now))
            else:
                shown = json.loads(row["shown"])
                con.execute("UPDATE assignments SET served = ? WHERE rater = ? AND item_id = ?", (now, rater, item_id))
        return item, shown

    def _eligible(self, con, rater: str, now: float) -> list[str]:
        per_item = int(con.execute("SELECT value FROM meta WHERE key = 'raters_per_item'").fetchone()[0])
        done = {r[0] for r in con.execute("SELECT DISTINCT item_id FROM labels WHERE rater = ?", (rater,))}
        taken: dict[str, set] = {}
        for r in con.execute("SELECT item_id, rater FROM labels UNION SELECT item_id, rater FROM assignments "
                             "WHERE served > ?", (now - LEASE_SECONDS,)):
            taken.setdefault(r[0], set()).add(r[1])
        mine = {r[0] for r in con.execute("SELECT item_id FROM assignments WHERE rater = ?", (rater,))}
        skipped = {r[0]: r[1] for r in con.execute("SELECT item_id, at FROM skips WHERE rater = ?", (rater,))}
        rows = con.execute("SELECT id, priority, position FROM items").fetchall()
        out = []
        for r in rows:
            if r["id"] in done:
                continue
            others = taken.get(r["id"], set()) - {rater}
            if len(others) >= per_item:
                continue
            held = r["id"] in mine and r["id"] not in skipped
            out.append((not held, r["id"] in skipped, skipped.get(r["id"], 0.0),
                        -(r["priority"] if r["priority"] is not None else float("-inf")), r["position"], r["id"]))
        return [key[-1] for key in sorted(out)]

    def save_label(self, rater: str, item_id: str, kind: str, payload: dict, reason: str = "") -> dict:
        """Store one label (committed before returning). ``payload`` is in the order the rater was shown
        (see items.canonical_value); the stored value is in the file's order. Kind ``flag`` marks the
        item ambiguous for this rater (``reason`` says why) and takes it out of their queue."""
        with self.transaction() as con:
            item = self.item(item_id, con)
            row = con.execute("SELECT shown FROM assignments WHERE rater = ? AND item_id = ?",
                              (rater, item_id)).fetchone()
            if row is None:
                raise LabelError(f"item {item_id!r} was never shown to rater {rater!r}; labels are accepted only for "
                                 "items the page served (reload the page)")
            shown = json.loads(row["shown"])
            if kind == "flag":
                value = {}
            else:
                scale = int(con.execute("SELECT value FROM meta WHERE key = 'scale'").fetchone()[0])
                value = canonical_value(item, kind, payload, shown, scale)
            con.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (rater, item_id, kind, json.dumps(value), str(reason or "")[:2000], json.dumps(shown),
                         time.time()))
            con.execute("DELETE FROM skips WHERE rater = ? AND item_id = ?", (rater, item_id))
        return value

    def skip(self, rater: str, item_id: str) -> None:
        """Put the item at the back of this rater's queue."""
        with self.transaction() as con:
            self.item(item_id, con)
            con.execute("INSERT OR REPLACE INTO skips VALUES (?, ?, ?)", (rater, item_id, time.time()))

    def progress(self, rater: str) -> dict:
        """{done: items this rater labelled or flagged, left: items still open to them, items, complete:
        items labelled by raters_per_item raters}."""
        now = time.time()
        with self.reading() as con:
            done = con.execute("SELECT COUNT(DISTINCT item_id) FROM labels WHERE rater = ?", (rater,)).fetchone()[0]
            left = len(self._eligible(con, rater, now))
            per_item = int(con.execute("SELECT value FROM meta WHERE key = 'raters_per_item'").fetchone()[0])
            total = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            complete = con.execute("SELECT COUNT(*) FROM (SELECT item_id FROM labels GROUP BY item_id "
                                   "HAVING COUNT(DISTINCT rater) >= ?)", (per_item,)).fetchone()[0]
        return {"done": done, "left": left, "items": total, "complete": complete, "raters_per_item": per_item}


def check_schema(con: sqlite3.Connection, path: str) -> None:
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise SchemaError(f"{path}: not an SQLite database ({exc})") from None
    if "schema_version" not in tables:
        raise SchemaError(f"{path}: not a peftkern labels database (no schema_version table; tables: "
                          f"{', '.join(sorted(tables)) or 'none'})")
    row = con.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else None
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{path}: labels database of schema version {version}, but this peftkern reads version "
                          f"{SCHEMA_VERSION}; open it with the peftkern that wrote it (export its labels with that "
                          "version's 'peftkern label export'), or start a new --db")


def _item(row) -> Item:
    return Item(row["id"], json.loads(row["prompt"]), json.loads(row["completions"]), row["task"], row["position"])
