"""A scripted LLM endpoint for load runs: a TEST DOUBLE of an OpenAI-compatible Chat Completions API.

No judge model runs in the chaos run (it tests delivery, not meaning), so ``sieve review``
processes are pointed at this real HTTP server on 127.0.0.1 instead. It answers
``POST /v1/chat/completions`` after a short random delay with a valid verdict that depends
only on the reviewed item's text (so a repeated review, after a reviewer was killed, gets
the same verdict):

* a ``malformed_share`` of the items get a reply that is not JSON (the reviewer retries once,
  then hands the event off to human review: the run's hand-offs);
* a ``violating_share`` get ``violating`` with one of the set's violating routes;
* the rest get the default outcome with no route.

Routes and outcomes are read from the request's system message (``- <route> -> <outcome>:``
lines), the item from the user message's ``<item-NONCE>`` markers. For a multi-mode route set
(the request's reply schema has ``routes``) the reply also lists the routes that apply: the
violating route, or none. Fault injection, drawn
per request from a seeded generator: a ``fail_share`` of requests are answered 503, a
``hang_share`` are held ``hang_s`` seconds (longer than the reviewer's ``llm.timeout_s``) and
then answered. Both only cost retries: the reviewer waits for the endpoint, it never
diverts an event for it being down.

    with ScriptedEndpoint(fail_share=0.05, hang_share=0.02) as llm:
        env["SIEVE_LLM__BASE_URL"] = llm.base_url
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ITEM = re.compile(r"<item-([0-9a-f]+)>\n(.*)\n</item-\1>", re.DOTALL)
_ROUTE = re.compile(r"^- (\S+) -> (\S+): ", re.MULTILINE)
_DEFAULT = re.compile(r"If no route applies, the verdict is '([^']+)'")


def share_of(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``text`` (and ``salt``): the same item always draws the same."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def message_text(message: dict[str, Any]) -> str:
    """A chat message's text (the text parts of a multi-part content)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def is_multi(body: dict[str, Any]) -> bool:
    """Whether the request is for a multi-mode route set: its reply schema (or prompt) asks for ``routes``."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        properties = (response_format["json_schema"].get("schema") or {}).get("properties") or {}
        return "routes" in properties
    system = message_text((body.get("messages") or [{}])[0])
    return '"routes" (the names of every route that applies' in system


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that is quiet about clients gone (a reviewer SIGKILLed mid-request)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore a reset or closed connection; report anything else as the standard server does."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ScriptedEndpoint:
    """The server, on a thread: ``with ScriptedEndpoint() as llm: llm.base_url``."""

    def __init__(  # noqa: PLR0913
        self,
        *,
        delay_s: tuple[float, float] = (0.05, 0.3),
        violating_share: float = 0.3,
        malformed_share: float = 0.05,
        fail_share: float = 0.0,
        hang_share: float = 0.0,
        hang_s: float = 5.0,
        seed: int = 7,
    ) -> None:
        self.delay_s, self.violating_share, self.malformed_share = delay_s, violating_share, malformed_share
        self.fail_share, self.hang_share, self.hang_s = fail_share, hang_share, hang_s
        self.counts: Counter = Counter()  # answered: verdict / malformed / 503 / hung
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True,
                                        name="llm-script")

    @property
    def base_url(self) -> str:
        """The API root the reviewer appends ``/chat/completions`` to."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, body: dict[str, Any]) -> str:
        """The assistant content for a request: a verdict fixed by the item's text, or malformed."""
        messages = body.get("messages") or [{}]
        system = message_text(messages[0])
        match = _ITEM.search(message_text(messages[-1]))
        item = match.group(2) if match else json.dumps(body.get("messages"))
        draw = share_of(item, "verdict")
        if draw < self.malformed_share:
            return "Sure! I think this one is probably fine."
        default = _DEFAULT.search(system)
        routes = _ROUTE.findall(system)
        violating = sorted(name for name, outcome in routes if outcome == "violating")
        reply: dict[str, Any] = {"verdict": default.group(1) if default else "clean", "route": None}
        if violating and draw < self.malformed_share + self.violating_share:
            route = violating[int(share_of(item, "route") * len(violating))]
            reply = {"verdict": "violating", "route": route}
        if is_multi(body):
            reply = {"routes": [reply["route"]] if reply["route"] else [], **reply}
        return json.dumps({**reply, "confidence": 0.9, "rationale": "scripted verdict"})

    def _fault(self) -> tuple[str | None, float]:
        """This request's fault (None, ``"503"`` or ``"hang"``) and its delay."""
        with self._lock:
            draw = self._rng.random()
            delay = self._rng.uniform(*self.delay_s)
        if draw < self.fail_share:
            return "503", 0.0
        if draw < self.fail_share + self.hang_share:
            return "hang", self.hang_s
        return None, delay

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet)
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._send(400, b'{"error": "not JSON"}')
                    return
                if not self.path.endswith("/chat/completions"):
                    self._send(404, b'{"error": "not found"}')
                    return
                fault, delay = double._fault()
                time.sleep(delay)
                if fault == "503":
                    double._count("503")
                    self._send(503, b'{"error": "scripted outage"}')
                    return
                content = double.answer(body)
                double._count("hung" if fault == "hang" else
                              "malformed" if not content.startswith("{") else "verdict")
                completion = {
                    "id": "chatcmpl-scripted", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 300, "completion_tokens": 30, "total_tokens": 330},
                }
                self._send(200, json.dumps(completion).encode())

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        return Handler

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1
