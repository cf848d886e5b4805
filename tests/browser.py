"""Headless Chromium through selenium, for tests of the chat page (and its screenshot in docs/).

Debian's ``chromium`` and ``chromium-driver`` packages; ``.ci/run`` installs them. Nothing is
downloaded: the driver is named, and Selenium Manager is told to stay offline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    return os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)


@contextlib.contextmanager
def chromium(width: int = 1000, height: int = 720) -> Iterator:
    """A headless Chromium driven by selenium, with a profile of its own that is removed after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")
    profile = tempfile.mkdtemp(prefix="edgecloud-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox (root in a container), and none of the background connections a closed
    # network refuses.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
