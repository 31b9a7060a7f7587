"""Chaos run: real workers killed, rebalanced and cut off from the broker under paced load;
the checker then proves every event was decided or dead-lettered (nothing lost).

The dev broker (tansu, memory storage) listens on one port and ADVERTISES the port of a TCP
proxy (tcp_proxy.py), so every connection the ``sieve worker`` processes open goes through
the proxy, not only their first one. "Broker down" is a partition at the proxy (the broker
keeps its data in memory, so it is never killed). The harness's own clients (the paced
producer of real texts and the output watcher) reach the broker directly, so input keeps
arriving during a partition and the watcher sees that the workers' output stops, and
resumes after the heal: that is the proof the proxy is in the workers' path.

``--reviewers`` ``sieve review`` processes consume the needs-review topic, through the proxy
as well (a partition cuts them off too), and ask a scripted OpenAI-compatible endpoint
(llm_script.py, a test double on 127.0.0.1 that answers valid verdicts after a short delay,
a share of malformed replies that become hand-offs, and a share of 503s and hung requests).
With the trivial encoder, routes/moderation.yaml sends most of the real texts to review (a
violating route's review band, ambiguous accepts, novel texts), so no special route set is
needed; the table counts them.

Meanwhile: SIGKILLs of random workers and (``--reviewer-kills``) reviewers at random times
(each restarted after ``--restart-delay``), rebalances (a worker joins; later one leaves with
SIGTERM), and a process that exits on its own is restarted, as an orchestrator would. At the
end the checker (chaos_check.py) prints the table: produced, decided, dead-lettered, lost
(must be 0), repeats under one decision id (allowed), conflicting decision ids (a defect);
with reviewers, the router's needs_review decisions, settled by an LLM verdict or a hand-off
to human review, unsettled (must be 0), repeated verdicts (allowed), and two verdict ids for
one router decision (a defect).

    .venv/bin/python load-tests/chaos.py     # a short run: 2 workers, 1 reviewer, 3 + 1 kills, one 10 s cut
    .venv/bin/python load-tests/chaos.py --workers 3 --reviewers 2 --duration 1800 --rate 20 --kills 20
        --reviewer-kills 10 --rebalances 10 --partition-s 30,30,30,300     # the full run (one line)

``--partition-mode reset`` closes the workers' connections instead of stalling them;
``--encoder sentence-transformers`` runs MiniLM instead of the trivial hashing encoder.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_check import OutputWatch  # noqa: E402
from chaos_fleet import Fleet, bypass, reviewer_env, start_broker, worker_env  # noqa: E402
from llm_script import ScriptedEndpoint  # noqa: E402
from loadgen import make_events, produce_events  # noqa: E402
from scaling import wait_for_group  # noqa: E402
from tcp_proxy import ChaosProxy  # noqa: E402

from sieve.cli.demo import free_port  # noqa: E402
from sieve.kafka.client import ensure_topics  # noqa: E402
from sieve.routeset import load_route_set  # noqa: E402
from sieve.routeset_dump import dump_route_set  # noqa: E402
from sieve.settings import KafkaSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROUTES = REPO / "routes" / "moderation.yaml"
OUTCOMES = ("clean", "violating", "needs_review")
ACTIONS = ("SIGKILL", "restart", "join", "leave", "exited on its own")
LLM_ANSWERS = ("verdict", "malformed", "503", "hung")


def plan(args: argparse.Namespace, rng: random.Random) -> list[tuple[float, int, str, int]]:
    """The timeline ``(seconds, order, action, argument)``: partitions spread evenly, kills (of
    workers and of reviewers) and rebalances at random times after the warm-up."""
    lengths = [float(x) for x in args.partition_s.split(",") if x.strip()] if args.partition_s else []
    actions: list[tuple[float, int, str, int]] = []
    if lengths:
        slot = (args.duration - args.warm_s) / len(lengths)
        if any(length + 10 > slot for length in lengths):
            raise SystemExit(f"--duration {args.duration} is too short for partitions {lengths}")
        for i, length in enumerate(lengths):
            start = args.warm_s + slot * i + (slot - length) / 2
            actions += [(start, 0, "cut", i), (start + length, 1, "heal", i)]
    span = (args.warm_s, max(args.warm_s + 1, args.duration - 5))
    actions += [(rng.uniform(*span), 2, "kill", i) for i in range(args.kills)]
    actions += [(rng.uniform(*span), 3, "rebalance", i) for i in range(args.rebalances)]
    actions += [(rng.uniform(*span), 4, "review-kill", i) for i in range(getattr(args, "reviewer_kills", 0))]
    return sorted(actions)


def write_topology(tmp: Path, prefix: str, args: argparse.Namespace) -> tuple[Path, dict]:
    """A topology over a copy of routes/moderation.yaml with fresh topics named after ``prefix``.

    The copy is the run's: workers and reviewers restarted during the run load the same set.
    """
    routes = tmp / ROUTES.name  # its list files named from there (the shipped ones)
    routes.write_text(dump_route_set(load_route_set(ROUTES), tmp), encoding="utf-8")
    topology = {
        "name": "chaos",
        "group_id": f"{prefix}-group",
        "input": {"topics": [f"{prefix}.in"], "partitions": args.partitions},
        "route_set": {"name": "moderation", "file": str(routes)},
        "encoder": {"kind": args.encoder, "batch_size": 32},
        "batching": {"max_events": 64, "max_wait_s": 0.1},
        "output": {
            "outcome_topics": {o: f"{prefix}.{o.replace('_', '-')}" for o in OUTCOMES},
            "route_topic_prefix": None,
            "dead_letter_topic": f"{prefix}.dead-letter",
            "partitions": args.partitions,
        },
        "review": {
            "human_review_topic": f"{prefix}.human-review",
            "max_concurrency": 8,
            "max_reviews_per_s": 100,
            "batching": {"max_events": 16, "max_wait_s": 0.2},
        },
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path, topology


def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Everything: broker, proxy, endpoint, workers, reviewers, load, chaos, drain, check."""
    rng = random.Random(args.seed)
    broker_port = free_port()
    proxy = ChaosProxy(("127.0.0.1", broker_port)).start()
    broker = start_broker(broker_port, proxy.port, tmp / "tansu.log")
    llm = ScriptedEndpoint(malformed_share=args.llm_malformed_share, fail_share=args.llm_fail_share,
                           hang_share=args.llm_hang_share, seed=args.seed).__enter__()
    prefix = f"chaos{args.seed}"
    topology_path, topology = write_topology(tmp, prefix, args)
    direct = KafkaSettings(bootstrap_servers=f"127.0.0.1:{broker_port}")
    env = worker_env(args, f"127.0.0.1:{proxy.port}", tmp / "qdrant")
    out = topology["output"]
    outputs = list(out["outcome_topics"].values())
    human = topology["review"]["human_review_topic"] if args.reviewers else None
    fleet = Fleet(tmp, topology_path, env, args.restart_delay)
    reviewers = Fleet(tmp, topology_path, reviewer_env(env, llm.base_url), args.restart_delay, "review",
                      log=fleet.log)
    with bypass(proxy.port, broker_port):
        try:
            topics = [*outputs, out["dead_letter_topic"], f"{prefix}.in", *([human] if human else [])]
            asyncio.run(ensure_topics(direct, {t: args.partitions for t in topics}))
            routes = topology["route_set"]["file"]
            sync = subprocess.run([sys.executable, "-m", "sieve", "routes", "sync", routes, "--topology",
                                   str(topology_path)], env=env, capture_output=True, cwd=tmp, check=False)
            if sync.returncode != 0:
                raise RuntimeError(f"routes sync failed: {sync.stdout.decode()[-2000:]}"
                                   f"{sync.stderr.decode()[-2000:]}")
            watch = OutputWatch(direct, outputs, out["dead_letter_topic"], f"{prefix}.in", human).start()
            for slot in range(args.workers):
                fleet.start(slot)
            for slot in range(args.reviewers):
                reviewers.start(slot)
            wait_for_group([fleet.procs[s] for s in fleet.procs], list(fleet.ports.values()), args.partitions)
            if args.reviewers:
                wait_for_group(list(reviewers.procs.values()), list(reviewers.ports.values()),
                               args.partitions)
            fleet.note(f"{args.workers} workers and {args.reviewers} reviewers settled on {args.partitions} "
                       f"partitions; proxy :{proxy.port} -> broker :{broker_port}")
            return chaos(args, rng, proxy, (fleet, reviewers), watch, direct, prefix, broker, llm)
        finally:
            fleet.stop()
            reviewers.stop()
            proxy.stop()
            llm.__exit__(None, None, None)
            broker.terminate()
            broker.wait(10)


