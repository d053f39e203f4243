"""The labelling page in a real browser: headless Chromium from the system's packages (Debian's
chromium + chromium-driver; nothing is downloaded), driven by Selenium.

Two raters label the same items, pairwise (keyboard) and by ranking (mouse clicks, then number
keys); the first closes her browser mid-way and loses nothing; the export has the right pairs and
``label stats`` gives the kappa computed by hand below. PEFTKERN_LABEL_SCREENSHOT=path.png saves a
screenshot of the page (docs/img/label-page.png is made this way).
"""
import json
import os
import shutil
import sqlite3
import threading

import pytest

pytest.importorskip("flask", reason="Flask is not installed (pip install 'peftkern[label]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from peftkern.cli import main
from peftkern.labeling.app import create_app
from peftkern.labeling.db import LabelDB
from peftkern.labeling.items import read_items

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="no headless Chromium here: install "
                                "Debian's 'chromium' and 'chromium-driver' (apt-get install -y chromium "
                                "chromium-driver; .ci/run and 'make browser' do)")

# What each rater prefers, as file indices. Pairwise verdicts (the better answer):
#   alice p1: 0, p2: 0, p3: 1      bob p1: 0, p2: 1, p3: 1
# Cohen's kappa by hand: p_o = 2/3 (agree on p1, p3); alice says 0 for 2/3 of items, bob for 1/3, so
# p_e = (2/3)(1/3) + (1/3)(2/3) = 4/9 and kappa = (2/3 - 4/9) / (1 - 4/9) = (2/9) / (5/9) = 0.4.
PAIRWISE = {"alice": {"p1": 0, "p2": 0, "p3": 1}, "bob": {"p1": 0, "p2": 1, "p3": 1}}
# Rankings (file indices, best first): r1 both 0 > 1 > 2; r2 alice 0 > 2 > 1, bob 1 > 0 > 2.
# Implied pairs (0,1) (0,2) (1,2) of r1, r2: alice + + + + + -, bob + + + - + +. By hand:
# p_o = 4/6; each says + for 5/6 and - for 1/6, p_e = 25/36 + 1/36 = 13/18;
# kappa = (2/3 - 13/18) / (1 - 13/18) = (-1/18) / (5/18) = -0.2.
RANKING = {"alice": {"r1": [0, 1, 2], "r2": [0, 2, 1]}, "bob": {"r1": [0, 1, 2], "r2": [1, 0, 2]}}


@pytest.fixture
def server(tmp_path, candidates):
    db = LabelDB.create_or_open(str(tmp_path / "labels.sqlite"), read_items(candidates), raters_per_item=2)
    httpd = _quiet_server(create_app(db, "# How to judge\n\nPrefer the **correct** answer; flag anything unclear."))
    yield db, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def _quiet_server(app):
    """A threaded Werkzeug server on a free port that logs no requests (its log would outlive pytest's capture)."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log(self, *args, **kwargs):
            pass

    httpd = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def _browser():
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def _wait(driver, condition, what, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"waiting for {what}")


def _login(driver, base, name):
    from selenium.webdriver.common.by import By

    driver.get(base + "/")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "login").click()
    _wait(driver, lambda d: d.find_elements(By.ID, "start"), "the instructions page")
    assert "Prefer the correct answer" in driver.find_element(By.CLASS_NAME, "instructions").text
    driver.find_element(By.ID, "start").click()
    return _current(driver)


def _current(driver):
    """(item id, answers shown) once the page shows an item, or (None, []) when it says done."""
    from selenium.webdriver.common.by import By

    def ready(d):
        if d.find_element(By.ID, "done").is_displayed():
            return ("done",)
        item = d.find_element(By.ID, "item")
        return item.is_displayed() and item.get_attribute("data-item-id") and (item.get_attribute("data-item-id"),)
    found = _wait(driver, ready, "an item")
    item_id = None if found == ("done",) else found[0]
    answers = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#answers .answer-text")]
    return item_id, answers


def _next(driver, previous):
    from selenium.webdriver.common.by import By

    def moved(d):
        done = d.find_element(By.ID, "done").is_displayed()
        now = d.find_element(By.ID, "item").get_attribute("data-item-id")
        return done or now != previous
    _wait(driver, moved, f"the item after {previous}")
    return _current(driver)


def _label(driver, db, rater, item_id, answers, use_keys):
    """Label the item shown the way ``rater`` prefers; returns the next item."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    item = next(it for it in db.items() if it.id == item_id)
    body = driver.find_element(By.TAG_NAME, "body")
    if item_id in PAIRWISE[rater]:
        better = item.completions[PAIRWISE[rater][item_id]]
        body.send_keys("a" if answers[0] == better else "b")
    else:
        for file_index in RANKING[rater][item_id]:
            position = answers.index(item.completions[file_index])
            if use_keys:
                body.send_keys(str(position + 1))
            else:
                driver.find_element(By.ID, f"answer-{position}").click()
        ranks = [driver.find_element(By.ID, f"rank-{j}").get_attribute("value") for j in range(len(answers))]
        assert sorted(ranks) == ["1", "2", "3"]
        body.send_keys(Keys.ENTER)
    return _next(driver, item_id)


