"""The parts of learning_loop.py: the oracle LLM double, the run's topology, the output collector, scoring.

* :class:`OracleLLM` — a TEST DOUBLE of an LLM: an OpenAI-compatible Chat Completions
  server on 127.0.0.1 (llm_script.ScriptedEndpoint's server) that answers every review with
  the reviewed item's GOLD label from the data set, after a delay, and a seeded 5 % of the
  items with another outcome (a reviewer that is wrong 5 % of the time). It knows nothing a
  model would know; it stands in for a good LLM so that the loop's figures can be scored.
* :func:`loop_topology` — topologies/moderation.yaml copied for one run: its own topics, the
  run's route file, ``review.labels_topic`` set.
* :class:`Collector` — reads the run's output topics on a thread: per event, the router's
  decision and the reviewer's final decision.
* :func:`window_row` — one window's figures, scored against the gold labels.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_script import ScriptedEndpoint, message_text, share_of  # noqa: E402

from sieve.contracts import NEEDS_REVIEW  # noqa: E402
from sieve.flow.publish import audited  # noqa: E402
from sieve.kafka.client import client_kwargs  # noqa: E402
from sieve.quality.datasets import LabelledData, LabelledExample, load_data  # noqa: E402
from sieve.quality.metrics import wilson  # noqa: E402
from sieve.routeset import head_path_for, load_route_set  # noqa: E402
from sieve.routeset_dump import dump_route_set  # noqa: E402
from sieve.settings import KafkaSettings, Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

HEADER = (f"{'window':>6} {'events':>6} {'labels':>6} {'auto':>6} {'auto acc':>8} {'95% Wilson':>14} "
          f"{'novel':>6} {'review':>6} {'LLM':>5} {'prom':>4}")


def loop_stream(data: str, seed: int, split: str | None = None) -> tuple[LabelledData, list[LabelledExample]]:
    """``data`` and the learning loop's stream of it: the examples with text (of ``split``), seeded order."""
    loaded = load_data(data, (REPO / Settings().datasets_dir).resolve())
    examples = [ex for ex in loaded.examples
                if ex.text and ex.text.strip() and (split is None or ex.source_split == split)]
    random.Random(seed).shuffle(examples)
    return loaded, examples


def events_of(examples: list[LabelledExample], start: int) -> list[dict]:
    """The stream's events (ids ``loop-<i>``), as loadgen sends them."""
    return [{"id": f"loop-{start + i}", "text": ex.text, "metadata": {}} for i, ex in enumerate(examples)]


_ITEM = re.compile(r"<item-([0-9a-f]+)>\n(.*)\n</item-\1>", re.DOTALL)
_ROUTE = re.compile(r"^- (\S+) -> (\S+): ", re.MULTILINE)
_CANDIDATE = re.compile(r"^- (\S+) \((\S+)\) [0-9.]+$", re.MULTILINE)
_DEFAULT = re.compile(r"If no route applies, the verdict is '([^']+)'")