def chaos(args, rng, proxy, fleets, watch, direct, prefix, broker, llm) -> dict:  # noqa: ANN001, PLR0913
    """The paced load and the timeline of faults, then the drain and the check."""
    fleet, reviewers = fleets
    events = make_events(int(args.rate * args.duration), prefix, seed=args.seed)
    produced = {e["id"] for e in events}
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            asyncio.run(produce_events(direct, f"{prefix}.in", events, args.rate))
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    timeline = plan(args, rng)
    heapq.heapify(timeline)
    cuts: dict[int, list[float]] = {}
    t0 = time.monotonic()
    fleet.t0 = reviewers.t0 = t0
    producer.start()
    fleet.note(f"producing {len(events)} events at {args.rate}/s for {args.duration} s; "
               f"{sum(a[2] == 'kill' for a in timeline)} worker kills, "
               f"{sum(a[2] == 'review-kill' for a in timeline)} reviewer kills, "
               f"{sum(a[2] == 'rebalance' for a in timeline)} rebalances, "
               f"{sum(a[2] == 'cut' for a in timeline)} partitions ({args.partition_mode})")
    extra = args.workers  # the slot that joins and leaves
    while timeline or producer.is_alive():
        while timeline and timeline[0][0] <= time.monotonic() - t0:
            planned, _, action, arg = heapq.heappop(timeline)
            if action == "cut":
                cuts[arg] = [time.monotonic()]
                proxy.partition(args.partition_mode)
                fleet.note(f"partition {arg}: cut ({args.partition_mode})")
                late = cuts[arg][0] - t0 - planned  # the loop came late: the heal waits as long
                if late > 0:
                    timeline = [(at + late if (act, x) == ("heal", arg) else at, order, act, x)
                                for at, order, act, x in timeline]
                    heapq.heapify(timeline)
            elif action == "heal":
                proxy.heal()
                cuts[arg].append(time.monotonic())
                fleet.note(f"partition {arg}: healed after {cuts[arg][1] - cuts[arg][0]:.0f} s")
            elif action == "kill":
                fleet.kill(rng)
            elif action == "review-kill":
                reviewers.kill(rng)
            elif extra in fleet.running() and extra not in fleet.leaving:
                fleet.leave(extra)
            elif len([s for s in fleet.running() if s not in fleet.leaving]) < args.max_workers:
                fleet.join(extra)
            else:
                fleet.note("rebalance skipped: --max-workers running")
        fleet.supervise()
        reviewers.supervise()
        time.sleep(0.2)
    if failure:
        raise RuntimeError(f"the producer failed: {failure[0]!r}")
    fleet.note("load sent; draining")
    drain_start = time.monotonic()
    while watch.pending(produced) and time.monotonic() - drain_start < args.drain_timeout:
        if time.monotonic() - max(watch.last_output(), drain_start) > args.idle:
            break
        fleet.supervise()
        reviewers.supervise()
        time.sleep(1)
    time.sleep(args.settle)
    watch.stop()
    verdict = watch.ledger.verdict(produced, reviewed=args.reviewers > 0)
    windows = []
    for i, (start, end) in sorted(cuts.items()):
        first = watch.first_output_after(end)
        windows.append({
            "partition": i, "seconds": round(end - start, 1),
            "inputs_during": watch.inputs_between(start, end),
            "outputs_during": watch.outputs_between(start + args.grace, end),
            "reviews_during": watch.outputs_between(start + args.grace, end, reviews=True),
            "resumed_after_s": round(first - end, 1) if first is not None else None,
        })
    lost_where = {e: watch.where.get(e) for e in verdict.lost[:20]}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "args": vars(args),
        "produced": verdict.produced, "decided": verdict.decided,
        "dead_lettered_only": verdict.dead_lettered_only, "lost": verdict.lost,
        "lost_where": {k: list(v) if v else None for k, v in lost_where.items()},
        "repeats": verdict.repeats, "repeated_events": verdict.repeated_events,
        "conflicting": verdict.conflicting, "version_changes": verdict.version_changes,
        "outcome_mismatches": verdict.outcome_mismatches, "dead_letter_reasons": verdict.dead_letter_reasons,
        "review": vars(verdict.review) if verdict.review is not None else None,
        "actions": dict(fleet.counts), "reviewer_actions": dict(reviewers.counts), "llm": dict(llm.counts),
        "partitions": windows, "proxy": proxy.stats(),
        "broker_alive": broker.poll() is None, "log": fleet.log, "ok": verdict.ok,
        "table": verdict.table(),
    }


