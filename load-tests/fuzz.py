"""Fuzz run: thousands of generated bad events through one real worker; every one must come
out decided or dead-lettered with a reason, the worker alive, its memory bounded and flat.

One dev broker (tansu) and one ``sieve worker`` process (worker_rig.WorkerRig) run a
topology over routes/marketplace.yaml with text (the trivial hashing encoder by default,
``--encoder sentence-transformers`` for MiniLM) and images (a tiny random-weight open_clip
model). The events (fuzz_events.py, seeded) are random bytes, truncated, deeply nested and
non-standard JSON, wrong types, huge fields, lone surrogates, zero-width and bidi characters,
and image events: decompression bombs, SVG, data:/file: URLs, private and loopback URLs
(spelt many ways), a closed port, and hostile answers from a local image server
(fuzz_images.py) the worker is allowed to reach. A share are valid controls.

After a warm-up the worker's resident memory (its process and its compute child) is sampled
all through the run: the start, the peak, and the slope over the second half. The checker
(fuzz_check.py) reads every output topic from the beginning; the script prints one table and
exits non-zero if an event is unaccounted for, a dead letter has no reason, an event had
the wrong fate for its kind, or the worker died.

    .venv/bin/python load-tests/fuzz.py --events 10000            # the full run
    .venv/bin/python load-tests/fuzz.py --events 1000 --rate 0    # the CI size (tests/test_fuzz_smoke.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import worker_rig  # noqa: E402
from fuzz_check import Accounting, RssSampler, account, produce_fuzz  # noqa: E402
from fuzz_events import MAX_EVENT_BYTES, MAX_TEXT_CHARS, FuzzEvent, make_fuzz_events  # noqa: E402
from fuzz_images import HOST, ImageServer, closed_port  # noqa: E402
from loadgen import make_events  # noqa: E402
from scaling import wait_for_group  # noqa: E402
from worker_rig import DEAD_LETTER_TOPIC, INPUT_TOPIC, OUTCOME_TOPICS, WorkerRig, encoder_spec  # noqa: E402

from sieve.encoders.clip import save_tiny_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MEMORY_BUDGET_MIB = 300.0
# Dead-letter reasons that say the worker's code raised (sieve.worker.faults.PROCESSING_ERRORS):
# for generated bad input they mean decoding let through what the pipeline cannot handle.
PROCESSING_ERRORS = frozenset({"encode_error", "pipeline_error"})
LIMITS = {
    "max_text_chars": MAX_TEXT_CHARS,
    "max_event_bytes": MAX_EVENT_BYTES,
    "max_dead_letter_payload_bytes": 65_536,
}


def healthy(port: int) -> bool:
    """Whether the worker's /healthz answers 200."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
    except OSError:
        return False


def fate_mismatches(events: list[FuzzEvent], acc: Accounting) -> list[str]:
    """Ids of events whose outputs contradict their kind's expectation."""
    wrong = []
    for e in events:
        decided, dead = acc.decided[e.id] > 0, bool(acc.dead.get(e.id))
        if (e.expect == "decided" and (dead or not decided)) or (e.expect == "dead_letter" and decided):
            wrong.append(e.id)
    return wrong


