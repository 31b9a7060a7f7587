"""What an LLM review costs: tokens measured on real prompts, and a daily cost table.

1. The router (the topology's encoder and route set) decides real messages: the OpenAI
   moderation samples (data/openai-moderation, MIT) and the shipped demo messages. The share
   that reaches needs_review on them is printed.
2. For each needs_review decision the reviewer's request is built exactly as the worker
   builds it (``review.build_messages``, the reply JSON schema) and its tokens counted with
   a real BPE tokenizer (``o200k_base`` from the ``bpe-openai`` package, when installed;
   otherwise the worker's own cautious estimate, and the table says so).
3. One table: events per day x review share -> reviews, tokens and cost per day.

Prices are parameters (``--price-in``/``--price-out`` per 1,000 tokens): assumptions to
replace with your provider's. The reply length is not measured (no judge model runs here):
it is counted on example replies with a one- or two-sentence rationale.

    .venv/bin/python load-tests/review_cost.py                          # moderation, MiniLM
    .venv/bin/python load-tests/review_cost.py --encoder trivial --limit 60   # CI smoke size
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sieve.contracts import NEEDS_REVIEW
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
from sieve.encoders.trivial import TrivialEncoder
from sieve.flow.match import RouteIndex
from sieve.flow.pipeline import RouterPipeline
from sieve.kafka.records import RawRecord
from sieve.review.steps import ReviewCatalogue, build_messages, estimate_tokens
from sieve.topology import load_topology, load_topology_route_set

REPO = Path(__file__).resolve().parents[1]
MODERATION_SAMPLES = REPO / "data" / "openai-moderation" / "samples-1680.jsonl.gz"
DEMO_SAMPLES = REPO / "routes" / "samples" / "demo-messages.jsonl"
EXAMPLE_REPLIES = [
    {"verdict": "violating", "route": "harassment", "confidence": 0.86,
     "rationale": "The message insults a specific person and tells them to leave, which is "
                  "targeted harassment rather than criticism."},
    {"verdict": "clean", "route": None, "confidence": 0.74,
     "rationale": "It describes a violent news event without praising or threatening anyone."},
    {"verdict": "clean", "route": "support_seeking", "confidence": 0.9,
     "rationale": "The writer asks for help coping with their own feelings; no policy is broken."},
]


def token_counter() -> tuple[str, Any]:
    """A real tokenizer when bpe-openai is installed, else None (the estimate is used)."""
    try:
        import bpe_openai
    except ImportError:
        return "estimate (chars/3.0 + 4 per message; bpe-openai not installed)", None
    encoding = bpe_openai.get_encoding("o200k_base")
    return "o200k_base (bpe-openai)", encoding


def count_request(messages: list[dict], schema: dict, encoding: Any) -> tuple[int, int]:
    """(message tokens, schema tokens) of one request; 4 tokens of framing per message, 3 priming."""
    if encoding is None:
        total = estimate_tokens(messages, schema)
        schema_part = estimate_tokens([], schema)
        return total - schema_part, schema_part
    tokens = 3
    for message in messages:
        content = message["content"]
        text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
        tokens += 4 + len(encoding.encode(message["role"])) + len(encoding.encode(text))
    return tokens, len(encoding.encode(json.dumps(schema)))


def samples(limit: int | None) -> list[dict]:
    """Real messages: the OpenAI moderation samples (if present) and the demo messages."""
    events: list[dict] = []
    if MODERATION_SAMPLES.exists():
        with gzip.open(MODERATION_SAMPLES, "rt", encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                events.append({"id": f"oai-{i}", "text": json.loads(line)["prompt"]})
    for line in DEMO_SAMPLES.read_text(encoding="utf-8").splitlines():
        if line.strip():
            event = json.loads(line)
            events.append({"id": f"demo-{event['id']}", "text": event["text"]})
    if limit is not None:
        step = max(1, len(events) // limit)
        events = events[::step][:limit]
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", type=Path, default=REPO / "topologies" / "moderation.yaml")
    parser.add_argument("--encoder", choices=["sentence-transformers", "trivial"],
                        default="sentence-transformers")
    parser.add_argument("--limit", type=int, default=None, help="Use about this many samples.")
    parser.add_argument("--events-per-day", type=int, default=1_000_000)
    parser.add_argument("--shares", default="0.05,0.10,0.20", help="Review shares to tabulate.")
    parser.add_argument("--price-in", type=float, default=0.00015,
                        help="Price per 1,000 input tokens (an assumption; default: a small hosted model).")
    parser.add_argument("--price-out", type=float, default=0.0006,
                        help="Price per 1,000 output tokens (an assumption).")
    args = parser.parse_args()

    topology = load_topology(args.topology)
    route_set = load_topology_route_set(topology)
    encoder = TrivialEncoder() if args.encoder == "trivial" else SentenceTransformerEncoder(device="cpu")
    pipeline = RouterPipeline(topology, encoder, RouteIndex.build(route_set, encoder), "review-cost")
    events = samples(args.limit)
    records = [RawRecord("samples", 0, i, None, json.dumps(e).encode(), None) for i, e in enumerate(events)]
    decisions = []
    for start in range(0, len(records), 64):
        decisions += pipeline.process(records[start:start + 64]).decisions
    tail = [d for d in decisions if d.outcome == NEEDS_REVIEW]
    if not tail:
        print("no sample reached needs_review; nothing to measure", file=sys.stderr)
        return 1

    spec = topology.review
    max_examples = spec.max_examples if spec else 8
    max_output = spec.max_output_tokens if spec else 300
    catalogue = ReviewCatalogue.from_route_set(route_set)
    schema = catalogue.reply_schema()
    tokenizer, encoding = token_counter()
    counted, estimated = [], []
    schema_tokens = 0
    for decision in tail:
        messages = build_messages(decision, catalogue, nonce="0" * 16, max_examples=max_examples)
        message_tokens, schema_tokens = count_request(messages, schema, encoding)
        counted.append(message_tokens + schema_tokens)
        estimated.append(estimate_tokens(messages, schema))
    system_tokens, _ = count_request([{"role": "system", "content": catalogue.system_message()}], {},
                                     encoding)
    reply_tokens = statistics.mean(
        count_request([{"role": "assistant", "content": json.dumps(r)}], {}, encoding)[0]
        for r in EXAMPLE_REPLIES
    )
    tokens_in = statistics.mean(counted)
    p95_in = sorted(counted)[int(0.95 * (len(counted) - 1))]
    ratio = min(e / c for e, c in zip(estimated, counted, strict=True))

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"Sieve review cost — {now}; topology {topology.name}, route set {route_set.name}, "
          f"encoder {encoder.id}, tokenizer {tokenizer}")
    print(f"samples decided: {len(decisions)}; reached needs_review: {len(tail)} "
          f"({100 * len(tail) / len(decisions):.1f}%)")
    print(f"input tokens per review: mean {tokens_in:.0f}, p95 {p95_in} (system message {system_tokens}, "
          f"identical for every review: prefix-cacheable; reply schema {schema_tokens}); "
          f"worker's estimate / counted >= {ratio:.2f}")
    print(f"output tokens per review: ~{reply_tokens:.0f} (counted on example replies, not measured "
          f"from a model; capped at max_output_tokens {max_output})")
    print(f"prices (assumptions): {args.price_in:g} per 1k input, {args.price_out:g} per 1k output\n")
    print("| events/day | review share | reviews/day | input tokens/day | output tokens/day "
          "| cost/day | cost/30 days |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for share in (float(s) for s in args.shares.split(",")):
        reviews = args.events_per_day * share
        t_in, t_out = reviews * tokens_in, reviews * reply_tokens
        cost = t_in / 1000 * args.price_in + t_out / 1000 * args.price_out
        print(f"| {args.events_per_day:,} | {share:.0%} | {reviews:,.0f} | {t_in / 1e6:,.1f}M "
              f"| {t_out / 1e6:,.2f}M | {cost:,.2f} | {30 * cost:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
