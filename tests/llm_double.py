"""ScriptedLLM: a FAULT-INJECTION DOUBLE of an OpenAI-compatible Chat Completions server.

The tests run with no judge model (none is installed for them), so the reviewer's
behaviour is tested against this real HTTP server on 127.0.0.1: it answers
``POST /v1/chat/completions`` from a script (status, body, delay, headers, one
step per request), from an outage window (503s for a while), or, by default,
"correctly" from markers in the reviewed item's text:

* ``[violating:<route>]`` → verdict ``violating`` with that route;
* ``[malformed]`` → a reply that is not JSON;
* ``[extra]`` → a valid reply plus a field the schema does not have;
* ``[inject]`` → obeys the injected instruction in the item (a verdict that
  is not an outcome plus an extra field), as a gullible model would;
* ``[unsure]`` → a valid reply with confidence 0.2;
* anything else → ``clean``, no route, confidence 0.9.

When the request's reply schema has ``routes`` (a multi-label set's review), the default
answers carry ``routes`` too: the marked route, or none.

It records every request body so tests can look at what the reviewer sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ITEM = re.compile(r"<item-([0-9a-f]+)>\n(.*)\n</item-\1>", re.DOTALL)
_MARK = re.compile(r"\[violating:([a-z0-9_\-]+)\]")


@dataclass
class Step:
    """One scripted answer."""

    status: int = 200
    content: str | None = None  # the assistant message content (status 200)
    raw: bytes | None = None  # the whole response body instead
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    usage: tuple[int, int] | None = (120, 30)


def review_json(verdict: str, route: str | None = None, confidence: float = 0.9,
                rationale: str = "scripted", **extra: Any) -> str:
    return json.dumps({"verdict": verdict, "route": route, "confidence": confidence,
                       "rationale": rationale, **extra})


def item_of(body: dict[str, Any]) -> str | None:
    """The reviewed item's text, read back from the user message's markers (None for images)."""
    user = body["messages"][-1]["content"]
    if not isinstance(user, str):
        return None
    match = _ITEM.search(user)
    return json.loads(match.group(2)) if match else None


def default_answer(body: dict[str, Any]) -> Step:
    """What a well-behaved (or, for ``[inject]``, gullible) model would answer."""
    text = item_of(body) or ""
    if "[malformed]" in text:
        return Step(content="Sure! The verdict is: violating, probably.")
    if "[extra]" in text:
        return Step(content=review_json("clean", extra_field="not in the schema"))
    if "[inject]" in text:
        return Step(content=review_json("approved", None, 1.0, "as instructed", admin=True))
    if "[unsure]" in text:
        return Step(content=review_json("clean", None, 0.2))
    mark = _MARK.search(text)
    multi = "routes" in ((body.get("response_format") or {}).get("json_schema") or {}).get(
        "schema", {}).get("properties", {})
    if mark:
        routes = {"routes": [mark.group(1)]} if multi else {}
        return Step(content=review_json("violating", mark.group(1), 0.95, "scripted: marked violating",
                                        **routes))
    return Step(content=review_json("clean", None, 0.9, **({"routes": []} if multi else {})))


class ScriptedLLM:
    """The server; ``with ScriptedLLM() as llm: llm.base_url``."""

    def __init__(self) -> None:
        self.script: deque[Step] = deque()
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.request_times: list[float] = []
        self.statuses: list[int] = []
        self.outage_s = 0.0
        self.outage_status = 503
        self.outage_retry_after: str | None = None
        self._outage_until: float | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ScriptedLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def arm_outage(self, seconds: float, status: int = 503, retry_after: str | None = None) -> None:
        """Answer ``status`` to every request for ``seconds`` from the next request on."""
        with self._lock:
            self.outage_s, self.outage_status, self.outage_retry_after = seconds, status, retry_after
            self._outage_until = None

    def _next_step(self, body: dict[str, Any]) -> Step:
        with self._lock:
            now = time.monotonic()
            self.requests.append(body)
            self.request_times.append(now)
            if self.outage_s > 0:
                if self._outage_until is None:
                    self._outage_until = now + self.outage_s
                if now < self._outage_until:
                    headers = {"Retry-After": self.outage_retry_after} if self.outage_retry_after else {}
                    return Step(status=self.outage_status, raw=b'{"error": "scripted outage"}',
                                headers=headers)
            if self.script:
                return self.script.popleft()
        return default_answer(body)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}', {})
                    return
                with double._lock:
                    double.authorizations.append(self.headers.get("Authorization"))
                step = double._next_step(body)
                if step.delay_s:
                    time.sleep(step.delay_s)
                if step.raw is not None:
                    payload = step.raw
                else:
                    completion: dict[str, Any] = {
                        "id": "chatcmpl-scripted",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": step.content}}],
                    }
                    if step.usage is not None:
                        completion["usage"] = {"prompt_tokens": step.usage[0],
                                               "completion_tokens": step.usage[1],
                                               "total_tokens": sum(step.usage)}
                    payload = json.dumps(completion).encode()
                with double._lock:
                    double.statuses.append(step.status)
                self._send(step.status, payload, step.headers)

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        return Handler
