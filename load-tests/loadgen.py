"""Load generator: Sieve events at a target rate, or flat out, to a Kafka topic.

Texts are real public data from the repository's data/ folder: OpenAI moderation prompts (long,
median ~380 characters) and CLINC150 queries (short), interleaved. With
``--image-share`` a share of the events are image events (a small generated PNG, inline
``image_b64``); a topology without an image encoder sends those to its dead-letter topic.

Every event carries ``metadata.load_sent_ms``, the wall-clock time it was handed to the
producer: ``measure.py`` takes end-to-end latency from it to the decision's Kafka timestamp.

    .venv/bin/python load-tests/loadgen.py --events 5000 --rate 200 --topic sieve.events.text
    .venv/bin/python load-tests/loadgen.py --events 20000 --topic sieve.events.text   # flat out
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import io
import json
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer

from sieve.kafka.client import client_kwargs
from sieve.settings import KafkaSettings, get_settings

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "data"
SAMPLES = REPO / "routes" / "samples" / "demo-messages.jsonl"


@dataclass(frozen=True)
class Text:
    """One text to send and where it came from."""

    text: str
    source: str


def dataset_texts(datasets: Path = DATASETS, seed: int = 7) -> list[Text]:
    """OpenAI moderation prompts and CLINC150 queries, interleaved (each list shuffled, seeded)."""
    rng = random.Random(seed)
    moderation: list[Text] = []
    clinc: list[Text] = []
    path = datasets / "openai-moderation" / "samples-1680.jsonl.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            moderation = [
                Text(json.loads(line)["prompt"], "openai-moderation") for line in lines if line.strip()
            ]
    path = datasets / "clinc150" / "data_full.json"
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        clinc = [Text(text, "clinc150") for split in ("test", "oos_test") for text, _ in data[split]]
    rng.shuffle(moderation)
    rng.shuffle(clinc)
    texts = [t for pair in zip(moderation, clinc, strict=False) for t in pair]
    longer = moderation if len(moderation) > len(clinc) else clinc
    texts += longer[min(len(moderation), len(clinc)) :]
    if not texts:  # no data sets in the folder given: the shipped demo messages
        texts = [
            Text(json.loads(line)["text"], "demo")
            for line in SAMPLES.read_text().splitlines()
            if line.strip()
        ]
    return [t for t in texts if t.text.strip()]


def tiny_png(rng: random.Random, size: int = 32) -> bytes:
    """A small generated image (two coloured rectangles), PNG bytes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        draw.rectangle(
            (x0, y0, x0 + size // 3, y0 + size // 3), fill=tuple(rng.randrange(256) for _ in range(3))
        )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_events(
    count: int, run: str, *, image_share: float = 0.0, seed: int = 7, texts: list[Text] | None = None
) -> list[dict]:
    """``count`` events with ids ``<run>-<i>``: dataset texts, cycled, and some image events."""
    rng = random.Random(seed)
    pool = texts if texts is not None else dataset_texts(seed=seed)
    events = []
    for i in range(count):
        event: dict = {"id": f"{run}-{i}", "tenant": f"tenant-{i % 7}", "metadata": {"load_run": run}}
        if image_share and rng.random() < image_share:
            event |= {"modality": "image", "image_b64": base64.b64encode(tiny_png(rng)).decode()}
            event["metadata"]["source"] = "generated-png"
        else:
            text = pool[i % len(pool)]
            event |= {"text": text.text}
            event["metadata"]["source"] = text.source
        events.append(event)
    return events


def _stamped(event: dict) -> tuple[bytes, bytes]:
    now = time.time()
    stamped = {
        **event,
        "metadata": {**event["metadata"], "load_sent_ms": int(now * 1000)},
        "created_at": datetime.fromtimestamp(now, UTC).isoformat(),
    }
    return event["id"].encode(), json.dumps(stamped).encode()


def due(elapsed_s: float, rate: float, total: int) -> int:
    """How many events should have been sent ``elapsed_s`` after the start, at ``rate`` events/s."""
    if rate <= 0:
        return total
    return min(total, int(elapsed_s * rate) + 1)


@dataclass(frozen=True)
class ProduceReport:
    """What the generator sent."""

    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        """Events per second actually sent."""
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


async def produce_events(
    kafka: KafkaSettings, topic: str, events: list[dict], rate: float = 0.0
) -> ProduceReport:
    """Send the events (keyed by id, acks=all) at ``rate`` events/s or flat out; waits for every ack."""
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    started = time.monotonic()
    try:
        pending = []
        sent = 0
        while sent < len(events):
            now_due = due(time.monotonic() - started, rate, len(events))
            for event in events[sent:now_due]:
                key, value = _stamped(event)
                pending.append(await producer.send(topic, value=value, key=key))
            sent = now_due
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
            await asyncio.sleep(0.005 if rate > 0 else 0)
        await asyncio.gather(*pending)
        return ProduceReport(len(events), time.monotonic() - started)
    finally:
        await producer.stop()


def main() -> None:
    """Send events from the command line (Kafka settings from SIEVE_KAFKA__*)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--topic", default="sieve.events.text")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: flat out")
    parser.add_argument("--image-share", type=float, default=0.0, help="share of image events (0..1)")
    parser.add_argument("--run", default=f"load{int(time.time())}", help="event id prefix")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    events = make_events(args.events, args.run, image_share=args.image_share, seed=args.seed)
    report = asyncio.run(produce_events(get_settings().kafka, args.topic, events, args.rate))
    print(
        f"sent {report.sent} events to {args.topic} in {report.seconds:.2f} s ({report.rate:.0f} events/s); "
        f"ids {args.run}-0..{args.events - 1}"
    )


if __name__ == "__main__":
    main()
