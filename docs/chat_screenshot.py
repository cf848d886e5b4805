"""Make docs/chat-page.png: the chat page of `edgecloud serve` answering through a real split.

    .venv/bin/python docs/chat_screenshot.py [--model smollm2-135m] [--split 15]

Starts a broker, one worker and `edgecloud serve` on loopback (cli.cluster.LocalCluster), asks
two questions in headless Chromium (Debian's chromium and chromium-driver) and saves the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QUESTIONS = ["What is edge computing? Answer in two sentences.", "Name three uses of it."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="15")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "chat-page.png")
    args = ap.parse_args()

    import browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from cli.cluster import LocalCluster, free_port

    with LocalCluster(model=args.model) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=600)
        port = free_port()
        cluster.start_server(port, "--split", args.split, timeout_s=600)
        with browser.chromium(1000, 760) as page:
            page.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(page, 300)
            wait.until(lambda d: d.find_element(By.ID, "model").text == args.model)
            for i, question in enumerate(QUESTIONS):
                page.find_element(By.ID, "prompt").send_keys(question)
                page.find_element(By.ID, "send").click()
                wait.until(lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR,
                                                                  ".msg.assistant[data-done='true']")) == n)
            page.save_screenshot(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
