"""The labels database and the page's API through Flask's test client: labels saved at once in the
file's answer order, items shown to N raters, skip / flag, and clear errors for bad input."""
import json
import sqlite3

import pytest

pytest.importorskip("flask", reason="Flask is not installed (pip install 'peftkern[label]')")

from peftkern.cli import main
from peftkern.labeling.app import create_app
from peftkern.labeling.db import LEASE_SECONDS, LabelDB, SchemaError
from peftkern.labeling.export import export_pairs, export_rankings
from peftkern.labeling.items import read_items
from peftkern.train.errors import DataError


def _db(tmp_path, candidates, per_item=2, **kw):
    return LabelDB.create_or_open(str(tmp_path / "labels.sqlite"), read_items(candidates, **kw), per_item)


def _client(db, name, instructions=None):
    c = create_app(db, instructions).test_client()
    assert c.post("/login", data={"name": name}).status_code == 302
    return c


def _prefer(item, word="good"):
    """The choice a rater who likes answers containing ``word`` makes, in the order shown."""
    return "A" if word in item["answers"][0] else "B"


def test_labels_are_stored_in_file_order_whatever_order_was_shown(tmp_path, candidates):
    db = _db(tmp_path, candidates, per_item=4)
    orders = set()
    for name in ("alice", "bob", "carol", "dave"):
        c = _client(db, name)
        for _ in range(3):
            item = c.get("/api/next").get_json()["item"]
            assert item["task"] == "pairwise"
            orders.add(tuple(item["answers"]))
            r = c.post("/api/label", json={"item_id": item["id"], "kind": "pairwise", "choice": _prefer(item)})
            assert r.status_code == 200 and r.get_json()["saved"]
        item = c.get("/api/next").get_json()["item"]
        assert item["task"] == "ranking"
        # rank by the answers' order in the file: large/fast first
        truth = {"large": 1, "medium": 2, "small": 3, "fast": 1, "slow": 2, "still": 3}
        ranks = [truth[a] for a in item["answers"]]
        assert c.post("/api/label", json={"item_id": item["id"], "kind": "ranking", "ranks": ranks}).status_code == 200
    assert len(orders) > 3  # the answer order differs between raters
    labels = db.labels()
    good = {"p1": "0", "p2": "1", "p3": "0"}
    for lab in labels:
        if lab["kind"] == "pairwise":
            assert lab["value"]["verdict"] == good[lab["item_id"]]
        else:
            assert lab["value"]["ranks"] == [1, 2, 3]
    assert len(labels) == 16


def test_each_item_goes_to_n_raters(tmp_path, candidates):
    db = _db(tmp_path, candidates, per_item=2)
    for name in ("alice", "bob", "carol"):
        while (got := db.next_item(name)) is not None:
            item, _ = got
            body = {"choice": "A"} if item.task == "pairwise" else {"ranks": list(range(1, item.k + 1))}
            db.save_label(name, item.id, item.task, body)
    per_item = {}
    for lab in db.labels():
        per_item.setdefault(lab["item_id"], set()).add(lab["rater"])
    assert {i: sorted(r) for i, r in per_item.items()} == {i: ["alice", "bob"] for i in ("p1", "p2", "p3", "r1", "r2")}
    assert db.progress("carol") == {"done": 0, "left": 0, "items": 5, "complete": 5, "raters_per_item": 2}


def test_raters_per_item_and_the_lease(tmp_path, candidates):
    db = _db(tmp_path, candidates, per_item=1)
    first, _ = db.next_item("alice", now=1000.0)
    assert first.id == "p1"
    assert db.next_item("bob", now=1001.0)[0].id == "p2"  # p1 is held by alice
    again, shown = db.next_item("alice", now=1002.0)
    assert again.id == "p1"  # served again after a reload, in the same order
    assert shown == json.loads(sqlite3.connect(db.path).execute(
        "SELECT shown FROM assignments WHERE rater='alice' AND item_id='p1'").fetchone()[0])
    assert db.next_item("carol", now=1002.0 + LEASE_SECONDS + 5)[0].id == "p1"  # alice's hold ran out


