"""The console's web app on the dev broker (Starlette's test client): sign-in, guards, escaping, conflicts."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from sieve.console.app import build_app
from sieve.console.service import ConsoleService
from sieve.console.web import Users
from sieve.kafka.broker import start_dev_broker

from .conftest import free_port
from .console_helpers import FAST_HASHER, PASSWORD, ConsoleSetup, console_setup, handoff, produce_handoffs

pytestmark = pytest.mark.integration

HOSTILE = ('<script>alert(1)</script><img src=x onerror="alert(2)"><a href="javascript:alert(3)">x</a>'
           '"\' onmouseover=alert(4)')


def client_for(setup: ConsoleSetup) -> TestClient:
    service = ConsoleService(setup.topology, setup.route_set, setup.settings)
    app = build_app(service, setup.settings.console, Users(setup.settings.console.users_file, FAST_HASHER))
    return TestClient(app, follow_redirects=False)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.1)


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def login(client: TestClient, user: str, password: str = PASSWORD) -> Any:
    token = csrf(client.get("/login").text)
    return client.post("/login", data={"user": user, "password": password, "csrf": token})


def page(client: TestClient, url: str) -> str:
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code, response.text[:300])
    return response.text


@pytest.fixture
def world(dev_broker: str, tmp_path: Path) -> Iterator[tuple[ConsoleSetup, list[Any]]]:
    setup = console_setup(tmp_path, dev_broker)
    handoffs = [handoff("e1", "you will regret this", llm_verdict="violating", tenant="acme"),
                handoff("e2", HOSTILE, tenant="globex"),
                handoff("e3", "x" * 300_000),
                handoff("e4", None, modality="image", image_uri="http://127.0.0.1:1/private.png")]
    asyncio.run(produce_handoffs(setup, handoffs))
    yield setup, handoffs


def test_nothing_is_visible_without_logging_in(world: tuple[ConsoleSetup, list[Any]]) -> None:
    setup, handoffs = world
    with client_for(setup) as client:
        for url in ("/", f"/item/{handoffs[0].id}", f"/item/{handoffs[0].id}/image"):
            response = client.get(url)
            assert (response.status_code, response.headers["location"]) == (303, "/login")
            assert "you will regret" not in response.text
        response = client.post(f"/item/{handoffs[0].id}/decide", data={"outcome": "clean"})
        assert (response.status_code, response.headers["location"]) == (303, "/login")
        assert client.get("/healthz").status_code == 200
        assert "sieve_console_items_waiting" in client.get("/metrics").text


def test_logins_are_checked_and_rate_limited(world: tuple[ConsoleSetup, list[Any]]) -> None:
    setup, _ = world
    with client_for(setup) as client:
        wrong = login(client, "alice", "not the password")
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
        assert login(client, "nobody").status_code == 401
        forged = client.post("/login", data={"user": "alice", "password": PASSWORD, "csrf": "forged"})
        assert forged.status_code == 403
        for _ in range(setup.settings.console.login_max_failures - 1):
            login(client, "alice", "still wrong")
        limited = login(client, "alice")  # the right password, but too many failures in the window
        assert limited.status_code == 429 and "Too many failed logins" in limited.text
        assert login(client, "bob").status_code == 429  # the same client address is limited too
        failures = re.search(r'sieve_console_login_failures_total\{topology="cons"\} (\S+)',
                             client.get("/metrics").text)
        assert failures is not None and float(failures.group(1)) >= 6


def test_forms_need_the_sessions_csrf_token(world: tuple[ConsoleSetup, list[Any]]) -> None:
    setup, handoffs = world
    with client_for(setup) as client:
        wait_ready(client)
        assert login(client, "alice").status_code == 303
        refused = client.post("/next", data={"csrf": "not-the-token"})
        assert refused.status_code == 403 and "The form has expired" in refused.text
        refused = client.post(f"/item/{handoffs[0].id}/decide", data={"outcome": "clean"})
        assert refused.status_code == 403
        assert "Waiting." in page(client, f"/item/{handoffs[0].id}")  # nothing was claimed or decided


def test_hostile_and_huge_content_renders_as_text(world: tuple[ConsoleSetup, list[Any]]) -> None:
    setup, handoffs = world
    with client_for(setup) as client:
        wait_ready(client)
        login(client, "alice")
        hostile = client.get(f"/item/{handoffs[1].id}")
        assert "script-src 'self'" in hostile.headers["content-security-policy"]
        assert "<script>alert" not in hostile.text and "onerror=\"alert" not in hostile.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in hostile.text
        assert 'href="javascript:' not in hostile.text
        queue = page(client, "/")
        assert "<script>alert" not in queue and "&lt;script&gt;" in queue
        huge = page(client, f"/item/{handoffs[2].id}")
        assert "280000 more characters not shown" in huge and len(huge) < 100_000
        image_page = page(client, f"/item/{handoffs[3].id}")
        assert "http://127.0.0.1:1/private.png" not in image_page.split('id="item-image"')[1][:200]
        image = client.get(f"/item/{handoffs[3].id}/image")
        assert image.status_code == 404 and image.text.startswith("image unavailable: image_")


def test_claims_conflicts_and_roles(world: tuple[ConsoleSetup, list[Any]]) -> None:
    setup, handoffs = world
    first = handoffs[0]
    with client_for(setup) as client:
        wait_ready(client)

        def as_user(name: str) -> str:
            client.cookies.clear()
            assert login(client, name).status_code == 303
            return csrf(page(client, "/"))

        token = as_user("alice")
        item = page(client, f"/item/{first.id}")
        assert "The LLM's answer" in item and "Threats of violence" in item  # its verdict and the policy
        assert client.post(f"/item/{first.id}/claim", data={"csrf": token}).status_code == 303

        token = as_user("bob")
        assert "Taken by alice" in page(client, f"/item/{first.id}")
        taken = client.post(f"/item/{first.id}/decide", data={"csrf": token, "outcome": "clean"})
        assert taken.status_code == 409 and "claimed by alice" in taken.text
        refused = client.post(f"/item/{first.id}/reassign", data={"csrf": token, "to": "bob"})
        assert refused.status_code == 403 and "Only a lead" in refused.text

        token = as_user("lena")
        moved = client.post(f"/item/{first.id}/reassign", data={"csrf": token, "to": "bob"})
        assert moved.status_code == 303 and "Taken by bob" in page(client, f"/item/{first.id}")

        token = as_user("bob")
        decided = client.post(f"/item/{first.id}/decide",
                              data={"csrf": token, "outcome": "violating", "routes": ["threat"]})
        assert decided.status_code == 303 and decided.headers["location"].startswith("/item/")

        token = as_user("alice")
        late = client.post(f"/item/{first.id}/decide", data={"csrf": token, "outcome": "clean"})
        assert late.status_code == 409 and "already decided by bob" in late.text
        numbers = client.get("/metrics").text
        assert ('sieve_console_decisions_total{moderator="bob",outcome="violating",topology="cons"} 1.0'
                in numbers)
        assert 'sieve_console_llm_agreement_total{agree="true",topology="cons"} 1.0' in numbers


def test_sessions_expire(dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker, session_max_age_s=2)
    with client_for(setup) as client:
        assert login(client, "alice").status_code == 303
        assert client.get("/").status_code == 200
        time.sleep(2.5)
        response = client.get("/")
        assert (response.status_code, response.headers["location"]) == (303, "/login")


def test_a_trusted_proxy_header_signs_in_known_users_only(dev_broker: str, tmp_path: Path) -> None:
    setup = console_setup(tmp_path, dev_broker, trusted_user_header="X-Forwarded-User")
    with client_for(setup) as client:
        assert client.get("/", headers={"X-Forwarded-User": "alice"}).status_code == 200
        assert client.get("/", headers={"X-Forwarded-User": "mallory"}).status_code == 303
    plain = console_setup(tmp_path / "plain", dev_broker)
    with client_for(plain) as client:  # off by default: the header means nothing
        assert client.get("/", headers={"X-Forwarded-User": "alice"}).status_code == 303


def test_a_lost_broker_shows_a_banner_not_a_blank_page(tmp_path: Path) -> None:
    """Fault injection: the console's own broker is stopped under it."""
    port = free_port()
    broker = start_dev_broker(port=port, log_path=tmp_path / "tansu.log")
    try:
        setup = console_setup(tmp_path, f"127.0.0.1:{port}")
        with client_for(setup) as client:
            wait_ready(client)
            login(client, "alice")
            assert 'id="broker-error"' not in page(client, "/")
            broker.terminate()
            broker.wait(10)
            deadline = time.monotonic() + 60
            while 'id="broker-error"' not in (text := client.get("/").text):
                assert time.monotonic() < deadline, "no banner within 60 s of the broker going away"
                time.sleep(0.5)
            assert "cannot reach the broker" in text
            assert client.get("/readyz").status_code == 503
    finally:
        if broker.poll() is None:
            broker.kill()
