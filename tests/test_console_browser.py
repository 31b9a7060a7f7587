"""The review console in a real browser: the `sieve console` process, headless Chromium, the dev broker.

What a moderator does, end to end: log in, see the queue, take the next item with ``n``,
decide it with ``2`` (the keyboard shortcuts of console.js), and the verdict and its human
label land on their topics. A second moderator sees the item the first one holds as taken,
without a way to decide it. An event's hostile text shows as text and runs nothing.

The tests share one console process and two browsers (module-scoped); they run in file order
(the queue test counts the three hand-offs put there before the console started).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from sieve.kafka.broker import stop_process
from sieve.topology import load_topology

from .conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "load-tests"))
from console_screenshots import chromium, wait_ready  # noqa: E402  (the screenshot script's helpers)

from .console_helpers import PASSWORD, ConsoleSetup, console_setup, handoff, produce_handoffs, read_json

pytestmark = pytest.mark.integration

HOSTILE = ('<script>window.__x=1</script><img src=x onerror="window.__y=1">'
           '<a href="javascript:window.__z=1">j</a>')
EVENTS = ["browser-1", "browser-2", "browser-3"]
WAIT_S = 30.0


@dataclass
class RunningConsole:
    """The console process under test: its address, its setup and its log."""

    url: str
    setup: ConsoleSetup
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def running(dev_broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningConsole]:
    """Three hand-offs on fresh topics, then `sieve console` serving them on a free port."""
    folder = tmp_path_factory.mktemp("console-browser")
    setup = console_setup(folder, dev_broker)
    asyncio.run(produce_handoffs(setup, [handoff(e, f"message number {i}") for i, e in enumerate(EVENTS, 1)]))
    topology_file = folder / "topology.yaml"
    topology_file.write_text(yaml.safe_dump(setup.topology.model_dump(mode="json", exclude_none=True)))
    assert load_topology(topology_file).model_dump() == setup.topology.model_dump()
    port = free_port()
    log = folder / "console.log"
    env = {**os.environ, "SIEVE_KAFKA__BOOTSTRAP_SERVERS": dev_broker,
           "SIEVE_CONSOLE__SECRET_KEY": "browser-test-session-key",
           "SIEVE_CONSOLE__USERS_FILE": str(setup.settings.console.users_file),
           "SIEVE_METRICS_PORT": "0"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sieve", "console", str(topology_file), "--port", str(port)],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield RunningConsole(url, setup, log)
    finally:
        stop_process(process, 15)


def _until(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], what: str,
           console: RunningConsole) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition)
    except Exception as exc:
        pytest.fail(f"waiting for {what}: {type(exc).__name__} at {driver.current_url}\n"
                    f"--- page ---\n{driver.page_source[-3000:]}\n--- console log ---\n{console.log_text()}")


def _loaded(driver: webdriver.Chrome) -> bool:
    return bool(driver.execute_script("return document.readyState") == "complete")


def _login(driver: webdriver.Chrome, console: RunningConsole, name: str) -> None:
    driver.get(f"{console.url}/login")
    driver.find_element(By.ID, "user").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    _until(driver, lambda d: d.current_url.rstrip("/") == console.url and d.find_elements(By.ID, "numbers"),
           f"{name}'s queue after logging in", console)


def _signed_in(console: RunningConsole, name: str) -> Iterator[webdriver.Chrome]:
    driver = chromium()
    try:
        _login(driver, console, name)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def alice(running: RunningConsole) -> Iterator[webdriver.Chrome]:
    """Browser A, signed in as the moderator alice."""
    yield from _signed_in(running, "alice")


@pytest.fixture(scope="module")
def bob(running: RunningConsole) -> Iterator[webdriver.Chrome]:
    """Browser B, signed in as the moderator bob."""
    yield from _signed_in(running, "bob")


def _press(driver: webdriver.Chrome, key: str) -> None:
    """A key typed with nothing focused (the page's body), as a person presses a shortcut."""
    driver.execute_script("if (document.activeElement) { document.activeElement.blur(); }")
    ActionChains(driver).send_keys(key).perform()


def _item_id(url: str) -> str:
    return url.rstrip("/").rsplit("/item/", 1)[1]


def test_moderator_decides_with_the_keyboard_and_a_colleague_sees_it_taken(
        running: RunningConsole, alice: webdriver.Chrome, bob: webdriver.Chrome) -> None:
    """n takes the next item, 2 decides it violating/threat: the verdict and a human label are published."""
    console, setup = running, running.setup
    assert alice.find_element(By.CSS_SELECTOR, ".who").text.startswith("alice")
    def three_waiting(driver: webdriver.Chrome) -> bool:
        driver.refresh()
        return bool(driver.find_element(By.ID, "waiting").text == "3")

    _until(alice, three_waiting, "3 waiting items", console)
    assert len(alice.find_elements(By.CSS_SELECTOR, "#waiting-items tr.item-row")) == 3

    _press(alice, "n")
    _until(alice, lambda d: "/item/" in d.current_url and _loaded(d)
           and d.find_elements(By.ID, "decide-form"), "the item alice took", console)
    first = _item_id(alice.current_url)
    assert alice.find_element(By.ID, "status").get_attribute("data-status") == "claimed"
    assert "Yours until" in alice.find_element(By.ID, "status").text
    second_choice = alice.find_element(By.CSS_SELECTOR, 'button.choice[data-key="2"]')
    assert second_choice.get_attribute("value") == "violating"
    assert second_choice.get_attribute("data-route") == "threat"
    event_id = alice.find_element(By.CSS_SELECTOR, "#status .meta").text.split()[1]
    assert event_id in EVENTS

    _press(alice, "2")
    # deciding opens the next item, claimed for alice
    _until(alice, lambda d: "/item/" in d.current_url and _item_id(d.current_url) != first and _loaded(d)
           and d.find_elements(By.ID, "decide-form"), "the next item after deciding", console)
    held = alice.current_url

    verdicts = asyncio.run(read_json(setup.kafka, setup.topics["violating"], want=1))
    assert [v["event_id"] for v in verdicts] == [event_id]
    verdict = verdicts[0]
    assert verdict["outcome"] == "violating"
    assert verdict["route"] == "threat"
    assert verdict["review"]["moderator"] == "alice"
    labels = asyncio.run(read_json(setup.kafka, setup.topics["labels"], want=1))
    assert len(labels) == 1
    label = labels[0]
    assert (label["event_id"], label["outcome"], label["route"]) == (event_id, "violating", "threat")
    assert (label["labeller_kind"], label["labeller"]) == ("human", "alice")
    assert label["decision_id"] == verdict["id"]

    # bob opens the item alice holds: taken, nothing to decide it with
    bob.get(held)
    _until(bob, lambda d: d.find_elements(By.ID, "status"), "the held item in bob's browser", console)
    assert bob.find_element(By.ID, "status").get_attribute("data-status") == "claimed"
    assert bob.find_element(By.ID, "taken").text.startswith("Taken by alice")
    assert bob.find_elements(By.ID, "decide-form") == []
    assert bob.find_elements(By.CSS_SELECTOR, "button.choice") == []
    assert bob.find_elements(By.ID, "claim") == []
    # the queue lists it under alice's claims, with the decided item gone from the waiting ones
    bob.get(console.url)
    claimed = bob.find_element(By.ID, "claimed-items").text
    assert "alice" in claimed
    assert bob.find_element(By.ID, "waiting").text == "1"


def _page_globals(driver: webdriver.Chrome) -> list[str]:
    return list(driver.execute_script("return [typeof window.__x, typeof window.__y, typeof window.__z];"))


def test_hostile_text_is_shown_as_text(running: RunningConsole, bob: webdriver.Chrome) -> None:
    """Markup in an event's text is escaped on the queue and the item page: no script, image or link runs."""
    console = running
    asyncio.run(produce_handoffs(console.setup, [handoff("browser-hostile", HOSTILE)]))

    def hostile_link(driver: webdriver.Chrome) -> Any:
        driver.get(console.url)
        links = [a for a in driver.find_elements(By.CSS_SELECTOR, "#waiting-items a") if a.text == HOSTILE]
        return links[0] if links else False

    link = _until(bob, hostile_link, "the hostile hand-off in the queue", console)
    assert _loaded(bob)
    assert _page_globals(bob) == ["undefined"] * 3
    assert bob.find_elements(By.CSS_SELECTOR, "main script, main img, main a[href^='javascript:']") == []

    bob.get(link.get_attribute("href"))
    _until(bob, lambda d: _loaded(d) and d.find_elements(By.ID, "item-text"), "the hostile item's page",
           console)
    assert _page_globals(bob) == ["undefined"] * 3
    assert bob.find_element(By.ID, "item-text").text == HOSTILE
    assert bob.find_elements(By.CSS_SELECTOR, "main script, main img, main a[href^='javascript:']") == []
    assert len(bob.find_elements(By.TAG_NAME, "script")) == 1  # console.js only
    source = bob.page_source
    assert "&lt;script&gt;window.__x=1&lt;/script&gt;&lt;img src=x onerror=" in source
    assert "&lt;a href=\"javascript:window.__z=1\"&gt;j&lt;/a&gt;" in source