class OracleLLM(ScriptedEndpoint):
    """A TEST DOUBLE of an LLM reviewer that answers with the gold label (wrong ``wrong`` of the time).

    ``gold`` maps an item's text to its gold outcome; ``routes_of`` to the label names the data
    gives it (a route of the set with that name is the reply's route, as for CLINC's intents).
    The wrong answers are drawn per item text with ``seed`` (the same item is always answered
    the same); a wrong answer is another outcome of the route set. The item's text is read
    back from the user message (the JSON string between the ``<item-NONCE>`` markers).
    """

    def __init__(self, gold: dict[str, str], routes_of: dict[str, frozenset[str]], *, wrong: float = 0.05,
                 delay_s: float = 0.2, seed: int = 0) -> None:
        super().__init__(delay_s=(delay_s * 0.5, delay_s * 1.5), malformed_share=0.0, seed=seed)
        self.gold, self.routes_of, self.wrong, self.seed = gold, routes_of, wrong, seed
        self.unknown_items = 0  # reviewed items with no gold label (answered with the default)

    def __enter__(self) -> OracleLLM:
        super().__enter__()
        return self

    @property
    def requests(self) -> int:
        """HTTP requests answered so far."""
        with self._lock:
            return sum(self.counts.values())

    def answer(self, body: dict[str, Any]) -> str:
        """The reply content: the gold outcome (or, for a seeded share of items, another one)."""
        messages = body.get("messages") or [{}]
        system, user = message_text(messages[0]), message_text(messages[-1])
        match = _ITEM.search(user)
        text = json.loads(match.group(2)) if match else ""
        routes = _ROUTE.findall(system)
        default_match = _DEFAULT.search(system)
        default = default_match.group(1) if default_match else "clean"
        outcomes = sorted({outcome for _, outcome in routes} | {default})
        outcome = self.gold.get(text)
        if outcome is None:
            with self._lock:
                self.unknown_items += 1
            outcome = default
        if self.wrong and len(outcomes) > 1 and share_of(text, f"oracle-wrong-{self.seed}") < self.wrong:
            others = [o for o in outcomes if o != outcome]
            outcome = others[int(share_of(text, f"oracle-other-{self.seed}") * len(others))]
        route = self._route(text, outcome, routes, user, default)
        reply: dict[str, Any] = {"verdict": outcome if outcome in outcomes else default, "route": route}
        if "routes" in json.dumps(body.get("response_format") or {}):
            reply = {"routes": [route] if route else [], **reply}
        return json.dumps({**reply, "confidence": 0.9, "rationale": "oracle double: the gold label"})

    def _route(self, text: str, outcome: str, routes: list[tuple[str, str]], user: str,
               default: str) -> str | None:
        """A route of ``outcome``: the data's own label, else the router's best candidate, else the first."""
        if outcome == default:
            return None
        of_outcome = [name for name, route_outcome in routes if route_outcome == outcome]
        for name in sorted(self.routes_of.get(text, frozenset())):
            if name in of_outcome:
                return name
        for name, candidate_outcome in _CANDIDATE.findall(user):
            if candidate_outcome == outcome and name in of_outcome:
                return name
        return of_outcome[0] if of_outcome else None


def loop_topology(prefix: str, routes: Path, route_set_name: str, outcomes: list[str], encoder: dict,
                  *, max_events: int, review_concurrency: int, reviews_per_s: float,
                  audit_share: float = 0.0, shadow_audit_share: float = 0.0) -> dict:
    """topologies/moderation.yaml for one run: its own topics under ``prefix``, the run's route file."""
    topology = yaml.safe_load((REPO / "topologies" / "moderation.yaml").read_text())
    topology.update(name=prefix, group_id=f"{prefix}-worker")
    topology["input"] = {"topics": [f"{prefix}.in"], "partitions": 2}
    topology["route_set"] = {"name": route_set_name, "file": str(routes.resolve())}
    topology["encoder"] = encoder
    topology["batching"] = {"max_events": max_events, "max_wait_s": 0.2}
    topology["output"] = {
        "outcome_topics": {o: f"{prefix}.{o.replace('_', '-')}" for o in [*outcomes, NEEDS_REVIEW]},
        "route_topic_prefix": None,
        "dead_letter_topic": f"{prefix}.dead-letter",
        "partitions": 2,
    }
    topology["review"].update(
        human_review_topic=f"{prefix}.human-review", labels_topic=f"{prefix}.labels",
        group_id=f"{prefix}-review", max_concurrency=review_concurrency, max_reviews_per_s=reviews_per_s,
        daily_token_budget=None, audit_share=audit_share, audit_topic=f"{prefix}.audit",
        shadow_audit_share=shadow_audit_share,
    )
    return topology


def topology_topics(topology: dict) -> dict[str, int]:
    """Every topic of the run (``{name: partitions}``), to create before anything reads them."""
    output, review = topology["output"], topology["review"]
    names = [*topology["input"]["topics"], *output["outcome_topics"].values(), output["dead_letter_topic"],
             review["human_review_topic"], review["labels_topic"], review["audit_topic"]]
    return {name: 2 for name in names}