@pytest.mark.slow
def test_two_raters_label_in_chromium_and_a_closed_tab_loses_nothing(server, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    db, base = server
    driver = _browser()
    try:
        item_id, answers = _login(driver, base, "alice")
        for _ in range(2):
            item_id, answers = _label(driver, db, "alice", item_id, answers, use_keys=True)
        held, held_answers = item_id, answers
        driver.find_element(By.ID, "reason").send_keys("half-typed")  # mid-way: the tab closes
    finally:
        driver.quit()
    assert len(db.labels()) == 2  # both labels were saved as they were made

    driver = _browser()
    try:
        item_id, answers = _login(driver, base, "alice")
        assert (item_id, answers) == (held, held_answers)  # the same item, in the same order
        assert "You: 2 labelled, 3 left" in driver.find_element(By.ID, "progress-text").text
        while item_id:
            item_id, answers = _label(driver, db, "alice", item_id, answers, use_keys=False)
        assert "Nothing left" in driver.find_element(By.ID, "done").text

        driver.delete_all_cookies()
        item_id, answers = _login(driver, base, "bob")
        shots = os.environ.get("PEFTKERN_LABEL_SCREENSHOT")
        while item_id:
            if shots and item_id == "r1":
                driver.find_element(By.TAG_NAME, "body").send_keys(
                    str(answers.index(db.items()[3].completions[0]) + 1))
                driver.save_screenshot(shots)
                driver.find_element(By.ID, "reset").click()
            item_id, answers = _label(driver, db, "bob", item_id, answers, use_keys=True)
        driver.get(base + "/admin")
        admin = driver.find_element(By.TAG_NAME, "main").text
        assert "alice vs bob" in admin and "0.400" in admin
    finally:
        driver.quit()

    labels = db.labels()
    assert len(labels) == 10 and {lab["rater"] for lab in labels} == {"alice", "bob"}
    assert {(lab["rater"], lab["item_id"]): lab["value"] for lab in labels if lab["kind"] == "pairwise"} == {
        (r, i): {"verdict": str(v)} for r, by in PAIRWISE.items() for i, v in by.items()}

    out = tmp_path / "pairs.jsonl"
    assert main(["label", "export", "--db", db.path, "--out", str(out)]) == 0
    pairs = {(p["item_id"], p["chosen"], p["rejected"]): (p["agreement"], p["votes"])
             for p in map(json.loads, out.read_text().splitlines())}
    assert pairs == {  # p2 and r2's (0,1), (1,2) split one vote each way: no pair
        ("p1", "4 (good)", "5"): (1.0, 2), ("p3", "bye", "hi (good)"): (1.0, 2),
        ("r1", "large", "medium"): (1.0, 2), ("r1", "large", "small"): (1.0, 2),
        ("r1", "medium", "small"): (1.0, 2), ("r2", "fast", "still"): (1.0, 2)}

    capsys.readouterr()
    assert main(["label", "stats", "--db", db.path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairwise"]["cohen_kappa"]["alice|bob"] == {"units": 3, "kappa": pytest.approx(0.4, abs=1e-12),
                                                              "observed": pytest.approx(2 / 3)}
    assert report["ranking_pairs"]["cohen_kappa"]["alice|bob"] == {"units": 6, "kappa": pytest.approx(-0.2, abs=1e-12),
                                                                   "observed": pytest.approx(4 / 6)}


@pytest.mark.slow
def test_likert_flag_and_skip_by_keyboard(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "rate", "prompt": "Rate these", "completions": ["fine", "poor", "great"], "task": "rating"},
        {"id": "odd", "prompt": "Unclear prompt", "completions": ["x", "y"]},
        {"id": "later", "prompt": "Skip me", "completions": ["u", "v"]}]))
    db = LabelDB.create_or_open(str(tmp_path / "l.sqlite"), read_items(str(path)), scale=4)
    httpd = _quiet_server(create_app(db))
    driver = _browser()
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        driver.get(base + "/")
        driver.find_element(By.ID, "name").send_keys("carol")
        driver.find_element(By.ID, "login").click()
        item_id, answers = _current(driver)
        assert item_id == "rate" and len(driver.find_elements(By.CSS_SELECTOR, "#answer-0 .likert input")) == 4
        score = {"great": "4", "fine": "3", "poor": "1"}
        body = driver.find_element(By.TAG_NAME, "body")
        for text in answers:
            body.send_keys(score[text])  # each digit rates the next unrated answer
        body.send_keys(Keys.ENTER)
        item_id, _ = _next(driver, "rate")
        assert item_id == "odd"
        driver.find_element(By.ID, "reason").send_keys("the prompt asks nothing")
        driver.execute_script("document.activeElement.blur()")  # keys act when no text field has focus
        driver.find_element(By.TAG_NAME, "body").send_keys("f")
        item_id, _ = _next(driver, "odd")
        assert item_id == "later"
        driver.execute_script("document.getElementById('status').textContent = ''")
        driver.find_element(By.TAG_NAME, "body").send_keys("s")  # skipped: the only item left comes back
        _wait(driver, lambda d: "saved" in d.find_element(By.ID, "status").text, "the skip")
        assert _current(driver)[0] == "later"
    finally:
        driver.quit()
        httpd.shutdown()
    labels = {lab["item_id"]: lab for lab in db.labels()}
    assert labels["rate"]["value"] == {"ratings": [3, 1, 4]}  # file order: fine, poor, great
    assert labels["odd"]["kind"] == "flag" and labels["odd"]["reason"] == "the prompt asks nothing"
    assert "later" not in labels
    assert sqlite3.connect(db.path).execute("SELECT rater, item_id FROM skips").fetchall() == [("carol", "later")]
