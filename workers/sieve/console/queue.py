"""The console's work queue: hand-offs, claims with leases, decided items, and what may be committed.

Pure state, no I/O: the service (:mod:`sieve.console.service`) feeds it the human-review
topic's records (:meth:`ConsoleQueue.add`) and the durable state topic's records
(:meth:`ConsoleQueue.apply`), and writes every change it makes here to that state topic
before it acts on it. One record per item, keyed by the item's id (the hand-off decision's
id), so the compacted topic keeps each item's latest state:

* ``claimed`` — a moderator holds it until ``until`` (the lease); after that it is waiting again;
* ``released`` — handed back (or reassigned away by a lead, which is a claim for the other);
* ``decided`` — settled: never offered again; ``verdicts`` lists the verdict ids published for it
  (a lead's override adds one, both kept).

Kafka commits a partition's whole prefix, so :meth:`ConsoleQueue.committable` gives, per
partition, the offset below its lowest undecided item: a restart reads from there and the
state topic tells it which of those items are already decided.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from sieve.contracts import Decision

MAX_SETTLED = 100_000  # ids of forgotten decided items remembered (a late decision is a conflict)
KEEP_DECIDED = 1_000  # decided items kept whole after their commit (a lead may override them)
Status = Literal["waiting", "claimed", "released", "decided"]


class Conflict(Exception):
    """The item cannot be claimed or decided by this moderator now (someone else has it, or it is settled)."""


@dataclass(frozen=True)
class VerdictRef:
    """A verdict published for an item: its decision id, what it said, who, when."""

    id: str
    outcome: str
    routes: tuple[str, ...]
    by: str
    at: datetime
    note: str | None = None


@dataclass(frozen=True)
class ItemState:
    """An item's durable state (one state-topic record)."""

    status: Status = "waiting"
    user: str | None = None
    until: datetime | None = None
    verdicts: tuple[VerdictRef, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The state-topic record's value."""
        return {
            "status": self.status, "user": self.user,
            "until": self.until.isoformat() if self.until else None,
            "verdicts": [{"id": v.id, "outcome": v.outcome, "routes": list(v.routes), "by": v.by,
                          "at": v.at.isoformat(), "note": v.note} for v in self.verdicts],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemState:
        """A state-topic record's value back; ``ValueError``/``KeyError`` when it is not one."""
        until = data.get("until")
        return cls(
            status=data["status"], user=data.get("user"),
            until=datetime.fromisoformat(until) if until else None,
            verdicts=tuple(VerdictRef(id=v["id"], outcome=v["outcome"], routes=tuple(v.get("routes") or ()),
                                      by=v["by"], at=datetime.fromisoformat(v["at"]), note=v.get("note"))
                           for v in data.get("verdicts") or ()),
        )


@dataclass
class Item:
    """One hand-off on the human-review topic."""

    id: str
    partition: int
    offset: int
    decision: Decision | None
    received_at: datetime
    broken: str | None = None  # why the record is not a decision (it is then dead-lettered)
    state: ItemState = field(default_factory=ItemState)

    @property
    def tenant(self) -> str | None:
        """The event's tenant, if any."""
        return self.decision.event.tenant if self.decision is not None else None

    @property
    def candidate_routes(self) -> list[str]:
        """The routes the router scored or fired, best first (what the moderator most likely picks)."""
        if self.decision is None:
            return []
        if self.decision.routes:
            return [r.route for r in self.decision.routes]
        return [s.route for s in self.decision.scores]

    def claimed_by_other(self, user: str, now: datetime) -> bool:
        """Someone else holds an unexpired claim."""
        state = self.state
        return (state.status == "claimed" and state.user != user and state.until is not None
                and state.until > now)

    def waiting(self, now: datetime) -> bool:
        """Undecided and not under an unexpired claim."""
        state = self.state
        if state.status == "decided":
            return False
        return not (state.status == "claimed" and state.until is not None and state.until > now)


@dataclass(frozen=True)
class Numbers:
    """The queue's numbers for the page and the metrics."""

    waiting: int
    claimed: int
    oldest_age_s: float
    decided: int


class ConsoleQueue:
    """Every item read since the committed offsets, with its state; see the module."""

    def __init__(self, lease_s: float) -> None:
        self.lease = timedelta(seconds=lease_s)
        self.items: dict[str, Item] = {}
        self._states: dict[str, ItemState] = {}  # from the state topic, for items not read yet
        self._high: dict[int, int] = {}  # per partition: the next offset after the last one read
        # decided and committed items, latest last (bounded): a late decision on one is a conflict
        self._settled: dict[str, ItemState] = {}

    # --- feeding -------------------------------------------------------------------------
    def add(self, item: Item) -> None:
        """A record read from the human-review topic (a repeat of an item read before is ignored)."""
        self._high[item.partition] = max(self._high.get(item.partition, 0), item.offset + 1)
        if item.id in self.items:
            return
        item.state = self._states.pop(item.id, item.state)
        self.items[item.id] = item

    def apply(self, item_id: str, state: ItemState) -> None:
        """A state record (read back at start-up, or just written): the item's latest state."""
        if item_id in self.items:
            self.items[item_id].state = state
        else:
            self._states[item_id] = state

    def seen(self, partition: int, offset: int) -> None:
        """A partition's record was read (``offset``) even when it made no item."""
        self._high[partition] = max(self._high.get(partition, 0), offset + 1)

    # --- reading -------------------------------------------------------------------------
    def get(self, item_id: str) -> Item | None:
        """The item, or None."""
        return self.items.get(item_id)

    def undecided(self) -> list[Item]:
        """Every item not decided yet, oldest first."""
        return sorted((i for i in self.items.values() if i.state.status != "decided"),
                      key=lambda i: (i.received_at, i.partition, i.offset))

    def waiting(self, now: datetime, tenant: str | None = None, route: str | None = None) -> list[Item]:
        """The items a moderator may claim, oldest first, filtered by tenant and candidate route."""
        return [i for i in self.undecided() if i.waiting(now)
                and (tenant is None or i.tenant == tenant)
                and (route is None or route in i.candidate_routes)]

    def claimed(self, now: datetime, user: str | None = None) -> list[Item]:
        """Items under an unexpired claim (by ``user`` when given), oldest first."""
        return [i for i in self.undecided() if not i.waiting(now) and (user is None or i.state.user == user)]

    def numbers(self, now: datetime) -> Numbers:
        """Waiting, claimed, the oldest undecided item's age, decided."""
        undecided = self.undecided()
        oldest = max(0.0, (now - undecided[0].received_at).total_seconds()) if undecided else 0.0
        waiting = sum(1 for i in undecided if i.waiting(now))
        decided = len(self.items) - len(undecided)
        return Numbers(waiting=waiting, claimed=len(undecided) - waiting, oldest_age_s=oldest,
                       decided=decided)

    def committable(self) -> dict[int, int]:
        """Per partition read: the offset to commit, the lowest undecided item's (or past the last read)."""
        lowest: dict[int, int] = {}
        for item in self.items.values():
            if item.state.status != "decided":
                lowest[item.partition] = min(lowest.get(item.partition, item.offset), item.offset)
        return {p: lowest.get(p, high) for p, high in self._high.items()}

    def forget_decided(self, below: dict[int, int], keep: int = KEEP_DECIDED) -> None:
        """Drop the oldest decided items under the committed offsets beyond the ``keep`` latest.

        A lead may still override the ones kept; a restart does not read committed items again.
        """
        done = sorted((i for i in self.items.values()
                       if i.state.status == "decided" and i.offset < below.get(i.partition, -1)),
                      key=lambda i: i.state.verdicts[-1].at if i.state.verdicts else i.received_at)
        for old in done[:max(0, len(done) - keep)]:
            self._settled[old.id] = self.items.pop(old.id).state
        while len(self._settled) > MAX_SETTLED:
            del self._settled[next(iter(self._settled))]

    # --- changing (each returns the new state; the caller makes it durable, then applies it) --
    def require(self, item_id: str) -> Item:
        """The item; :class:`Conflict` when it was decided and committed, ``KeyError`` when unknown."""
        item = self.items.get(item_id)
        if item is None:
            settled = self._settled.get(item_id)
            if settled is not None:
                by = settled.verdicts[-1].by if settled.verdicts else (settled.user or "someone")
                raise Conflict(f"already decided by {by}")
            raise KeyError(item_id)
        return item

    def claim(self, item_id: str, user: str, now: datetime) -> ItemState:
        """A claim (or its renewal) for ``user``; :class:`Conflict` when decided or someone else holds it."""
        item = self.require(item_id)
        if item.state.status == "decided":
            raise Conflict(f"already decided by {_decider(item)}")
        if item.claimed_by_other(user, now):
            raise Conflict(f"claimed by {item.state.user}")
        return replace(item.state, status="claimed", user=user, until=now + self.lease)

    def next_for(self, user: str, now: datetime, tenant: str | None = None,
                 route: str | None = None) -> Item | None:
        """The item ``user`` should work next: their own open claim first, else the oldest waiting one."""
        mine = self.claimed(now, user)
        if mine:
            return mine[0]
        waiting = [i for i in self.waiting(now, tenant, route) if i.decision is not None]
        return waiting[0] if waiting else None

    def release(self, item_id: str, user: str, now: datetime, lead: bool = False) -> ItemState:
        """Hand a claim back; only its holder (or a lead) may."""
        item = self.require(item_id)
        if item.state.status == "decided":
            raise Conflict("already decided")
        if item.claimed_by_other(user, now) and not lead:
            raise Conflict(f"claimed by {item.state.user}")
        return replace(item.state, status="released", user=None, until=None)

    def reassign(self, item_id: str, to_user: str, now: datetime) -> ItemState:
        """A lead gives the item to ``to_user`` (a fresh lease in their name)."""
        item = self.require(item_id)
        if item.state.status == "decided":
            raise Conflict("already decided")
        return replace(item.state, status="claimed", user=to_user, until=now + self.lease)

    def decide(self, item_id: str, user: str, verdict: VerdictRef, now: datetime) -> ItemState:
        """Settle the item with ``verdict``; :class:`Conflict` when it is settled or claimed by another."""
        item = self.require(item_id)
        if item.state.status == "decided":
            raise Conflict(f"already decided by {_decider(item)}")
        if item.claimed_by_other(user, now):
            raise Conflict(f"claimed by {item.state.user}")
        return ItemState(status="decided", user=user, until=None, verdicts=(verdict,))

    def override(self, item_id: str, verdict: VerdictRef) -> ItemState:
        """A lead's new verdict on a decided item: both verdicts are kept."""
        item = self.require(item_id)
        if item.state.status != "decided":
            raise Conflict("not decided yet: decide it instead")
        return replace(item.state, verdicts=(*item.state.verdicts, verdict))

    def recently_decided(self, count: int = 20) -> list[Item]:
        """The latest decided items still held, newest first."""
        done = [i for i in self.items.values() if i.state.status == "decided" and i.state.verdicts]
        return sorted(done, key=lambda i: i.state.verdicts[-1].at, reverse=True)[:count]


def _decider(item: Item) -> str:
    return item.state.verdicts[-1].by if item.state.verdicts else (item.state.user or "someone")


def tenants_and_routes(items: Iterable[Item]) -> tuple[list[str], list[str]]:
    """The tenants and candidate routes among ``items``, sorted (the queue's filter choices)."""
    tenants = sorted({i.tenant for i in items if i.tenant})
    routes = sorted({r for i in items for r in i.candidate_routes})
    return tenants, routes