def test_skip_goes_to_the_back_and_flag_takes_out(tmp_path, candidates):
    db = _db(tmp_path, candidates)
    c = _client(db, "alice")
    first = c.get("/api/next").get_json()["item"]["id"]
    assert c.post("/api/skip", json={"item_id": first}).status_code == 200
    second = c.get("/api/next").get_json()["item"]["id"]
    assert second != first
    r = c.post("/api/flag", json={"item_id": second, "reason": "both answers are about something else"})
    assert r.get_json()["progress"]["done"] == 1
    seen = [c.get("/api/next").get_json()["item"]["id"]]
    for _ in range(10):
        item = c.get("/api/next").get_json()["item"]
        if item is None:
            break
        kind = item["task"]
        body = {"choice": "A"} if kind == "pairwise" else {"ranks": list(range(1, len(item["answers"]) + 1))}
        c.post("/api/label", json={"item_id": item["id"], "kind": kind, **body})
        seen.append(item["id"])
    assert seen[-1] == first and second not in seen  # skipped comes last; flagged never again
    assert c.get("/api/next").get_json() == {"item": None, "progress": db.progress("alice")}
    flags = [lab for lab in db.labels() if lab["kind"] == "flag"]
    assert flags[0]["reason"] == "both answers are about something else"
    admin = c.get("/admin").get_data(as_text=True)
    assert "both answers are about something else" in admin


def test_likert_ratings(tmp_path, candidates):
    db = _db(tmp_path, candidates, task="rating")
    c = _client(db, "alice")
    item = c.get("/api/next").get_json()["item"]
    assert item["task"] == "rating" and item["scale"] == 5
    r = c.post("/api/label", json={"item_id": item["id"], "kind": "rating", "ratings": [5, 6]})
    assert r.status_code == 400 and "between 1 and 5" in r.get_json()["error"]
    ratings = [5 if "good" in a else 2 for a in item["answers"]]
    assert c.post("/api/label", json={"item_id": item["id"], "kind": "rating", "ratings": ratings}).status_code == 200
    assert db.labels()[0]["value"]["ratings"] == [5, 2]  # p1: "4 (good)" is first in the file
    pairs = export_pairs(db)
    assert pairs == [{"prompt": "2 + 2 = ?", "chosen": "4 (good)", "rejected": "5", "agreement": 1.0, "votes": 1,
                      "item_id": "p1", "chosen_index": 0, "rejected_index": 1}]


def test_bad_input_gets_a_clear_message_never_a_traceback(tmp_path, candidates):
    db = _db(tmp_path, candidates)
    anon = create_app(db).test_client()
    r = anon.get("/api/next")
    assert r.status_code == 400 and "log in" in r.get_json()["error"]
    c = _client(db, "alice")
    r = c.post("/api/label", json={"item_id": "nope", "kind": "pairwise", "choice": "A"})
    assert r.status_code == 404 and r.get_json() == {"error": "no item 'nope' in the labels database labels.sqlite"}
    item = c.get("/api/next").get_json()["item"]
    r = c.post("/api/label", json={"item_id": item["id"], "kind": "ranking", "ranks": [1, 1]})
    assert r.status_code == 400 and "does not fit" in r.get_json()["error"]
    c.post("/api/label", json={"item_id": item["id"], "kind": "pairwise", "choice": "A"})
    c.post("/api/label", json={"item_id": "p2", "kind": "pairwise", "choice": "A"})  # never shown: refused
    for _ in range(3):
        item = c.get("/api/next").get_json()["item"]
        if item["task"] == "ranking":
            break
        c.post("/api/label", json={"item_id": item["id"], "kind": "pairwise", "choice": "B"})
    r = c.post("/api/label", json={"item_id": item["id"], "kind": "ranking", "ranks": [2, 2, 1]})
    assert r.status_code == 400
    assert r.get_json()["error"] == ("the ranking [2, 2, 1] repeats rank 2: give each of the 3 answers a different "
                                     "rank from 1 (best) to 3")
    r = c.post("/api/label", json={"item_id": item["id"], "kind": "ranking", "ranks": [1, 2, 4]})
    assert r.status_code == 400 and "each rank from 1 (best) to 3 once" in r.get_json()["error"]
    r = c.post("/api/label", data="not json", content_type="text/plain")
    assert r.status_code == 400 and "JSON object" in r.get_json()["error"]
    r = c.post("/api/label", json={"item_id": item["id"], "kind": "pairwise", "choice": "C"})
    assert r.status_code == 400
    r = c.post("/api/label", json={"item_id": item["id"], "kind": "vote"})
    assert r.status_code == 400 and "kind" in r.get_json()["error"]
    page = c.get("/no/such/page")
    assert page.status_code == 404 and b"Traceback" not in page.data and b"Not Found" in page.data
    assert c.get("/api/label").status_code == 405  # wrong method: a message too
    assert "error" in c.get("/api/label").get_json()
    assert not any(lab["kind"] == "ranking" for lab in db.labels())  # nothing bad was stored


