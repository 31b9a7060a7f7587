"""The console's pages and actions (see :mod:`sieve.console.web` for the guards around them)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sieve.console import metrics
from sieve.console.auth import csrf_ok, new_csrf_token, start_session
from sieve.console.images import ImageRejected, image_png
from sieve.console.queue import Conflict, Item, tenants_and_routes
from sieve.console.verdict import Choice, InvalidChoice
from sieve.console.web import HERE, SECURITY_HEADERS, Console, page

MAX_SHOWN_CHARS = 20_000  # an item's text beyond this is cut on the page (the verdict keeps it whole)
MAX_LISTED = 200


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers=SECURITY_HEADERS)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# --- signing in -----------------------------------------------------------------------------
async def login_form(request: Request, console: Console) -> Response:
    """The login page (with a CSRF token for its form)."""
    request.state.user = None
    request.session.setdefault("csrf", new_csrf_token())
    return console.render(request, "login.html", error=None)


async def login(request: Request, console: Console) -> Response:
    """Check the password (rate-limited per name and address); start a fresh session."""
    request.state.user = None
    form = await request.form()
    name, password, token = (str(form.get(k) or "") for k in ("user", "password", "csrf"))
    if not csrf_ok(request.session.get("csrf"), token):
        return console.render(request, "login.html", 403, error="The form has expired: try again.")
    keys, now = [f"user:{name.lower()}", f"addr:{_address(request)}"], time.time()
    if not console.limiter.allowed(keys, now):
        metrics.LOGIN_FAILURES.labels(console.service.topology.name).inc()
        return console.render(request, "login.html", 429, error="Too many failed logins: wait a few minutes.")
    user = await asyncio.to_thread(console.users.file().verify, name, password)
    if user is None:
        console.limiter.failed(keys, now)
        metrics.LOGIN_FAILURES.labels(console.service.topology.name).inc()
        await console.service.audit_login(name[:64], False, _address(request))
        return console.render(request, "login.html", 401, error="Wrong user name or password.")
    console.limiter.succeeded(keys)
    start_session(request.session, user.name, now)
    await console.service.audit_login(user.name, True, _address(request))
    return _redirect("/")


async def logout(request: Request, console: Console) -> Response:
    """End the session."""
    request.session.clear()
    return _redirect("/login")


# --- the queue ------------------------------------------------------------------------------
def _filters(request: Request) -> tuple[str | None, str | None]:
    tenant = request.query_params.get("tenant") or None
    route = request.query_params.get("route") or None
    return tenant, route


async def queue_page(request: Request, console: Console) -> Response:
    """The queue: numbers, filters, the waiting items oldest first, the claimed ones."""
    service, user = console.service, request.state.user
    now = service.clock()
    tenant, route = _filters(request)
    service.update_gauges()
    queue = service.queue
    waiting = [i for i in queue.waiting(now, tenant, route) if i.decision is not None]
    tenants, routes = tenants_and_routes(queue.undecided())
    per_hour = service.per_hour(now)
    agreement = service.agreement
    answered = agreement["agree"] + agreement["disagree"]
    return console.render(
        request, "queue.html", items=waiting[:MAX_LISTED], more=max(0, len(waiting) - MAX_LISTED),
        claimed=queue.claimed(now), decided=queue.recently_decided(), numbers=queue.numbers(now),
        tenants=tenants, routes=routes,
        tenant=tenant, route=route, now=now, mine=per_hour.get(user.name, 0),
        per_hour=per_hour if user.is_lead else None,
        agreement=(agreement["agree"] / answered if answered else None), answered=answered,
        message=request.query_params.get("message"))


async def take_next(request: Request, console: Console) -> Response:
    """Claim the next item (one's own open claim first) and open it."""
    form = await request.form()
    tenant, route = (str(form.get(k) or "") or None for k in ("tenant", "route"))
    item = await console.service.claim_next(request.state.user.name, tenant, route)
    if item is None:
        return _redirect("/?message=The+queue+is+empty.")
    return _redirect(f"/item/{item.id}")


# --- an item --------------------------------------------------------------------------------
def _buttons(item: Item, console: Console) -> list[dict[str, Any]]:
    """The one-keystroke choices: the set's default outcome, then each candidate route (best first)."""
    catalogue = console.service.catalogue
    outcomes = catalogue.route_outcome
    choices = [{"outcome": catalogue.default_outcome, "route": None}]
    for name in item.candidate_routes:
        if name in outcomes and outcomes[name] != catalogue.default_outcome:
            choices.append({"outcome": outcomes[name], "route": name})
    seen, unique = set(), []
    for choice in choices:
        key = (choice["outcome"], choice["route"])
        if key not in seen:
            seen.add(key)
            unique.append(choice)
    for position, choice in enumerate(unique[:9]):
        choice["key"] = str(position + 1)
    return unique


def _item_or_404(request: Request, console: Console) -> Item | None:
    return console.service.queue.get(request.path_params["item_id"])


async def item_page(request: Request, console: Console, status: int = 200, error: str | None = None
                    ) -> Response:
    """An item: its content, the router's and the LLM's view, the policies, and the choices."""
    item = _item_or_404(request, console)
    if item is None or item.decision is None:
        return console.render(request, "error.html", 404, message="No such item in the queue (it may have "
                              "been decided and committed).")
    decision = item.decision
    text = decision.event.text or ""
    candidates = [(name, *console.service.policies[name]) for name in item.candidate_routes
                  if name in console.service.policies]
    return console.render(
        request, "item.html", status, item=item, decision=decision, review=decision.review,
        text=text[:MAX_SHOWN_CHARS], cut=max(0, len(text) - MAX_SHOWN_CHARS), candidates=candidates,
        buttons=_buttons(item, console), all_routes=console.service.catalogue.route_outcome,
        multi=console.service.catalogue.multi, now=console.service.clock(), error=error,
        moderators=[u.name for u in console.users.file().users() if not u.disabled])


async def _act(request: Request, console: Console, action: Any) -> Response:
    item_id = request.path_params["item_id"]
    try:
        await action(item_id)
    except Conflict as exc:
        if console.service.queue.get(item_id) is None:  # decided and committed already
            return console.render(request, "error.html", 409, message=f"Conflict: {exc}.")
        return await item_page(request, console, 409, f"Conflict: {exc}.")
    except InvalidChoice as exc:
        return await item_page(request, console, 400, f"Not a verdict of this route set: {exc}.")
    except KeyError:
        return console.render(request, "error.html", 404, message="No such item in the queue.")
    except Exception as exc:  # the broker refused the write: nothing changed, say so
        return await item_page(request, console, 503, f"Not saved (the broker did not answer): "
                               f"{type(exc).__name__}. Try again.")
    return _redirect(f"/item/{item_id}")


async def claim(request: Request, console: Console) -> Response:
    """Claim the item (or renew one's claim)."""
    return await _act(request, console, lambda i: console.service.claim(i, request.state.user.name))


async def release(request: Request, console: Console) -> Response:
    """Hand the item back to the queue."""
    user = request.state.user
    response = await _act(request, console, lambda i: console.service.release(i, user.name, user.is_lead))
    return _redirect("/") if response.status_code == 303 else response


async def reassign(request: Request, console: Console) -> Response:
    """A lead gives the item to another moderator."""
    to_user = str((await request.form()).get("to") or "")
    if console.users.get(to_user) is None:
        return await item_page(request, console, 400, f"No such moderator: {to_user!r}.")
    return await _act(request, console,
                      lambda i: console.service.reassign(i, request.state.user.name, to_user))


def _choice(form: Any, console: Console) -> Choice:
    routes = tuple(dict.fromkeys(str(r) for r in form.getlist("routes") if r))
    outcome = str(form.get("outcome") or "")
    if not outcome:  # routes only (multi sets): the most severe outcome among them
        catalogue = console.service.catalogue
        order = catalogue.severity or tuple(catalogue.outcomes)
        found = {catalogue.route_outcome.get(r) for r in routes}
        outcome = next((o for o in order if o in found), catalogue.default_outcome)
    return Choice(outcome=outcome, routes=routes, note=str(form.get("note") or "") or None)


async def decide(request: Request, console: Console) -> Response:
    """Publish the verdict, then open the next item."""
    choice = _choice(await request.form(), console)
    response = await _act(request, console,
                          lambda i: console.service.decide(i, request.state.user.name, choice))
    if response.status_code != 303:
        return response
    nxt = await console.service.claim_next(request.state.user.name)
    return _redirect(f"/item/{nxt.id}" if nxt else "/?message=Decided.+The+queue+is+empty.")


async def override(request: Request, console: Console) -> Response:
    """A lead's new verdict on a decided item (both kept)."""
    choice = _choice(await request.form(), console)
    return await _act(request, console,
                      lambda i: console.service.decide(i, request.state.user.name, choice, override=True))


async def image(request: Request, console: Console) -> Response:
    """The item's image, fetched and re-encoded by the console (never the event's URL)."""
    item = _item_or_404(request, console)
    uri = item.decision.event.image_uri if item is not None and item.decision is not None else None
    if uri is None:
        return PlainTextResponse("no image", 404, headers=SECURITY_HEADERS)
    topology, settings = console.service.topology, console.service.settings
    try:
        png = await asyncio.to_thread(image_png, uri, settings.images, topology.limits)
    except ImageRejected as exc:
        return PlainTextResponse(f"image unavailable: {exc.reason}", 404, headers=SECURITY_HEADERS)
    return Response(png, media_type="image/png", headers={**SECURITY_HEADERS, "Cache-Control": "private"})


# --- probes and metrics (no sign-in) ---------------------------------------------------------
async def healthz(request: Request) -> Response:
    """Alive: the event loop answers."""
    return PlainTextResponse("ok")


def routes(console: Console) -> list[Route | Mount]:
    """Every route of the app."""
    async def readyz(request: Request) -> Response:
        ready = console.service.ready
        return PlainTextResponse("ready" if ready else (console.service.broker_error or "catching up"),
                                 200 if ready else 503)

    async def metrics_page(request: Request) -> Response:
        console.service.update_gauges()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def open_page(handler: Any) -> Any:
        async def run(request: Request) -> Response:
            return await handler(request, console)
        return run

    return [
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics_page),
        Route("/login", open_page(login_form), methods=["GET"]),
        Route("/login", open_page(login), methods=["POST"]),
        Route("/logout", page(console, logout, form=True), methods=["POST"]),
        Route("/", page(console, queue_page)),
        Route("/next", page(console, take_next, form=True), methods=["POST"]),
        Route("/item/{item_id}", page(console, item_page)),
        Route("/item/{item_id}/image", page(console, image)),
        Route("/item/{item_id}/claim", page(console, claim, form=True), methods=["POST"]),
        Route("/item/{item_id}/release", page(console, release, form=True), methods=["POST"]),
        Route("/item/{item_id}/decide", page(console, decide, form=True), methods=["POST"]),
        Route("/item/{item_id}/reassign", page(console, reassign, lead=True, form=True), methods=["POST"]),
        Route("/item/{item_id}/override", page(console, override, lead=True, form=True), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
