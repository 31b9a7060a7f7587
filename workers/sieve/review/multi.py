"""The review of a multi-mode decision (route sets with ``mode: multi``): routes confirmed or rejected.

The router's decision lists every route that fired (``routes``: each in its accept or
review band). The reviewer shows them to the LLM with their policy text
(:func:`fired_route_lines`), and the LLM's reply (:class:`MultiReviewReply`) lists every
route that applies in ``routes``:

* a fired route listed there is **confirmed**, a fired route left out is **rejected**;
* a listed route that did not fire is **added**: the LLM may find a category the router
  missed. It joins the verdict's ``routes`` in band ``review``, ``confirmed: true``, with the
  router's score for it (``category_scores``, else ``scores``; 0.0 when the router reported none);
* a name that is not a route of the set makes the reply malformed (:func:`check_reply`);
* the reply must be consistent: its ``verdict`` must be the most severe outcome (the set's
  severity order) among the listed routes, the set's default outcome when none is listed,
  and its ``route`` must be null or a listed route. An inconsistent reply is malformed, as
  any other invalid reply (asked again once, then handed off): the verdict is not derived
  from the routes behind the LLM's back, since a reply that contradicts itself is not
  trusted either way.

The verdict (:func:`verdict_fields`) is final: ``routes`` with ``confirmed`` set on each,
``categories`` (category → confirmed), the router's ``category_scores``, ``route`` the best
scoring listed route of the verdict's outcome, and ``review.routes`` / ``review.rejected_routes``.
"""

from __future__ import annotations

from typing import Any

from sieve.contracts import Decision, FiredRoute, Review
from sieve.review.catalogue import MultiReviewReply, ReplyError, ReviewCatalogue, untrusted_json


def is_multi(decision: Decision) -> bool:
    """The decision was made by a multi-mode route set (it lists the routes that fired)."""
    return decision.mode == "multi" and decision.routes is not None


def fired_route_lines(decision: Decision, catalogue: ReviewCatalogue) -> list[str]:
    """The user message's lines on the routes that fired, each with its band, score and policy.

    Names and policies come from the catalogue (the route set, not the event); a fired route
    the catalogue does not know (another version of the set) is shown as an escaped JSON string.
    """
    if not decision.routes:
        return ["No route fired (the router found no route in its accept or review band)."]
    outcomes, policies = catalogue.route_outcome, catalogue.route_policy
    lines = ["Routes that fired (route, outcome, band, router's score: the route's policy):"]
    for fired in decision.routes:
        band = f"{fired.band}, ambiguous with benign content" if fired.ambiguous else fired.band
        if fired.route in outcomes:
            policy = policies[fired.route]
            text = " ".join(policy.split()) if policy else "(no policy text)"
            lines.append(f"- {fired.route} ({outcomes[fired.route]}) {band} {fired.score:.3f}: {text}")
        else:
            lines.append(f"- {untrusted_json(fired.route)} {band} {fired.score:.3f}: "
                         "(not a route of this route set; it cannot be confirmed)")
    return lines


def check_reply(reply: MultiReviewReply, catalogue: ReviewCatalogue) -> MultiReviewReply:
    """The reply with repeated route names dropped; :class:`ReplyError` when it is inconsistent."""
    outcomes = catalogue.route_outcome
    for name in reply.routes:
        if name not in outcomes:
            raise ReplyError(f"routes: {name!r} is not a route of {catalogue.name!r}")
    listed = list(dict.fromkeys(reply.routes))
    rank = {outcome: i for i, outcome in enumerate(catalogue.severity)}
    listed_outcomes = sorted({outcomes[name] for name in listed}, key=lambda o: rank.get(o, len(rank)))
    expected = listed_outcomes[0] if listed_outcomes else catalogue.default_outcome
    if reply.verdict != expected:
        raise ReplyError(
            f"verdict {reply.verdict!r} contradicts routes {listed}: the most severe outcome among "
            f"them is {expected!r}"
        )
    if reply.route is not None and reply.route not in listed:
        raise ReplyError(f"route {reply.route!r} is not among the listed routes {listed}")
    return reply if listed == reply.routes else reply.model_copy(update={"routes": listed})


def _router_score(decision: Decision, route: str) -> float:
    if decision.category_scores and route in decision.category_scores:
        return decision.category_scores[route]
    return next((s.score for s in decision.scores if s.route == route), 0.0)


def verdict_fields(decision: Decision, reply: MultiReviewReply, review: Review,
                   catalogue: ReviewCatalogue) -> dict[str, Any]:
    """The fields of a multi-mode verdict that differ from the router's decision (see the module)."""
    listed = list(dict.fromkeys(reply.routes))
    confirmed = set(listed)
    fired = decision.routes or []
    fired_names = {r.route for r in fired}
    routes = [r.model_copy(update={"confirmed": r.route in confirmed}) for r in fired]
    routes += [
        FiredRoute(route=name, outcome=catalogue.route_outcome[name], score=_router_score(decision, name),
                   band="review", confirmed=True)
        for name in listed if name not in fired_names
    ]
    routes.sort(key=lambda r: -r.score)  # stable: the router's order among equal scores
    categories = {name: name in confirmed for name in decision.categories or {}}
    for name in listed:
        if catalogue.route_outcome[name] != catalogue.default_outcome:
            categories.setdefault(name, True)
    route = next((r.route for r in routes if r.confirmed and r.outcome == reply.verdict), None)
    return {
        "outcome": reply.verdict,
        "route": route,
        "routes": routes,
        "categories": categories,
        "final": True,
        "review": review.model_copy(update={
            "routes": [r.route for r in routes if r.confirmed],
            "rejected_routes": [r.route for r in fired if r.route not in confirmed],
        }),
    }