def test_an_unexpected_error_is_a_message_not_a_traceback(tmp_path, candidates, monkeypatch):
    db = _db(tmp_path, candidates)
    c = _client(db, "alice")

    def broken(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(db, "progress", broken)
    r = c.get("/api/next")
    assert r.status_code == 500
    text = r.get_json()["error"]
    assert "RuntimeError: disk on fire" in text and "Traceback" not in text
    r = c.get("/")
    assert r.status_code == 200  # the page itself does not call progress


def test_database_of_another_schema_version_or_kind(tmp_path, candidates, capsys):
    db = _db(tmp_path, candidates)
    con = sqlite3.connect(db.path)
    con.execute("UPDATE schema_version SET version = 7")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="schema version 7, but this peftkern reads version 1"):
        LabelDB(db.path)
    assert main(["label", "stats", "--db", db.path]) == 2
    assert "schema version 7" in capsys.readouterr().err
    assert main(["label", "serve", "--db", db.path, "--data", candidates]) == 2
    assert "schema version 7" in capsys.readouterr().err
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE things (x)")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="not a peftkern labels database"):
        LabelDB(str(other))
    with pytest.raises(SchemaError, match="not an SQLite database"):
        LabelDB(candidates)
    with pytest.raises(SchemaError, match="no such labels database"):
        LabelDB(str(tmp_path / "missing.sqlite"))


def test_changed_data_under_existing_labels_is_refused(tmp_path, candidates):
    db = _db(tmp_path, candidates)
    with open(candidates) as f:
        lines = f.read().splitlines()
    changed = json.loads(lines[0])
    changed["completions"][1] = "6"
    (tmp_path / "changed.jsonl").write_text(json.dumps(changed) + "\n")
    with pytest.raises(SchemaError, match="item 'p1' is stored with other content"):
        LabelDB.create_or_open(db.path, read_items(str(tmp_path / "changed.jsonl")))
    extra = {"prompt": "new", "completions": ["x", "y"]}
    (tmp_path / "more.jsonl").write_text(json.dumps(extra) + "\n")
    LabelDB.create_or_open(db.path, read_items(str(tmp_path / "more.jsonl")))
    assert len(db.items()) == 6 and db.items()[-1].position == 5


def test_bad_candidates_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": ["only one"]}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: 'completions' must be a list of at least 2"):
        read_items(str(bad))
    bad.write_text('{"prompt": "p", "completions": ["a", "b", "c"], "task": "pairwise"}\n')
    with pytest.raises(DataError, match="exactly 2 answers"):
        read_items(str(bad))
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: id .* is used again"):
        read_items(str(bad))


def test_export_pools_votes_and_rankings_give_all_implied_pairs(tmp_path, candidates):
    db = _db(tmp_path, candidates, per_item=3)
    # r1 ranked by three raters: two say large > medium > small, one says medium > large > small.
    for name, by_text in (("a", {"large": 1, "medium": 2, "small": 3}), ("b", {"large": 1, "medium": 2, "small": 3}),
                          ("c", {"large": 2, "medium": 1, "small": 3})):
        while True:
            item, shown = db.next_item(name)
            if item.id == "r1":
                break
            db.save_label(name, item.id, "flag", {})
        ranks = [by_text[item.completions[i]] for i in shown]
        db.save_label(name, "r1", "ranking", {"ranks": ranks})
    pairs = export_pairs(db)
    got = {(p["chosen"], p["rejected"]): (p["agreement"], p["votes"]) for p in pairs}
    assert got == {("large", "medium"): (pytest.approx(2 / 3, abs=1e-6), 3), ("large", "small"): (1.0, 3),
                   ("medium", "small"): (1.0, 3)}
    assert all(set(p) >= {"prompt", "chosen", "rejected"} for p in pairs)
    assert len(export_pairs(db, min_agreement=0.9)) == 2
    per_rater = export_pairs(db, per_rater=True)
    assert len(per_rater) == 9 and {p["rater"] for p in per_rater} == {"a", "b", "c"}
    [ranking] = export_rankings(db)
    assert ranking["completions"] == ["large", "medium", "small"] and ranking["order"] == [0, 1, 2]
    assert ranking["raters"] == 3 and ranking["agreement"] == pytest.approx(8 / 9, abs=1e-6)


