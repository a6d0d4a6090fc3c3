#!/usr/bin/env python
"""A screenshot of the browser page (scripts/app.py) after it segmented an image, as a person would get it.

    python benchmarks/app_screenshot.py --model outputs/demo/model \
        --image demo_data/VOCdevkit/VOC2012/JPEGImages/demo_000400.jpg \
        --palette demo_data/VOCdevkit/VOC2012/classes.json --output docs/app.png

Starts `scripts/app.py` on a free local port, drives headless Chromium (Debian's `chromium` and
`chromium-driver`, through selenium) to upload the image, waits for the mask and the legend, and saves
the page. tests/test_app.py drives the page with the same helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cps_hf.cli import ArgumentParser, run_cli  # noqa: E402
from cps_hf.errors import UserInputError  # noqa: E402

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


def browser_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) on this machine, None where absent."""
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(model: str, *app_args: str, log: Path | None = None, timeout: float = 180) -> Iterator[str]:
    """scripts/app.py for `model` on a free local port, as a user starts it; yields the page's URL."""
    port = free_port()
    log = log or Path(tempfile.mkstemp(suffix=".log")[1])
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, str(REPO / "scripts" / "app.py"), "--model", model, "--port",
                                   str(port), *app_args], stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
                                  env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the app did not answer {url}: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = browser_paths()
    if not (binary and driver_path):
        raise UserInputError("no Chromium and chromedriver here: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def upload(driver, url: str, path: str | Path, timeout: float = 120):
    """Open the page and upload `path` through its file field; returns a waiter for what follows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    field = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#cps-upload input[type=file]")))
    field.send_keys(str(Path(path).resolve()))
    return wait


def wait_for_result(driver, wait) -> None:
    """Until the legend is drawn and the mask image has loaded."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cps-legend .cps-legend-entry"))
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('#cps-mask img'); return i && i.complete && i.naturalWidth > 0;"))


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="exported model folder or Hub id")
    parser.add_argument("--image", required=True, help="the image to upload")
    parser.add_argument("--output", required=True, help="where the PNG screenshot goes")
    parser.add_argument("--palette", default="voc", help="as scripts/app.py --palette")
    args = parser.parse_args(argv)
    if not Path(args.image).is_file():
        raise UserInputError(f"--image {args.image}: no such file")
    with served(args.model, "--palette", args.palette) as url, chromium() as driver:
        wait = upload(driver, url, args.image)
        wait_for_result(driver, wait)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.output))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