def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Start everything, send the fuzz, account for it; the figures as a dict."""
    clip = save_tiny_clip(tmp / "tiny-clip")
    # WorkerRig builds its topology over, and syncs, the route set named by this module global:
    # the marketplace set has text utterances and CLIP prompts, so both spaces are live.
    worker_rig.ROUTES = REPO / "routes" / "marketplace.yaml"
    backend = "torch" if args.encoder == "sentence-transformers" else None  # no ONNX export to wait for
    rig = WorkerRig(
        tmp,
        "fuzz",
        encoder_spec(args.encoder, backend, 32),
        threads=1,
        max_events=args.max_events,
        partitions=args.partitions,
    )
    rig.topology["route_set"] = {"name": "marketplace", "file": str(worker_rig.ROUTES)}
    rig.topology["image_encoder"] = {"model": f"local-dir:{clip}", "pretrained": None, "batch_size": 16}
    rig.topology["limits"] = LIMITS
    rig.topology["output"] = {"outcome_topics": OUTCOME_TOPICS, "dead_letter_topic": DEAD_LETTER_TOPIC,
                              "route_topic_prefix": None}
    with ImageServer(slow_s=args.fetch_timeout + 3) as server, rig:
        os.environ["SIEVE_IMAGES__ALLOW_HOSTS"] = json.dumps([f"{HOST}/32"])
        os.environ["SIEVE_IMAGES__TIMEOUT_S"] = str(args.fetch_timeout)
        events = make_fuzz_events(
            args.events,
            f"fz{args.seed}",
            seed=args.seed,
            image_base=server.url(""),
            closed_port=closed_port(),
        )
        started = time.monotonic()
        rig.start_worker()
        assert rig.worker is not None
        worker = rig.worker
        wait_for_group([rig.worker], [rig.metrics_port], args.partitions)
        sampler = RssSampler(rig.worker.pid).start()
        warm = make_events(64, "warm", image_share=0.25, seed=args.seed)
        rig.produce(warm)
        rig.decisions("warm", len(warm), timeout_s=300)
        ready_s = time.monotonic() - started
        time.sleep(1.0)
        run_start = time.monotonic()
        where = asyncio.run(produce_fuzz(rig.kafka, INPUT_TOPIC, events, args.rate))
        produced_s = time.monotonic() - run_start
        acc = asyncio.run(
            account(
                rig.kafka,
                input_topic=INPUT_TOPIC,
                outcome_topics=list(OUTCOME_TOPICS.values()),
                dead_letter_topic=DEAD_LETTER_TOPIC,
                events=events,
                where=where,
                ignore_prefix="warm-",
                idle_s=args.idle,
                timeout_s=args.timeout,
                alive=lambda: worker.poll() is None,
            )
        )
        run_end = max(acc.last_output_at, run_start + produced_s)
        time.sleep(1.0)
        sampler.stop()
        alive = rig.worker.poll() is None
        health = alive and healthy(rig.metrics_port)
        log_text = rig.worker_log.read_text(errors="replace")
        if args.log:
            args.log.write_text(log_text)
        memory = sampler.summary(run_start, run_end)
        memory["vmhwm_tree_mib"] = rig.peak_rss_mib() if alive else float("nan")
        image_requests = server.requests
    by_kind: dict[str, dict] = {}
    mismatched = set(fate_mismatches(events, acc))
    for e in events:
        row = by_kind.setdefault(
            e.kind,
            {
                "expect": e.expect,
                "produced": 0,
                "decided": 0,
                "dead_lettered": 0,
                "unaccounted": 0,
                "wrong_fate": 0,
                "reasons": Counter(),
            },
        )
        if row["expect"] != e.expect:
            row["expect"] = "mixed"
        row["produced"] += 1
        row["decided"] += acc.decided[e.id] > 0
        row["dead_lettered"] += bool(acc.dead.get(e.id))
        row["unaccounted"] += not acc.accounted(e.id)
        row["wrong_fate"] += e.id in mismatched
        row["reasons"].update(set(acc.dead.get(e.id, ())))
    unaccounted = [e.id for e in events if not acc.accounted(e.id)]
    return {
        "events": len(events),
        "seed": args.seed,
        "encoder": args.encoder,
        "rate": args.rate,
        "decided": sum(1 for e in events if acc.decided[e.id]),
        "dead_lettered": sum(1 for e in events if acc.dead.get(e.id)),
        "both": sum(1 for e in events if acc.decided[e.id] and acc.dead.get(e.id)),
        "accounted": len(events) - len(unaccounted),
        "unaccounted": unaccounted[:50],
        "unaccounted_count": len(unaccounted),
        "wrong_fate": sorted(mismatched)[:50],
        "wrong_fate_count": len(mismatched),
        "reasonless": acc.reasonless[:50],
        "repeats": sum(acc.decided.values())
        + sum(len(v) for v in acc.dead.values())
        - sum(1 for e in events if acc.accounted(e.id)),
        "unmatched_outputs": acc.unmatched,
        "truncated_letters": acc.truncated_letters,
        "reasons": {f"{r}|{s}": n for (r, s), n in acc.stages.most_common()},
        "processing_errors": sum(n for (r, _), n in acc.stages.items() if r in PROCESSING_ERRORS),
        "by_kind": {k: {**v, "reasons": dict(v["reasons"])} for k, v in sorted(by_kind.items())},
        "worker_alive": alive,
        "worker_healthy": health,
        "worker_exit": rig.worker.returncode,
        "tracebacks_in_log": log_text.count("Traceback"),
        "image_server_requests": image_requests,
        "ready_s": ready_s,
        "produce_s": produced_s,
        "run_s": run_end - run_start,
        "memory": memory,
        "worker_log": str(rig.worker_log),
    }


def table(r: dict, command: str) -> str:
    """The fuzz run's table (Markdown)."""
    m = r["memory"]
    nan = float("nan")
    pct = 100.0 * r["accounted"] / r["events"] if r["events"] else 0.0
    pace = "flat out" if not r["rate"] else f"{r['rate']:.0f} events/s"
    lines = [
        f"Sieve fuzz run — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPU "
        f"cores, {worker_rig.cpu_model()}; dev broker (tansu), one `sieve worker` (text encoder "
        f"{r['encoder']}, tiny open_clip for images), seed {r['seed']}, "
        f"{pace}",
        f"Command: `{command}`",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| fuzz events produced | {r['events']} |",
        f"| accounted for (decided, or dead-lettered with a reason) | {r['accounted']} ({pct:.2f} %) |",
        f"| decided / dead-lettered / both | {r['decided']} / {r['dead_lettered']} / {r['both']} |",
        f"| unaccounted | {r['unaccounted_count']} |",
        f"| dead letters without a reason | {len(r['reasonless'])} |",
        f"| dead letters for a processing error (encode_error, pipeline_error) | {r['processing_errors']} |",
        f"| fate contrary to the kind's expectation | {r['wrong_fate_count']} |",
        f"| repeated outputs (at-least-once) | {r['repeats']} |",
        f"| dead letters truncated (payload over 64 KiB) | {r['truncated_letters']} |",
        f"| worker alive at the end / /healthz 200 | {'yes' if r['worker_alive'] else 'NO'} / "
        f"{'yes' if r['worker_healthy'] else 'NO'} |",
        f"| tracebacks in the worker log | {r['tracebacks_in_log']} |",
        f"| run: produce / until the last output | {r['produce_s']:.1f} s / {r['run_s']:.1f} s |",
        "| resident memory at start (worker + compute child, after warm-up) | "
        f"{m.get('start_mib', 0):.0f} MiB |",
        f"| peak resident memory (sampled) / VmHWM sum | {m.get('peak_mib', 0):.0f} MiB / "
        f"{m.get('vmhwm_tree_mib', float('nan')):.0f} MiB |",
        "| of which the worker's own process (the Kafka side): start / peak | "
        f"{m.get('worker_process_start_mib', nan):.0f} MiB / "
        f"{m.get('worker_process_peak_mib', nan):.0f} MiB |",
        f"| peak above start (budget {MEMORY_BUDGET_MIB:.0f} MiB) | "
        f"{m.get('peak_over_start_mib', 0):.0f} MiB |",
        f"| second half: slope / range | {m.get('second_half_slope_mib_per_min', nan):+.1f} MiB/min / "
        f"{m.get('second_half_min_mib', nan):.0f}–{m.get('second_half_max_mib', nan):.0f} MiB |",
        "",
        "| kind | expected | produced | decided | dead-lettered | unaccounted | wrong fate "
        "| dead-letter reasons |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for kind, row in r["by_kind"].items():
        reasons = ", ".join(
            f"{k or '(none)'} {v}" for k, v in sorted(row["reasons"].items(), key=lambda x: -x[1])
        )
        lines.append(
            f"| {kind} | {row['expect']} | {row['produced']} | {row['decided']} | {row['dead_lettered']} "
            f"| {row['unaccounted']} | {row['wrong_fate']} | {reasons} |"
        )
    lines += ["", "| dead-letter reason | stage | letters |", "|---|---|---:|"]
    lines += [f"| {k.split('|')[0] or '(none)'} | {k.split('|')[1]} | {n} |" for k, n in r["reasons"].items()]
    return "\n".join(lines)


def failures(r: dict) -> list[str]:
    """Why the run failed (empty: it passed)."""
    out = []
    if r["unaccounted_count"]:
        out.append(f"{r['unaccounted_count']} events unaccounted for, e.g. {r['unaccounted'][:5]}")
    if r["reasonless"]:
        out.append(f"dead letters without a reason: {r['reasonless'][:5]}")
    if r["wrong_fate_count"]:
        out.append(f"{r['wrong_fate_count']} events with the wrong fate, e.g. {r['wrong_fate'][:5]}")
    if r["processing_errors"]:
        out.append(
            f"{r['processing_errors']} bad events dead-lettered as processing errors, not as bad input"
        )
    if not r["worker_alive"]:
        out.append(f"the worker died (exit {r['worker_exit']}; log {r['worker_log']})")
    elif not r["worker_healthy"]:
        out.append("the worker's /healthz did not answer 200")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=200.0, help="events/s; 0: flat out (a backlog)")
    parser.add_argument("--encoder", choices=["trivial", "sentence-transformers"], default="trivial")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-events", type=int, default=128, help="events per worker batch")
    parser.add_argument(
        "--fetch-timeout", type=float, default=2.0, help="the worker's image fetch timeout (s)"
    )
    parser.add_argument("--idle", type=float, default=60.0, help="stop reading after this many idle seconds")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument(
        "--check-memory",
        action="store_true",
        help=f"also fail when the peak is over {MEMORY_BUDGET_MIB:.0f} MiB above the start",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--log", type=Path, help="copy the worker's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sieve-fuzz-") as tmp:
        result = run(args, Path(tmp))
        command = "load-tests/fuzz.py " + " ".join(sys.argv[1:])
        print(table(result, command), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        problems = failures(result)
        if args.check_memory and result["memory"].get("peak_over_start_mib", 0) > MEMORY_BUDGET_MIB:
            problems.append(f"peak memory {result['memory']['peak_over_start_mib']:.0f} MiB over the start")
        if problems:
            print(Path(result["worker_log"]).read_text(errors="replace")[-4000:], file=sys.stderr)
            sys.exit("fuzz run failed: " + "; ".join(problems))


if __name__ == "__main__":
    main()