def test_instructions_render_as_markdown(tmp_path, candidates):
    pytest.importorskip("markdown")
    db = _db(tmp_path, candidates)
    c = create_app(db, "# Rules\n\nPrefer *correct* answers.").test_client()
    r = c.post("/login", data={"name": "alice"})
    assert r.location.endswith("/instructions")
    page = c.get("/instructions").get_data(as_text=True)
    assert "<h1>Rules</h1>" in page and "<em>correct</em>" in page
    assert c.post("/login", data={"name": "<script>"}).status_code == 400


def test_cli_export_and_stats(tmp_path, candidates, capsys):
    db = _db(tmp_path, candidates)
    for name, choice in (("alice", "0"), ("bob", "1")):
        item, shown = db.next_item(name)
        db.save_label(name, item.id, "pairwise", {"choice": "A" if shown[0] == int(choice) else "B"})
    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db.path, "--out", str(out), "--per-rater"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["rater"], r["chosen"]) for r in rows] == [("alice", "4 (good)"), ("bob", "5")]
    assert main(["label", "export", "--db", db.path, "--out", str(out)]) == 0
    assert out.read_text() == ""  # one vote each way: no majority, no pair
    capsys.readouterr()
    assert main(["label", "stats", "--db", db.path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # one unit, opposite verdicts: p_o = 0, p_e = 0, kappa 0; Fleiss' P_e = 1/2, kappa -1; alpha undefined -> null
    assert report["pairwise"]["cohen_kappa"]["alice|bob"] == {"units": 1, "kappa": 0.0, "observed": 0.0}
    assert report["pairwise"]["fleiss_kappa"] == -1.0


@pytest.mark.slow
def test_exported_pairs_train_a_reward_model(tmp_path, candidates):
    """The export is what 'peftkern rm' reads: one step on the micro model, through the CLI."""
    db = _db(tmp_path, candidates, per_item=1)
    while (got := db.next_item("alice")) is not None:
        item, _ = got
        body = {"choice": "A"} if item.task == "pairwise" else {"ranks": list(range(1, item.k + 1))}
        db.save_label("alice", item.id, item.task, body)
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", db.path, "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3 + 2 * 3  # 3 pairwise items, 2 rankings of 3 answers
    assert main(["rm", "--model", "tiny-micro", "--data", str(out), "--eval-data", str(out), "--max-steps", "1",
                 "--batch-size", "4", "--lora-r", "4", "--out", str(tmp_path / "rm"), "--quiet"]) == 0
    assert (tmp_path / "rm" / "reward_model" / "score_head.safetensors").is_file()


def test_conversational_pairs_are_shown_as_text_and_exported_as_messages(tmp_path):
    from peftkern.models import tasks

    records = tasks.preference_records(tasks.questions(2, seed=0))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    db = LabelDB.create_or_open(str(tmp_path / "l.sqlite"), read_items(str(path)))
    c = _client(db, "alice")
    item = c.get("/api/next").get_json()["item"]
    assert item["prompt"].startswith("system: You answer with the answer only.\nuser: ")
    right = records[0]["chosen"][0]["content"]
    assert right in item["answers"]  # one assistant message: just its text
    c.post("/api/label", json={"item_id": item["id"], "kind": "pairwise",
                               "choice": "AB"[item["answers"].index(right)]})
    [pair] = export_pairs(db)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (records[0]["prompt"], records[0]["chosen"],
                                                                  records[0]["rejected"])