@dataclass
class EventState:
    """What the run's outputs say about one event."""

    router_outcome: str | None = None
    novel: bool = False
    version: str | None = None
    final_outcome: str | None = None  # the reviewer's verdict (None: handed off or not reviewed yet)
    reviewed: bool = False
    llm_calls: int = 0
    dead: bool = False
    audit_pending: bool = False  # an automatic decision in the audit sample, its label not seen yet
    audited: bool = False  # its audit label came back

    @property
    def done(self) -> bool:
        """Decided automatically (and labelled when audited), reviewed (verdict or hand-off), or dead."""
        automatic = self.router_outcome is not None and self.router_outcome != NEEDS_REVIEW
        return self.dead or (automatic and not self.audit_pending) or self.reviewed


class Collector:
    """Reads the run's output topics from the beginning on a thread; ``state`` is per event id."""

    def __init__(self, kafka: KafkaSettings, topics: list[str], dead_letter_topic: str,
                 labels_topic: str | None = None, audit_share: float = 0.0,
                 audit_topic: str | None = None) -> None:
        self.kafka, self.topics, self.dead_letter_topic = kafka, topics, dead_letter_topic
        self.labels_topic, self.audit_share, self.audit_topic = labels_topic, audit_share, audit_topic
        self.state: dict[str, EventState] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                        name="collector")
        self.error: BaseException | None = None

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def done(self, ids: list[str]) -> int:
        """How many of ``ids`` are done."""
        if self.error is not None:
            raise RuntimeError(f"the output reader failed: {self.error!r}")
        with self.lock:
            return sum(1 for i in ids if i in self.state and self.state[i].done)

    def wait(self, ids: list[str], deadline: float, alive: Callable[[], None], settle: float = 0.0) -> None:
        """Return once every one of ``ids`` is done (and again ``settle`` seconds later: what arrives
        after a decision, such as the shadow's audits); ``alive`` raises when a process has died."""
        for pause in [0.0] + ([settle] if settle else []):
            time.sleep(pause)
            while (done := self.done(ids)) < len(ids):
                alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{done} of {len(ids)} events done")
                time.sleep(0.5)

    def snapshot(self, ids: list[str]) -> list[EventState]:
        """The states of ``ids`` (an empty state for an event with no output yet)."""
        with self.lock:
            return [self.state.get(i, EventState()) for i in ids]

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(*self.topics, **client_kwargs(self.kafka), auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=None)
        try:
            await consumer.start()
            try:
                while not self._stop.is_set():
                    for batch in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                        with self.lock:
                            for record in batch:
                                self._take(record.topic, record.value or b"")
            finally:
                await consumer.stop()
        except Exception as exc:  # reported to the main thread by done()
            self.error = exc

    def _take(self, topic: str, value: bytes) -> None:
        try:
            body = json.loads(value)
        except ValueError:
            return
        if topic == self.dead_letter_topic:
            try:
                event_id = str(json.loads(base64.b64decode(body["payload_b64"]))["id"])
            except (KeyError, ValueError, TypeError):
                return
            self.state.setdefault(event_id, EventState()).dead = True
            return
        if not isinstance(body, dict) or "event_id" not in body:
            return
        state = self.state.setdefault(str(body["event_id"]), EventState())
        if topic == self.labels_topic:  # read for the audits' labels only: one LLM call each
            if body.get("router_outcome") != NEEDS_REVIEW and not state.audited:
                state.audit_pending, state.audited = False, True
                state.llm_calls += 1
            return
        if topic == self.audit_topic:  # an audit the sample does not predict (the shadow's)
            state.audit_pending = not state.audited
            return
        if body.get("decided_by", "router") == "router":
            if state.router_outcome is None:
                state.router_outcome = str(body.get("outcome"))
                state.audit_pending = state.router_outcome != NEEDS_REVIEW and audited(
                    str(body.get("id")), self.audit_share)
                state.novel = bool(body.get("novel"))
                state.version = body.get("route_set_version")
        elif not state.reviewed:
            review = body.get("review") or {}
            state.reviewed = True
            state.llm_calls += int(review.get("attempts") or 0)
            if review.get("handoff_reason") is None and body.get("outcome") != NEEDS_REVIEW:
                state.final_outcome = str(body.get("outcome"))


