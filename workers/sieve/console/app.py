"""The console's Starlette app: the pages behind their guards, signed sessions, the service's life."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware

from sieve.console import pages
from sieve.console.auth import LoginLimiter
from sieve.console.service import ConsoleService
from sieve.console.web import Console, Users, templates
from sieve.settings import ConsoleSettings


def build_app(service: ConsoleService, settings: ConsoleSettings, users: Users | None = None,
              manage_service: bool = True) -> Starlette:
    """The console's Starlette app; with ``manage_service`` it starts and stops ``service`` with itself."""
    if settings.secret_key is None:
        raise ValueError("the console needs a secret key to sign sessions (SIEVE_CONSOLE__SECRET_KEY)")
    console = Console(service, users or Users(settings.users_file), settings, templates(),
                      LoginLimiter(settings.login_max_failures, settings.login_window_s))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_service:
            await service.start()
        try:
            yield
        finally:
            if manage_service:
                await service.stop()

    middleware = [Middleware(SessionMiddleware, secret_key=settings.secret_key.get_secret_value(),
                             session_cookie="sieve_console", max_age=settings.session_max_age_s,
                             same_site="strict", https_only=settings.secure_cookies)]
    return Starlette(routes=pages.routes(console), middleware=middleware, lifespan=lifespan)
