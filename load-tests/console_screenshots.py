"""Screenshots of the review console for the docs: the queue and an item, on a desktop and a phone.

Starts a dev broker (tansu) on a free port and `sieve console topologies/moderation.yaml --dev
--seed 8` on it (eight of the demo's messages as hand-offs), with a lead ``shots`` in a temporary
users file; logs in with headless Chromium, takes the next item, and saves

    docs/console/queue-desktop.png, docs/console/item-desktop.png   (1280x800)
    docs/console/queue-phone.png,   docs/console/item-phone.png     (390x844)

Needs /usr/bin/chromium and /usr/bin/chromedriver (and the MiniLM encoder, for the seed).
Exits non-zero, with the console's log, when anything fails.

    .venv/bin/python load-tests/console_screenshots.py
    .venv/bin/python load-tests/console_screenshots.py --out /tmp/shots
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from sieve.kafka.broker import start_dev_broker, stop_process

REPO = Path(__file__).resolve().parents[1]
SIZES = {"desktop": (1280, 800, False), "phone": (390, 844, True)}
MAX_PNG_BYTES = 200_000
READY_S = 240.0  # the seed loads and runs the encoder before the console serves


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, console: subprocess.Popen[bytes], log: Path) -> None:
    """Until the console's /readyz answers 200; raises with its log when it exits or takes too long."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if console.poll() is not None:
            raise RuntimeError(f"the console exited ({console.returncode}):\n"
                               f"{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the console was not ready within {READY_S:.0f} s:\n"
                       f"{log.read_text(errors='replace')}")


def chromium() -> webdriver.Chrome:
    """Headless Chromium."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))


def viewport(driver: webdriver.Chrome, size: str) -> None:
    """The page's viewport exactly this size (a phone: a mobile viewport, so the meta viewport applies)."""
    width, height, mobile = SIZES[size]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def shoot(driver: webdriver.Chrome, url: str, path: Path) -> None:
    """Open ``url`` and save the viewport as a small PNG (palette colours when the full one is big)."""
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    if out.tell() > MAX_PNG_BYTES:
        out = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    path.write_bytes(out.getvalue())
    print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {image.width}x{image.height}, "
          f"{out.tell() // 1024} KiB")


def screenshots(url: str, user: str, password: str, out: Path) -> None:
    """Log in, take the next item, and save the queue and the item at both sizes."""
    driver = chromium()
    try:
        viewport(driver, "desktop")
        driver.get(f"{url}/login")
        driver.find_element(By.ID, "user").send_keys(user)
        driver.find_element(By.ID, "password").send_keys(password)
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, "waiting-items"))
        shoot(driver, url, out / "queue-desktop.png")
        driver.find_element(By.ID, "take-next").click()
        WebDriverWait(driver, 30).until(
            lambda d: "/item/" in d.current_url and d.find_elements(By.ID, "decide-form"))
        item = driver.current_url
        shoot(driver, item, out / "item-desktop.png")
        viewport(driver, "phone")
        shoot(driver, url, out / "queue-phone.png")
        shoot(driver, item, out / "item-phone.png")
    finally:
        driver.quit()


def main() -> int:
    """Broker, users file, console, screenshots; everything it started is stopped again."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "console", help="folder for the PNGs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="console-shots-") as folder:
        tmp = Path(folder)
        broker_port, console_port = free_port(), free_port()
        broker = start_dev_broker(port=broker_port, log_path=tmp / "broker.log")
        console: subprocess.Popen[bytes] | None = None
        log = tmp / "console.log"
        try:
            users_file, password = tmp / "users.yaml", secrets.token_urlsafe(12)
            env = {**os.environ, "SIEVE_DEV_BROKER__PORT": str(broker_port),
                   "SIEVE_CONSOLE__USERS_FILE": str(users_file), "SIEVE_METRICS_PORT": "0"}
            env.setdefault("SIEVE_ONNX_CACHE_DIR", str(REPO / ".sieve" / "cache" / "onnx"))
            subprocess.run([sys.executable, "-m", "sieve", "console", "users", "add", "shots",
                            "--role", "lead", "--password-stdin", "--users-file", str(users_file)],
                           input=f"{password}\n".encode(), env=env, cwd=REPO, check=True)
            with open(log, "wb") as output:
                console = subprocess.Popen(
                    [sys.executable, "-m", "sieve", "console", "topologies/moderation.yaml", "--dev",
                     "--seed", "8", "--port", str(console_port)],
                    cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{console_port}"
            wait_ready(url, console, log)
            screenshots(url, "shots", password, args.out)
        except Exception as exc:
            print(f"console_screenshots: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if log.exists():
                print(f"--- console log ---\n{log.read_text(errors='replace')[-6000:]}", file=sys.stderr)
            return 1
        finally:
            for process in (console, broker):
                if process is not None:
                    stop_process(process, 15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
