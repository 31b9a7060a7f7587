"""The learning loop, streamed: labelled data the routes were not built from, through worker and reviewer.

Starts a dev broker, an embedded route store, one ``sieve worker`` and one ``sieve review``
process (topologies/moderation.yaml copied with the run's own topics and route file), and
streams the data set at the worker in windows of ``--window`` events. The reviewer's LLM is
:class:`loop_parts.OracleLLM`, a TEST DOUBLE of an LLM: an OpenAI-compatible server on
127.0.0.1 that answers each review with the item's gold label after a delay, and with another
outcome for a seeded ``--wrong`` share of the items. Every figure is scored against the gold
labels.

After each window has been decided (automatically, or reviewed), the loop does what a
deployment's operator (or a job) would: ``sieve labels export`` (the labels topic, where the
reviewer publishes every verdict) -> ``sieve routes learn ACTIVE --labels ... --out NEW`` ->
``sieve routes sync NEW --no-activate`` -> ``sieve routes promote NAME VERSION --evidence
NEW.learn.json --if-better`` (exit 1, nothing changed, when the held-back labels do not favour
the candidate). ``--audit-share`` has the router copy that share of its automatic decisions
to the reviewer, whose verdicts on them are labels too; ``--anchors`` has ``routes learn``
keep the active version's automatic decisions (``sieve labels anchors``); ``--label-accuracy``
and ``--promote-min-added-accuracy`` pass the learn and promote options of those names. The
running worker switches to a promoted version between batches (route refresh); the next window
is sent once it has had time to. The stream waits while a candidate is learned (the figures
per window are then each version's own). With ``--shadow``, each candidate is shadowed through the next
window and judged at its end; ``--shadow-checks N`` judges it after each of N equal parts of
the window as well, on its shadow's counts so far, as a deployment would promote once the
evidence is in rather than at a window's end.

Per window it prints automatic share, automatic accuracy with its Wilson interval (z = 1.96),
novel share, review share, LLM calls and promotions, and writes ``loop.json`` and ``loop.png``
to ``--out``:

    .venv/bin/python load-tests/learning_loop.py davidson --routes /tmp/q18/fit0/built.fitted.yaml \\
        --out /tmp/loop-davidson --limit 4000 --audit-share 0.05 --label-accuracy 0.95 \\
        --promote-min-added-accuracy 0.95 --learn-option=--z=1.96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import produce_events  # noqa: E402
from loop_parts import (  # noqa: E402
    HEADER,
    REPO,
    Collector,
    OracleLLM,
    copy_routes,
    events_of,
    format_row,
    loop_stream,
    loop_topology,
    overall,
    topology_topics,
    window_row,
)
from loop_plot import plot  # noqa: E402

from sieve.cli.demo import free_port  # noqa: E402
from sieve.contracts import NEEDS_REVIEW  # noqa: E402
from sieve.kafka.broker import start_dev_broker, stop_process  # noqa: E402
from sieve.kafka.client import ensure_topics  # noqa: E402
from sieve.quality.datasets import LabelledExample  # noqa: E402
from sieve.routeset import load_route_set  # noqa: E402
from sieve.routeset_dump import dump_route_set  # noqa: E402
from sieve.settings import KafkaSettings, Settings  # noqa: E402


class Loop:
    """One run: its folder, processes, oracle and the CLI commands it runs between windows."""

    def __init__(self, args: argparse.Namespace, examples: list[LabelledExample], default: str) -> None:
        self.args, self.out = args, args.out.resolve()
        self.examples, self.default = examples, default
        self.routes = copy_routes(args.routes, self.out / "routes", "v0.yaml")
        self.route_set = load_route_set(self.routes)
        self.kafka = KafkaSettings(bootstrap_servers=args.bootstrap or f"127.0.0.1:{free_port()}")
        outcomes = sorted({r.outcome for r in self.route_set.routes} | {self.route_set.default_outcome}
                          | {ex.gold(default) for ex in examples})
        encoder = {"kind": args.encoder, "batch_size": 32} | (
            {"backend": args.backend} if args.encoder != "trivial" else {})
        self.topology = loop_topology(args.prefix, self.routes, self.route_set.name, outcomes, encoder,
                                      max_events=args.batch, review_concurrency=args.review_concurrency,
                                      reviews_per_s=args.reviews_per_s, audit_share=args.audit_share,
                                      shadow_audit_share=args.shadow_audit_share)
        self.topology_path = self.out / "topology.yaml"
        self.topology_path.write_text(yaml.safe_dump(self.topology, sort_keys=False))
        self.review_topology_path = self.topology_path
        if args.review_routes is not None:  # the reviewer's catalogue: routes the router has no examples for
            review_routes = load_route_set(args.review_routes).model_copy(
                update={"name": self.route_set.name})
            copy = self.out / "routes" / "review.yaml"
            copy.write_text(dump_route_set(review_routes, copy.parent), encoding="utf-8")
            self.review_topology_path = self.out / "topology-review.yaml"
            review_topology = {**self.topology, "route_set": {"name": self.route_set.name, "file": str(copy)}}
            self.review_topology_path.write_text(yaml.safe_dump(review_topology, sort_keys=False))
        self.env = {
            **os.environ,
            "SIEVE_KAFKA__BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "SIEVE_QDRANT__PATH": str(self.out / "qdrant"),
            "SIEVE_METRICS_PORT": "0",
            "SIEVE_TORCH_THREADS": str(args.threads),
            "SIEVE_DEVICE": "cpu",
            "SIEVE_COMPUTE": args.compute,
            "SIEVE_LOG_LEVEL": "WARNING",
            "SIEVE_ROUTE_REFRESH_S": str(args.refresh_s),
            "SIEVE_KAFKA__SESSION_TIMEOUT_S": "6",
            "SIEVE_KAFKA__HEARTBEAT_INTERVAL_S": "1",
            "SIEVE_ONNX_CACHE_DIR": str((REPO / Settings().onnx_cache_dir).resolve()),
            "SIEVE_LLM__MODEL": "oracle-double",
            "SIEVE_LLM__TIMEOUT_S": "10",
        }
        self.processes: list[subprocess.Popen[bytes]] = []  # the broker's
        self.worker: subprocess.Popen[bytes] | None = None
        self.reviewer: subprocess.Popen[bytes] | None = None
        self.llm_base_url, self.metrics_port = "", 0
        self.shadowing: tuple[str, Path] | None = None  # the candidate the worker shadows, and its file

    def cli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``sieve ARGV`` in the checkout (its caches), with the run's environment."""
        done = subprocess.run([sys.executable, "-m", "sieve", *argv], env=self.env, cwd=REPO, text=True,
                              capture_output=True, check=False)
        with (self.out / "commands.log").open("a") as log:
            log.write(f"$ sieve {' '.join(argv)}\n[{done.returncode}] {done.stdout}{done.stderr}\n")
        if check and done.returncode != 0:
            raise RuntimeError(f"sieve {' '.join(argv[:2])} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    def encoder_options(self) -> list[str]:
        """The CLI's encoder options for the run's encoder."""
        return ["--encoder", self.args.encoder] + (["--backend", self.args.backend]
                                                   if self.args.encoder != "trivial" else [])

    def start(self, llm_base_url: str) -> None:
        """Broker, topics, the route set synced (active), the worker and the reviewer."""
        if not self.args.bootstrap:
            port = int(self.kafka.bootstrap_servers.rsplit(":", 1)[1])
            self.processes.append(start_dev_broker(port=port, log_path=self.out / "broker.log"))
        asyncio.run(ensure_topics(self.kafka, topology_topics(self.topology)))
        self.cli("routes", "sync", str(self.routes), "--topology", str(self.topology_path), "-q")
        self.llm_base_url = llm_base_url
        self.worker = self.spawn("worker", self.topology_path)
        self.reviewer = self.spawn("review", self.review_topology_path)

    def spawn(self, command: str, topology: Path, **env: str) -> subprocess.Popen[bytes]:
        """``sieve COMMAND TOPOLOGY`` in the background, its output appended to COMMAND.log."""
        log = (self.out / f"{command}.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", "sieve", command, str(topology)],
                                env={**self.env, "SIEVE_LLM__BASE_URL": self.llm_base_url, **env},
                                stdout=log, stderr=subprocess.STDOUT, cwd=self.out)

    def shadow(self, version: str, candidate: Path) -> None:
        """Restart the worker shadowing ``version`` (a new shadow takes a restart), with /metrics served."""
        stop_process(self.worker, 60)
        topology = {**self.topology, "route_set": {**self.topology["route_set"], "shadow": version}}
        path = self.out / "topology-shadow.yaml"
        path.write_text(yaml.safe_dump(topology, sort_keys=False))
        self.metrics_port = free_port()
        self.worker = self.spawn("worker", path, SIEVE_METRICS_PORT=str(self.metrics_port))
        self.shadowing = (version, candidate)

    def stop(self) -> None:
        """Stop the worker, reviewer and broker (this run's own processes), last started first."""
        for process in (self.reviewer, self.worker, *reversed(self.processes)):
            if process is not None:
                stop_process(process, 60)

    def check_alive(self) -> None:
        """Raise if the worker or reviewer has exited."""
        for process, name in ((self.worker, "worker"), (self.reviewer, "review")):
            if process is not None and process.poll() is not None:
                tail = (self.out / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"sieve {name} exited with {process.returncode}:\n{tail}")

    def learn(self, step: int) -> dict[str, Any]:
        """Export the labels (and anchors); promote the shadowed candidate if its evidence favours it
        (``--shadow``); learn a candidate and store it; then promote it or shadow it."""
        labels = self.out / "labels" / f"labels-{step}.jsonl"
        labels.parent.mkdir(exist_ok=True)
        self.cli("labels", "export", "--topic", self.topology["review"]["labels_topic"], "--out", str(labels),
                 "--idle", "2")
        count = sum(1 for _ in labels.open())
        record: dict[str, Any] = {"after_window": step, "labels": count, "promoted": False}
        if self.shadowing is not None:
            record.update(self.judge())
            self.shadowing = None
        candidate = self.out / "routes" / f"after-window-{step}.yaml"
        started = time.monotonic()
        noise = ["--label-accuracy", str(self.args.label_accuracy)] if self.args.label_accuracy else []
        if self.args.anchors:  # the active version's automatic decisions, for the candidate to keep
            topics = [f"--topic={t}" for o, t in self.topology["output"]["outcome_topics"].items()
                      if o != NEEDS_REVIEW]
            noise += ["--anchors", str(labels.with_name(f"anchors-{step}.jsonl"))]
            self.cli("labels", "anchors", "--out", noise[-1], "--idle", "2", *topics, "--version",
                     load_route_set(self.routes).version)
        learned = self.cli("routes", "learn", str(self.routes), "--labels", str(labels), "--out",
                           str(candidate), "--seed", str(self.args.seed), *self.encoder_options(), "-q",
                           *(["--new-outcomes"] if self.args.new_outcomes else []),
                           *noise, *self.args.learn_option, check=False)
        record["learn_s"] = round(time.monotonic() - started, 1)
        if learned.returncode != 0:
            record["learn_error"] = (learned.stdout + learned.stderr).strip().splitlines()[-1:]
            return record
        version = load_route_set(candidate).version
        self.cli("routes", "sync", str(candidate), "--topology", str(self.topology_path), "--no-activate",
                 "-q")
        if self.args.shadow:
            self.shadow(version, candidate)
            record["shadowing"] = version
        else:
            record.update(self.promote(version, candidate))
        return record

    def judge(self) -> dict[str, Any]:
        """Promote the shadowed candidate if its evidence and its shadow's counts so far favour it."""
        assert self.shadowing is not None
        record = self.promote(*self.shadowing, f"http://127.0.0.1:{self.metrics_port}/metrics")
        if record["promoted"]:
            self.shadowing = None
        return record

    def promote(self, version: str, candidate: Path, shadow_metrics: str | None = None) -> dict[str, Any]:
        """``sieve routes promote --if-better`` with the candidate's evidence (and its shadow's metrics)."""
        evidence = candidate.with_suffix(".learn.json")
        floor, added = self.args.promote_min_accuracy, self.args.promote_min_added_accuracy
        gate = (["--min-accuracy", str(floor)] if floor else []) + (
            ["--min-added-accuracy", str(added)] if added else [])
        if shadow_metrics:
            gate += ["--shadow-metrics", shadow_metrics, "--min-agreement", str(self.args.min_agreement),
                     "--min-shadow-events", str(self.args.min_shadow_events)]
        promoted = self.cli("routes", "promote", self.route_set.name, version, "--topology",
                            str(self.topology_path), "--evidence", str(evidence), "--if-better", *gate,
                            check=False)
        said = (promoted.stdout + promoted.stderr).strip()
        if promoted.returncode != 0 and "not promoted" not in said:
            raise RuntimeError(f"sieve routes promote failed:\n{promoted.stdout}{promoted.stderr}")
        if promoted.returncode == 0:
            self.routes = candidate
            time.sleep(2 * self.args.refresh_s + 1)  # the worker looks for a new active version this often
        return {"candidate": version, "promoted": promoted.returncode == 0,
                "promote_output": said.splitlines()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns what ``loop.json`` holds."""
    data, examples = loop_stream(args.data, args.seed, args.split or None)
    default = data.default_outcome or "unrouted"
    examples = examples[: args.limit] if args.limit else examples
    gold = {ex.text or "": ex.gold(default) for ex in reversed(examples)}  # a repeated text: its first label
    routes_of = {ex.text or "": ex.labels for ex in examples}
    new = set(json.loads(args.new_intents.read_text())) if args.new_intents else set()
    args.out.mkdir(parents=True, exist_ok=True)
    loop = Loop(args, examples, default)
    rows: list[dict[str, Any]] = []
    learning: list[dict[str, Any]] = []
    started = time.monotonic()
    with OracleLLM(gold, routes_of, wrong=args.wrong, delay_s=args.llm_delay_s, seed=args.seed) as oracle:
        try:
            loop.start(oracle.base_url)
            review = loop.topology["review"]
            skip = set(loop.topology["input"]["topics"])
            topics = [t for t in topology_topics(loop.topology) if t not in skip]
            with Collector(loop.kafka, topics, loop.topology["output"]["dead_letter_topic"],
                           review["labels_topic"], args.audit_share, review["audit_topic"]) as collector:
                labels = 0
                print(HEADER, flush=True)
                for index, start in enumerate(range(0, len(examples), args.window)):
                    chunk = examples[start: start + args.window]
                    events = events_of(chunk, start)
                    ids = [e["id"] for e in events]
                    window_started = time.monotonic()
                    deadline = time.monotonic() + args.window_timeout_s
                    part, judged = -(-len(events) // max(1, args.shadow_checks)), 0
                    for at in range(0, len(events), part):  # judging a shadowed candidate between parts
                        asyncio.run(produce_events(loop.kafka, loop.topology["input"]["topics"][0],
                                                   events[at: at + part]))
                        # the shadow's audits are not predictable from the decisions: let them arrive too
                        collector.wait(ids[: at + part], deadline, loop.check_alive,
                                       2.0 if args.shadow_audit_share > 0 else 0.0)
                        if at + part < len(events) and loop.shadowing is not None:
                            learning.append({"in_window": index, "after_events": at + part, **loop.judge()})
                            judged += learning[-1]["promoted"]
                    extra = {"new_intents": [bool(ex.labels & new) for ex in chunk]} if new else None
                    row = window_row(index, collector.snapshot(ids), [ex.gold(default) for ex in chunk],
                                     labels_before=labels, extra=extra)
                    row["promotions"] = judged
                    row["seconds"] = round(time.monotonic() - window_started, 1)
                    rows.append(row)
                    note = "".join(f"  promoted {s['candidate']} after {s['after_events']} events;"
                                   for s in learning if s.get("in_window") == index and s["promoted"])
                    if start + args.window < len(examples):
                        step = loop.learn(index)
                        labels = step["labels"]
                        row["promotions"] += int(step["promoted"])
                        learning.append(step)
                        note += (f"  then {labels} labels, learn {step['learn_s']} s: "
                                + ("promoted " + step["candidate"] if step["promoted"] else
                                   step["learn_error"][0] if "learn_error" in step else "not promoted")
                                + (f", shadowing {step['shadowing']}" if "shadowing" in step else ""))
                    print(format_row(row) + note, flush=True)
                    result = report(args, rows, learning, oracle, time.monotonic() - started)
                    (args.out / "loop.json").write_text(json.dumps(result, indent=2))  # so far
        finally:
            loop.stop()
        return report(args, rows, learning, oracle, time.monotonic() - started)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], learning: list[dict[str, Any]],
           oracle: OracleLLM, seconds: float) -> dict[str, Any]:
    """What ``loop.json`` holds: the run's settings, its windows, the learning steps and the totals."""
    summary = overall(rows)
    summary.update(oracle_requests=oracle.requests, oracle_unknown_items=oracle.unknown_items,
                   seconds=round(seconds, 1))
    return {"data": args.data, "routes": str(args.routes), "window": args.window, "wrong": args.wrong,
            "promote_min_accuracy": args.promote_min_accuracy, "llm_delay_s": args.llm_delay_s,
            "label_accuracy": args.label_accuracy, "learn_options": args.learn_option,
            "audit_share": args.audit_share, "shadow": args.shadow, "min_agreement": args.min_agreement,
            "shadow_audit_share": args.shadow_audit_share, "anchors": args.anchors,
            "shadow_checks": args.shadow_checks,
            "promote_min_added_accuracy": args.promote_min_added_accuracy,
            "seed": args.seed, "encoder": args.encoder, "windows": rows, "learning": learning,
            "overall": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a data set name (davidson, clinc150, ...) or a labelled JSONL path")
    parser.add_argument("--routes", type=Path, required=True, help="the route file the worker starts from")
    parser.add_argument("--out", type=Path, required=True, help="the run's folder (loop.json, loop.png)")
    parser.add_argument("--limit", type=int, default=0, help="stream only this many events (0: all)")
    parser.add_argument("--split", default=None, help="stream only this split of the data (CLINC150: test)")
    parser.add_argument("--window", type=int, default=2000, help="events per window")
    parser.add_argument("--wrong", type=float, default=0.05, help="share of items the oracle answers wrongly")
    parser.add_argument("--llm-delay-s", type=float, default=0.2, help="the oracle's mean delay per request")
    parser.add_argument("--seed", type=int, default=0, help="stream order, oracle errors, learn splits")
    parser.add_argument("--encoder", default="sentence-transformers", help="or trivial (no model)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--compute", default="thread", help="the worker's compute mode (thread or process)")
    parser.add_argument("--threads", type=int, default=2, help="the worker's torch threads")
    parser.add_argument("--batch", type=int, default=128, help="the worker's batch size")
    parser.add_argument("--review-concurrency", type=int, default=16)
    parser.add_argument("--reviews-per-s", type=float, default=100.0)
    parser.add_argument("--refresh-s", type=float, default=2.0, help="the worker's route refresh period")
    parser.add_argument("--promote-min-accuracy", type=float, default=None,
                        help="promote --min-accuracy: the candidate's Wilson lower bound at least this")
    parser.add_argument("--promote-min-added-accuracy", type=float, default=None,
                        help="promote --min-added-accuracy: what a candidate adds at least this accurate")
    parser.add_argument("--shadow", action="store_true",
                        help="shadow each candidate through the next window (the worker restarted with "
                        "route_set.shadow), then promote it only if its shadow metrics pass too")
    parser.add_argument("--min-shadow-events", type=int, default=500, help="promote --min-shadow-events")
    parser.add_argument("--shadow-checks", type=int, default=1,
                        help="judge a shadowed candidate this often a window: after each of as many equal "
                        "parts (1: at the window's end only)")
    parser.add_argument("--min-agreement", type=float, default=0.95, help="promote --min-agreement")
    parser.add_argument("--shadow-audit-share", type=float, default=0.0,
                        help="review.shadow_audit_share: what the shadow would overturn, labelled too")
    parser.add_argument("--audit-share", type=float, default=0.0,
                        help="review.audit_share: automatic decisions also labelled by the reviewer")
    parser.add_argument("--anchors", action="store_true", help="routes learn --anchors (labels anchors)")
    parser.add_argument("--learn-option", action="append", default=[],
                        help="one more option for routes learn (repeatable), e.g. --learn-option=--z=1.96")
    parser.add_argument("--label-accuracy", type=float, default=None,
                        help="routes learn --label-accuracy: how often the labels are right (here 1 - "
                        "--wrong; a deployment reads it off the console's LLM-human agreement)")
    parser.add_argument("--bootstrap", default=None, help="use this broker (default: start a dev broker)")
    parser.add_argument("--prefix", default="loop", help="the run's topic and consumer-group prefix")
    parser.add_argument("--window-timeout-s", type=float, default=1800.0)
    parser.add_argument("--review-routes", type=Path, default=None,
                        help="the reviewer's route file (e.g. every CLINC150 intent), renamed to the set's")
    parser.add_argument("--new-outcomes", action="store_true", help="routes learn --new-outcomes (intents)")
    parser.add_argument("--new-intents", type=Path, default=None,
                        help="clinc_half.py's new.json: also report the new intents' automatic and right "
                        "share")
    args = parser.parse_args()
    result = run(args)
    (args.out / "loop.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "loop.png")
    print(json.dumps(result["overall"]))


if __name__ == "__main__":
    main()
