"""The console's web application: sign-in, the queue, an item, deciding (Starlette, Jinja2 templates).

Server-rendered pages with one small script (keyboard shortcuts), no build step. Every
page but the probes and ``/metrics`` needs a signed-in user: a session cookie signed by
Starlette's SessionMiddleware (itsdangerous) that expires ``session_max_age_s`` after
the login, or a trusted proxy's header when that setting is on. Every form carries the
session's CSRF token. Templates escape everything (autoescape), and the Content-Security-
Policy allows only the console's own script and style, so an event's text cannot run.
Handlers are in :mod:`sieve.console.pages`, the app in :mod:`sieve.console.app`; this module
holds what they share and the guards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from sieve.console.auth import LoginLimiter, csrf_ok, header_user, new_csrf_token, session_user
from sieve.console.service import ConsoleService
from sieve.console.users import User, UserFile, UserFileError
from sieve.settings import ConsoleSettings

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class Users:
    """The users file, read again whenever it changes on disk (``sieve console users ...`` edits it).

    A file that turns malformed keeps the last good users (the error is logged).
    """

    def __init__(self, path: Path, hasher: Any = None) -> None:
        self._file = UserFile.load(path, hasher=hasher)

    def file(self) -> UserFile:
        """The current users file."""
        try:
            self._file.refresh()
        except UserFileError as exc:
            log.error("console: the users file is malformed, keeping the last good users: %s", exc)
        return self._file

    def get(self, name: str) -> User | None:
        """An enabled user by name."""
        user = self.file().get(name)
        return user if user is not None and not user.disabled else None


@dataclass
class Console:
    """What the handlers share: the service, users, settings, the templates and the login limiter."""

    service: ConsoleService
    users: Users
    settings: ConsoleSettings
    templates: Environment
    limiter: LoginLimiter

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        """A page, with the signed-in user, the CSRF token and the broker banner in its context."""
        page = self.templates.get_template(name).render(
            request=request, csrf=request.session.get("csrf", ""), user=request.state.user,
            broker_error=self.service.broker_error, topology=self.service.topology.name, **context)
        return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)

    def signed_in(self, request: Request) -> User | None:
        """The request's user: the trusted proxy's header when that is on, else the session's."""
        name = header_user(request.headers, self.settings.trusted_user_header)
        if name is None:
            name = session_user(request.session, time.time(), self.settings.session_max_age_s)
        return self.users.get(name) if name else None


Handler = Callable[[Request, Console], Awaitable[Response]]


def page(console: Console, handler: Handler, *, lead: bool = False, form: bool = False
         ) -> Callable[[Request], Awaitable[Response]]:
    """``handler`` behind the guards: signed in (else /login), a lead where asked, a CSRF token on forms."""
    async def guarded(request: Request) -> Response:
        user = console.signed_in(request)
        request.state.user = user
        if user is None:
            request.session.clear()
            return RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
        if "csrf" not in request.session:  # a proxy-authenticated user gets a token on the first page
            request.session["csrf"] = new_csrf_token()
        if form:
            submitted = (await request.form()).get("csrf")
            if not csrf_ok(request.session.get("csrf"), submitted if isinstance(submitted, str) else None):
                return console.render(request, "error.html", 403, message="The form has expired: reload the "
                                      "page and try again.")
        if lead and not user.is_lead:
            return console.render(request, "error.html", 403, message="Only a lead may do this.")
        return await handler(request, console)
    return guarded


def templates() -> Environment:
    """The Jinja2 environment: the package's templates, every value escaped."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["age"] = _age
    return env


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