def window_row(index: int, states: list[EventState], gold: list[str], *, labels_before: int,
               extra: dict[str, list[bool]] | None = None) -> dict[str, Any]:
    """One window's figures against the gold outcomes (``extra``: named subsets of the events)."""
    n = len(states)
    automatic = [s.router_outcome not in (None, NEEDS_REVIEW) and not s.dead for s in states]
    right = [a and s.router_outcome == g for a, s, g in zip(automatic, states, gold, strict=True)]
    auto_n, right_n = sum(automatic), sum(right)
    low, high = wilson(right_n, auto_n, 1.96)
    verdicts = [(s.final_outcome, g) for s, g in zip(states, gold, strict=True)
                if s.final_outcome is not None]
    row: dict[str, Any] = {
        "window": index,
        "events": n,
        "labels_before": labels_before,
        "automatic": auto_n,
        "automatic_share": auto_n / n if n else None,
        "automatic_accuracy": right_n / auto_n if auto_n else None,
        "automatic_accuracy_ci": [low, high] if auto_n else None,
        "novel_share": sum(s.novel for s in states) / n if n else None,
        "review_share": sum(s.router_outcome == NEEDS_REVIEW for s in states) / n if n else None,
        "reviewer_verdicts": len(verdicts),
        "reviewer_accuracy": (sum(v == g for v, g in verdicts) / len(verdicts)) if verdicts else None,
        "handoffs": sum(s.reviewed and s.final_outcome is None for s in states),
        "audits": sum(s.audited for s in states),
        "dead_letters": sum(s.dead for s in states),
        "llm_calls": sum(s.llm_calls for s in states),
        "versions": sorted({s.version for s in states if s.version}),
        "promotions": 0,
    }
    for name, members in (extra or {}).items():
        count = sum(members)
        row[f"{name}_events"] = count
        row[f"{name}_automatic_right_share"] = (
            sum(r for r, m in zip(right, members, strict=True) if m) / count if count else None)
    return row


def overall(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole run's automatic accuracy (Wilson, z = 1.96) and the issue's bars, met or not."""
    auto_n = sum(r["automatic"] for r in rows)
    right_n = sum(round((r["automatic_accuracy"] or 0) * r["automatic"]) for r in rows)
    low, high = wilson(right_n, auto_n, 1.96)
    big = [r for r in rows if r["automatic"] >= 200]
    after = [r for r in rows if r["labels_before"] >= 2000]
    return {
        "events": sum(r["events"] for r in rows),
        "automatic": auto_n,
        "automatic_share": auto_n / max(1, sum(r["events"] for r in rows)),
        "automatic_accuracy": right_n / auto_n if auto_n else None,
        "automatic_accuracy_ci": [low, high],
        "llm_calls": sum(r["llm_calls"] for r in rows),
        "promotions": sum(r["promotions"] for r in rows),
        "bar_accuracy_run": bool(auto_n) and right_n / auto_n >= 0.95 and low >= 0.93,
        "bar_accuracy_windows": all(r["automatic_accuracy"] >= 0.93 for r in big),
        "bar_automatic_share_after_2000_labels": (all(r["automatic_share"] >= 0.60 for r in after)
                                                  if after else None),
    }


def format_row(row: dict[str, Any]) -> str:
    """One printed line of the table."""
    ci = row["automatic_accuracy_ci"]
    accuracy = "-" if row["automatic_accuracy"] is None else f"{row['automatic_accuracy']:.3f}"
    extra = (f"  new-intents auto+right {row['new_intents_automatic_right_share']:.1%}"
             if row.get("new_intents_automatic_right_share") is not None else "")
    interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
    return (f"{row['window']:>6} {row['events']:>6} {row['labels_before']:>6} {row['automatic_share']:>6.1%} "
            f"{accuracy:>8} {interval:>14} {row['novel_share']:>6.1%} {row['review_share']:>6.1%} "
            f"{row['llm_calls']:>5} {row['promotions']:>4}{extra}")


def copy_routes(routes: Path, folder: Path, name: str) -> Path:
    """``routes`` (with its head) as ``folder/name``: list files named from there."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / name
    copy.write_text(dump_route_set(load_route_set(routes), folder), encoding="utf-8")
    if head_path_for(routes).exists():
        shutil.copyfile(head_path_for(routes), head_path_for(copy))
    return copy
