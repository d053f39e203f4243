"""The labelling web page: a Flask app over a LabelDB.

Routes: ``/`` (log in by name, then label), ``/instructions``, ``/admin`` (progress, flags,
agreement), and the JSON API the page calls: ``GET /api/next``, ``POST /api/label`` (one label,
committed before the answer), ``POST /api/flag``, ``POST /api/skip``, ``GET /api/stats``.
Every error answers with a short message (JSON under /api/, a plain page elsewhere), never a
traceback page: unexpected errors are logged on the server's console.
"""
from __future__ import annotations

import html
import re

from flask import Flask, jsonify, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException

from peftkern.labeling.agreement import agreement_report, fmt, without_nan
from peftkern.labeling.db import LabelDB, SchemaError
from peftkern.labeling.items import LabelError, UnknownItem, display_text

_NAME = re.compile(r"^[\w .@-]{1,40}$")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def render_markdown(text: str) -> str:
    """Instructions as HTML: Markdown through the ``markdown`` package when installed, else escaped
    preformatted text."""
    try:
        import markdown
    except ImportError:
        return f"<pre>{html.escape(text)}</pre>"
    return markdown.markdown(text, extensions=["extra"])


def create_app(db: LabelDB, instructions: str | None = None, title: str = "peftkern labelling") -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=db.setting("secret_key"), JSON_SORT_KEYS=False, PROPAGATE_EXCEPTIONS=False)
    instructions_html = render_markdown(instructions) if instructions else None

    def rater() -> str | None:
        return session.get("rater")

    def need_rater() -> str:
        name = rater()
        if not name:
            raise LabelError("not logged in: open the page and log in with your name first")
        return name

    def payload() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise LabelError("the request body must be a JSON object")
        if not isinstance(data.get("item_id"), str):
            raise LabelError("the request needs 'item_id' (a string)")
        return data

    @app.get("/")
    def index():
        if not rater():
            return render_template("login.html", title=title, error=None)
        return render_template("label.html", title=title, rater=rater(), has_instructions=bool(instructions_html),
                               scale=db.scale)

    @app.post("/login")
    def login():
        name = (request.form.get("name") or "").strip()
        if not _NAME.match(name):
            return render_template("login.html", title=title,
                                   error="a name is 1 to 40 letters, digits, spaces or . @ - _"), 400
        db.add_rater(name)
        session["rater"] = name
        session.permanent = True
        return redirect(url_for("instructions_page") if instructions_html else url_for("index"))

    @app.get("/logout")
    def logout():
        session.pop("rater", None)
        return redirect(url_for("index"))

    @app.get("/instructions")
    def instructions_page():
        return render_template("instructions.html", title=title, body=instructions_html, rater=rater())

    @app.get("/api/next")
    def next_item():
        name = need_rater()
        got = db.next_item(name)
        progress = db.progress(name)
        if got is None:
            return jsonify(item=None, progress=progress)
        item, shown = got
        answers = [display_text(item.completions[i]) for i in shown]
        return jsonify(item={"id": item.id, "task": item.task, "prompt": display_text(item.prompt),
                             "answers": answers, "labels": list(LETTERS[:item.k]), "scale": db.scale},
                       progress=progress)

    @app.post("/api/label")
    def save_label():
        name, data = need_rater(), payload()
        kind = data.get("kind")
        if kind not in ("pairwise", "ranking", "rating"):
            raise LabelError(f"'kind' must be pairwise, ranking or rating, got {kind!r}")
        db.save_label(name, data["item_id"], kind, data, str(data.get("reason") or ""))
        return jsonify(saved=True, progress=db.progress(name))

    @app.post("/api/flag")
    def flag():
        name, data = need_rater(), payload()
        db.save_label(name, data["item_id"], "flag", {}, str(data.get("reason") or ""))
        return jsonify(saved=True, progress=db.progress(name))

    @app.post("/api/skip")
    def skip():
        name, data = need_rater(), payload()
        db.skip(name, data["item_id"])
        return jsonify(saved=True, progress=db.progress(name))

    @app.get("/api/stats")
    def stats():
        return jsonify(without_nan(agreement_report(db.labels())))

    @app.get("/admin")
    def admin():
        labels = db.labels()
        items = db.items()
        per_rater = {}
        for lab in labels:
            row = per_rater.setdefault(lab["rater"], {"labels": 0, "flags": 0})
            row["flags" if lab["kind"] == "flag" else "labels"] += 1
        per_item = {}
        for lab in labels:
            per_item.setdefault(lab["item_id"], set()).add(lab["rater"])
        flags = [lab for lab in labels if lab["kind"] == "flag"]
        return render_template("admin.html", title=title, report=agreement_report(labels), fmt=fmt,
                               per_rater=per_rater, raters=db.raters(), items=len(items), flags=flags,
                               complete=sum(len(r) >= db.raters_per_item for r in per_item.values()),
                               raters_per_item=db.raters_per_item)

    @app.errorhandler(LabelError)
    def label_error(exc):
        return _error(str(exc), 404 if isinstance(exc, UnknownItem) else 400)

    @app.errorhandler(SchemaError)
    def schema_error(exc):
        return _error(str(exc), 500)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return _error(f"{exc.code} {exc.name}: {exc.description}", exc.code or 500)

    @app.errorhandler(Exception)
    def unexpected(exc):
        app.logger.exception("unexpected error on %s %s", request.method, request.path)
        return _error(f"internal error ({type(exc).__name__}: {exc}); nothing was saved by this request, and "
                      "earlier labels are safe. The server's console has the details.", 500)

    return app


def _error(message: str, status: int):
    if request.path.startswith("/api/"):
        return jsonify(error=message), status
    page = (f"<!doctype html><title>error</title><body style='font-family:sans-serif;max-width:50em;margin:2em auto'>"
            f"<h2>Something went wrong</h2><p>{html.escape(message)}</p><p><a href='/'>back to labelling</a></p>")
    return page, status, {"Content-Type": "text/html; charset=utf-8"}
