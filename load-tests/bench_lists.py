"""Lists, measured: the term matcher's speed and false positives, and image hash matching.

1. **Speed.** A block list of 10,000 terms (the vendored profanity list,
   data/blocklists/better-profanity, plus generated words) and 500 patterns (RE2, with
   substitution classes), an allow list of 200 terms; the matcher alone, per event, over the
   demo messages and the public sets in data/ — against the default text encoder's per-event
   time on the same texts (batches of 64). Target: at most 5 % of the encoder's time.
2. **False positives.** The realistic block list alone (the 916 vendored terms): the share of
   benign texts with a hit (CLINC150, all of it; the openai-moderation prompts with no
   category), and for reference the hit share on Davidson's hateful/offensive and neither tweets.
3. **Image hashes.** Known images (generated) with their crop hashes; copies re-encoded (JPEG
   quality 50), resized (half, double), cropped (up to 5 % per side, random) must match; distinct
   generated images must not: the false-match rate.

    .venv/bin/python load-tests/bench_lists.py            # full size
    .venv/bin/python load-tests/bench_lists.py --quick    # CI smoke size
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import string
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sieve.flow.image_hashes import HashMatcher, crop_hashes, phash, phash_hex
from sieve.flow.lists import TermMatcher
from sieve.lists import HashList, TermList, parse_list
from sieve.quality.datasets import load_clinc150, load_davidson, load_openai_moderation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_rig import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
PROFANITY = DATA / "blocklists" / "better-profanity" / "profanity_wordlist.txt"
DEMO = REPO / "routes" / "samples" / "demo-messages.jsonl"
CLASSES = {"a": "[a4@]", "e": "[e3]", "i": "[i1!]", "o": "[o0]", "s": "[s$5]", "t": "[t7+]"}


def vendored_terms() -> list[str]:
    return [line.strip() for line in PROFANITY.read_text(encoding="utf-8").splitlines() if line.strip()]


def big_lists(rng: random.Random) -> list[TermList]:
    """10,000 block terms, 500 block patterns, 200 allow terms."""
    real = vendored_terms()
    terms = list(dict.fromkeys(real))
    while len(terms) < 10_000:
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9)))
                 for _ in range(rng.choice((1, 1, 1, 2)))]
        terms.append(" ".join(words))
    patterns = []
    for i in range(500):
        word = real[i % len(real)]
        body = "".join(CLASSES.get(c, c) for c in word if c.isalnum() or c == " ").replace(" ", r"\s+")
        patterns.append(rf"\b{body}(?:s|es|ed|ing)?\b" if i % 2 else rf"\b{body}\s+(?:you|them|u)\b")
    block = {"name": "big-block", "kind": "block", "route": "abuse",
             "entries": [{"id": f"t{i}", "term": t} for i, t in enumerate(terms)]
             + [{"id": f"p{i}", "pattern": p} for i, p in enumerate(patterns)]}
    allow = {"name": "big-allow", "kind": "allow",
             "entries": [{"id": f"a{i}", "term": f"{rng.choice(real)} {rng.choice(('county', 'cup'))}"}
                         for i in range(200)]}
    return [parse_list(block, "big-block"), parse_list(allow, "big-allow")]  # type: ignore[list-item]


def realistic_list() -> TermMatcher:
    entries = [{"id": f"w{i}", "term": t} for i, t in enumerate(dict.fromkeys(vendored_terms()))]
    return TermMatcher([parse_list({"name": "profanity", "kind": "block", "route": "abuse",
                                    "entries": entries}, str(PROFANITY))])  # type: ignore[list-item]


def text_sets(quick: bool) -> dict[str, list[str]]:
    demo = [json.loads(line)["text"] for line in DEMO.read_text().splitlines() if line.strip()]
    om = load_openai_moderation(DATA)
    clinc = load_clinc150(DATA)
    davidson = load_davidson(DATA)
    sets = {
        "demo messages": demo,
        "openai-moderation (all)": [e.text or "" for e in om.examples],
        "openai-moderation clean": [e.text or "" for e in om.examples if e.outcome == "clean"],
        "clinc150 (all)": [e.text or "" for e in clinc.examples],
        "davidson hate/offensive": [e.text or "" for e in davidson.examples if e.outcome == "violating"],
        "davidson neither": [e.text or "" for e in davidson.examples if e.outcome == "clean"],
    }
    if quick:
        sets = {name: texts[:300] for name, texts in sets.items()}
    return sets


def per_event_us(matcher: TermMatcher, texts: list[str], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        matcher.match_batch(texts)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(texts) * 1e6


def build_encoder(quick: bool):  # noqa: ANN201 - a TextEncoder
    from sieve.encoders.factory import build_text_encoder
    from sieve.topology import EncoderSpec

    spec = EncoderSpec(kind="trivial") if quick else EncoderSpec()
    return build_text_encoder(spec, torch_threads=2)


def encoder_us(encoder, texts: list[str], quick: bool) -> float:  # noqa: ANN001
    """The encoder's per-event time on a sample of these texts (batches of 64, median of 3)."""
    sample = random.Random(1).sample(texts, min(len(texts), 128 if quick else 512))
    encoder.encode(sample[:64])  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(sample), 64):
            encoder.encode(sample[i:i + 64])
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(sample) * 1e6


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, 300)), int(rng.integers(0, 220))
        w, h = int(rng.integers(10, 150)), int(rng.integers(10, 150))
        draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def copies(image: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=50)
    w, h = image.size
    left, top, right, bottom = rng.uniform(0, 0.05, 4)
    return {
        "jpeg q50": Image.open(io.BytesIO(buffer.getvalue())),
        "half size": image.resize((w // 2, h // 2)),
        "double size": image.resize((w * 2, h * 2)),
        "crop <=5%/side": image.crop(
            (int(w * left), int(h * top), int(w * (1 - right)), int(h * (1 - bottom)))),
    }


def bench_hashes(known_n: int, distinct_n: int) -> None:
    rng = np.random.default_rng(0)
    originals = {f"k{i}": picture(i) for i in range(known_n)}
    entries = [{"id": k, "hash": phash_hex(im), "crops": crop_hashes(im)} for k, im in originals.items()]
    data = {"name": "known", "kind": "image_hash", "route": "illegal", "entries": entries}
    hash_list = parse_list(data, "known")
    assert isinstance(hash_list, HashList)
    matcher = HashMatcher([hash_list])
    found: dict[str, int] = {}
    for name, image in originals.items():
        for kind, copy in copies(image, rng).items():
            hits = matcher.match(phash(copy))
            found[kind] = found.get(kind, 0) + int(any(h.entry == name for h in hits))
    false = sum(bool(matcher.match(phash(picture(100_000 + i)))) for i in range(distinct_n))
    print(f"\n### Image hashes: {known_n} known images (each with {len(entries[0]['crops'])} crop hashes), "
          f"max_distance {hash_list.max_distance}\n")
    print("| copy | matched |")
    print("|---|---|")
    for kind, count in found.items():
        print(f"| {kind} | {count}/{known_n} |")
    print(f"| distinct images (false matches) | {false}/{distinct_n} ({false / distinct_n:.3%}) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke size (trivial encoder)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; python {sys.version.split()[0]}")
    sets = text_sets(args.quick)
    matcher = TermMatcher(big_lists(random.Random(0)))
    encoder = build_encoder(args.quick)
    print(f"\n### Term matcher: 10,000 terms + 500 patterns (+200 allow terms), against {encoder.id} "
          "on the same texts (batches of 64)\n")
    print("| texts | events | matcher us/event (median of 3) | encoder us/event | matcher / encoder |")
    print("|---|---|---|---|---|")
    for name, texts in sets.items():
        us = per_event_us(matcher, texts)
        enc_us = encoder_us(encoder, texts, args.quick)
        print(f"| {name} | {len(texts)} | {us:.1f} | {enc_us:.0f} | {us / enc_us:.2%} |")
    realistic = realistic_list()
    print("\n### Realistic block list (916 profanity terms, data/blocklists): events with a hit\n")
    print("| texts | events | with a hit |")
    print("|---|---|---|")
    for name, texts in sets.items():
        hit = sum(bool(h) for h in realistic.match_batch(texts))
        print(f"| {name} | {len(texts)} | {hit} ({hit / max(len(texts), 1):.2%}) |")
    bench_hashes(20 if args.quick else 200, 200 if args.quick else 3000)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
