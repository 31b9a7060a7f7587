"""Secrets stay secret: the LLM bearer token's transport, and what logs, errors and dead letters carry.

A known token is configured; the endpoint (ScriptedLLM, a FAULT-INJECTION DOUBLE
on 127.0.0.1) answers 500, 401, 400 and malformed 200s whose bodies quote the
token back, as a proxy echoing the request's headers would; image fetches fail
on URLs with credentials and query tokens. Logs (caplog, every logger at DEBUG),
exception strings, hand-offs, metric labels and dead letters are searched for
the secrets.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from sieve.review.engine import ReviewEngine
from sieve.review.llm import ChatClient, EndpointUnavailable
from sieve.review.steps import ReviewCatalogue
from sieve.settings import ImageFetchSettings, LLMSettings
from sieve.topology import ReviewSpec

from .llm_double import ScriptedLLM, Step
from .review_helpers import ROUTE_SET, make_decision
from .test_images import image_index, image_record, image_route_file, image_server, pipeline  # noqa: F401
from .test_security_net import PUBLIC, install

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-3b9f0c1e-known-secret"
PASSWORD = "s3cr3t-pass-7781"
QUERY_TOKEN = "qtok-55aa91"


def echo(status: int) -> Step:
    """An answer whose body quotes the Authorization header back."""
    return Step(status=status, raw=f'{{"error": "bad header Authorization: Bearer {SECRET}"}}'.encode())


# -- the token's transport -------------------------------------------------------------------


@pytest.mark.parametrize("base_url", ["http://llm.example:8000/v1", "http://10.0.0.5/v1",
                                      "http://ollama.localhost.example/v1"])
async def test_the_key_is_not_sent_over_plain_http_to_a_remote_host(base_url: str) -> None:
    settings = LLMSettings(base_url=base_url, api_key=SECRET)
    with pytest.raises(ValueError, match="allow_plaintext_api_key") as info:
        ChatClient(settings)
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="allow_plaintext_api_key"):  # the reviewer, at start
        ReviewEngine("t", ReviewSpec(), ReviewCatalogue.from_route_set(ROUTE_SET), settings)


def test_sieve_review_stops_at_start_with_a_clear_error(tmp_path) -> None:
    env = {**os.environ, "SIEVE_LLM__BASE_URL": "http://llm.example:8000/v1", "SIEVE_LLM__API_KEY": SECRET}
    command = [sys.executable, "-m", "sieve", "review", str(REPO / "topologies" / "moderation.yaml")]
    # Before anything else (the broker is not even asked for): a deadline, not a timing claim.
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "allow_plaintext_api_key" in done.stderr + done.stdout
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.parametrize(("base_url", "update"), [
    ("https://api.example.com/v1", {}),
    ("http://127.0.0.1:8000/v1", {}),
    ("http://localhost:11434/v1", {}),
    ("http://[::1]:8080/v1", {}),
    ("http://llm.example:8000/v1", {"allow_plaintext_api_key": True}),
    ("http://llm.example:8000/v1", {"api_key": None}),
])
async def test_keys_over_tls_loopback_or_explicitly_allowed_are_accepted(base_url: str, update) -> None:
    client = ChatClient(LLMSettings(**{"base_url": base_url, "api_key": SECRET, **update}))
    await client.aclose()


def test_credentials_in_the_base_url_are_refused() -> None:
    with pytest.raises(ValueError, match="must not carry credentials") as info:
        ChatClient(LLMSettings(base_url=f"https://user:{SECRET}@api.example.com/v1"))
    assert SECRET not in str(info.value)


def test_a_settings_error_does_not_print_the_key() -> None:
    with pytest.raises(ValueError, match="api_key") as info:  # a key of the wrong shape
        LLMSettings(base_url="https://api.example.com/v1", api_key={"value": SECRET})
    assert SECRET not in str(info.value)


# -- what a failing review leaves behind -----------------------------------------------------


def _metric_labels() -> list[str]:
    return [value for metric in REGISTRY.collect() for sample in metric.samples
            for value in sample.labels.values()]


async def test_the_token_is_in_no_log_exception_hand_off_or_metric_label(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with ScriptedLLM() as llm:
        settings = LLMSettings(base_url=llm.base_url, api_key=SECRET, max_retries=1, timeout_s=2,
                               backoff_base_s=0.01, backoff_max_s=0.05)
        client = ChatClient(settings)
        try:
            llm.script.extend([echo(500), echo(401)])
            with pytest.raises(EndpointUnavailable) as info:
                await client.complete({"messages": []})
        finally:
            await client.aclose()
        messages = [str(info.value), repr(info.value)]
        assert "HTTP 401" in str(info.value) and "[redacted]" in str(info.value)

        reviewer = ReviewEngine("secrets", ReviewSpec(max_reviews_per_s=1000),
                                ReviewCatalogue.from_route_set(ROUTE_SET), settings)
        try:
            llm.script.append(echo(400))
            rejected = await reviewer.review(make_decision("a"))
            llm.script.extend([Step(raw=f'{{"echo": "Bearer {SECRET}"}}'.encode())] * 2)
            malformed = await reviewer.review(make_decision("b"))
        finally:
            await reviewer.aclose()
    # The token was sent, to the loopback endpoint, on every request.
    assert llm.authorizations == [f"Bearer {SECRET}"] * 5
    for final, reason in ((rejected, "request_rejected"), (malformed, "malformed_reply")):
        assert final.review is not None and final.review.handoff_reason == reason
        messages += [final.review.error or "", final.model_dump_json()]
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert "retrying" in logged  # the failures were logged
    for text in [*messages, logged, *_metric_labels()]:
        assert SECRET not in text


# -- image URLs with credentials -------------------------------------------------------------


def test_image_url_credentials_stay_out_of_dead_letters(monkeypatch, caplog, pipeline,  # noqa: F811
                                                        image_server: str) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    install(monkeypatch, {"creds.test": [[PUBLIC]]})
    pipeline.image_fetch = ImageFetchSettings(allow_hosts=("127.0.0.1",), timeout_s=2, fetch_deadline_s=4)
    port = image_server.rsplit(":", 1)[1]
    uris = [
        f"http://user:{PASSWORD}@127.0.0.1:{port}/missing.png?token={QUERY_TOKEN}",  # 404
        f"https://user:{PASSWORD}@creds.test/x.png?token={QUERY_TOKEN}",  # nothing answers there
        f"http://user:{PASSWORD}@127.0.0.1:{port}/to-metadata",  # a redirect to a refused address
        f"http://user:{PASSWORD}@nowhere.invalid/x.png",  # cannot resolve
    ]
    result = pipeline.process([image_record(i, uri=uri) for i, uri in enumerate(uris)])
    assert {letter.offset: letter.reason for letter in result.dead_letters} == {
        0: "image_fetch_failed", 1: "image_fetch_failed", 2: "image_uri_refused", 3: "image_fetch_failed"}
    assert "answered 404" in result.dead_letters[0].error
    for letter in result.dead_letters:
        shown = letter.model_dump_json(exclude={"payload_b64"})  # the original bytes are kept as they were
        assert PASSWORD not in shown and QUERY_TOKEN not in shown, shown
    assert PASSWORD not in caplog.text and QUERY_TOKEN not in caplog.text
