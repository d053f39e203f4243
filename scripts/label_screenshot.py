"""Screenshot of the labelling page (docs/img/label-page.png) in headless Chromium.

    python scripts/label_screenshot.py candidates.jsonl docs/img/label-page.png [--instructions rater.md]

Serves the candidates in a temporary database, logs in as "rater-1", and photographs the first item
with its first answer picked (a ranking item shows rank 1 on it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates")
    p.add_argument("out")
    p.add_argument("--instructions", default=None)
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--height", type=int, default=760)
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    from peftkern.labeling.app import create_app
    from peftkern.labeling.db import LabelDB
    from peftkern.labeling.items import read_items

    browser = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        print("no chromium / chromedriver: apt-get install -y chromium chromium-driver", file=sys.stderr)
        return 2
    text = None
    if args.instructions:
        with open(args.instructions, encoding="utf-8") as f:
            text = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        db = LabelDB.create_or_open(os.path.join(tmp, "labels.sqlite"), read_items(args.candidates), 2)
        httpd = make_server("127.0.0.1", 0, create_app(db, text), threaded=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        os.environ.setdefault("SE_OFFLINE", "true")
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.width},{args.height}"):
            options.add_argument(a)
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            base = f"http://127.0.0.1:{httpd.server_port}/"
            driver.get(base)
            driver.find_element(By.ID, "name").send_keys("rater-1")
            driver.find_element(By.ID, "login").click()
            driver.get(base)
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "item").get_attribute("data-item-id"))
            if driver.find_elements(By.ID, "rank-0"):
                driver.find_element(By.TAG_NAME, "body").send_keys("1")
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
            httpd.shutdown()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