def report(r: dict) -> str:
    """The printed tables."""
    a, ra = r["actions"], r["reviewer_actions"]
    lines = [f"## Chaos run, {r['date']}", "", r["table"], "",
             "| chaos | workers | reviewers |", "|---|---:|---:|",
             *(f"| {k} | {a.get(k, 0)} | {ra.get(k, 0)} |" for k in ACTIONS),
             "", "| partition | seconds | inputs meanwhile | outputs meanwhile (after grace) "
             "| of them reviewer outputs | output resumed after |",
             "|---:|---:|---:|---:|---:|---:|"]
    for w in r["partitions"]:
        resumed = f"{w['resumed_after_s']} s" if w["resumed_after_s"] is not None else "never"
        lines.append(f"| {w['partition']} | {w['seconds']} | {w['inputs_during']} "
                     f"| {w['outputs_during']} | {w['reviews_during']} | {resumed} |")
    if r["args"]["reviewers"]:
        lines += ["", "scripted LLM endpoint answers: "
                  + ", ".join(f"{k} {r['llm'].get(k, 0)}" for k in LLM_ANSWERS)]
    if r["lost"]:
        lines += ["", f"LOST {len(r['lost'])} events; the first (input partition, offset): {r['lost_where']}",
                  "action log (s since the load started):", *(f"  {t:7.1f} {what}" for t, what in r["log"])]
    if r["conflicting"]:
        lines += ["", f"CONFLICTING decision ids for: {r['conflicting'][:20]}"]
    review = r["review"] or {}
    for key in ("unsettled", "two_ids", "two_fates"):
        if review.get(key):
            lines += ["", f"{key.upper()} router decision or verdict ids: {review[key][:20]}"]
    if review.get("unsettled") and not r["lost"]:
        lines += ["action log (s since the load started):", *(f"  {t:7.1f} {what}" for t, what in r["log"])]
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run, print the tables; exit 1 when something was lost, conflicting or unsettled."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="workers running at all times")
    p.add_argument("--max-workers", type=int, default=4, help="at most this many during a join")
    p.add_argument("--partitions", type=int, default=4, help="partitions of every topic")
    p.add_argument("--rate", type=float, default=15.0, help="events/s produced during the run")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load and chaos")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of random workers")
    p.add_argument("--reviewers", type=int, default=1, help="reviewers running at all times (0: none)")
    p.add_argument("--reviewer-kills", type=int, default=1, help="SIGKILLs of random reviewers")
    p.add_argument("--llm-malformed-share", type=float, default=0.05,
                   help="share of reviewed items the scripted endpoint answers with no JSON (hand-offs)")
    p.add_argument("--llm-fail-share", type=float, default=0.05, help="share of requests answered 503")
    p.add_argument("--llm-hang-share", type=float, default=0.02,
                   help="share of requests held past the reviewer's timeout")
    p.add_argument("--rebalances", type=int, default=2, help="joins and leaves, alternating")
    p.add_argument("--partition-s", default="10", help="broker partitions at the proxy, seconds each")
    p.add_argument("--partition-mode", choices=["stall", "drop", "reset"], default="stall")
    p.add_argument("--warm-s", type=float, default=5.0, help="no fault before this second")
    p.add_argument("--restart-delay", type=float, default=1.0, help="seconds before a killed worker restarts")
    p.add_argument("--grace", type=float, default=3.0, help="seconds after a cut before output must stop")
    p.add_argument("--encoder", default="trivial", help="the topology's encoder kind")
    p.add_argument("--compute", choices=["thread", "process", "auto"], default="thread")
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--idle", type=float, default=120.0, help="stop draining after this long with no output")
    p.add_argument("--settle", type=float, default=3.0, help="seconds read after the drain (late repeats)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--keep", type=Path, help="keep the logs (broker, workers) in this folder")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the workers and the broker too
    tmp = Path(tempfile.mkdtemp(prefix="sieve-chaos-"))
    try:
        r = run(args, tmp)
    finally:
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("qdrant"))
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in r.items() if k != "table"}, indent=2, default=str))
    sys.exit(0 if r["ok"] else 1)


if __name__ == "__main__":
    main()
