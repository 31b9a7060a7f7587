"""Images/s of decode + preprocess + encode, by batch size; prints one table.

    .venv/bin/python load-tests/bench_images.py            # tiny model and ViT-B-32 (random weights)
    .venv/bin/python load-tests/bench_images.py --quick    # tiny model only (the CI smoke run)

Inputs are generated 640x480 JPEGs (a photo's size; content does not change the
cost). ViT-B-32 runs with random weights: no CLIP weights can be downloaded
here, and weights do not change the speed. On a CUDA machine the encoder runs
in fp16 (``--device cuda``).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import tempfile
import time
from datetime import UTC, datetime

from PIL import Image, ImageDraw

from sieve.encoders.clip import OpenClipEncoder, save_tiny_clip
from sieve.flow.images import decode_image
from sieve.topology import LimitsSpec


def photo_jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(600), rng.randrange(440)
        draw.ellipse([x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)],
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def measure(encoder: OpenClipEncoder, payloads: list[bytes], batch: int) -> tuple[float, float]:
    """(images/s end to end, share of the time spent encoding)."""
    limits = LimitsSpec()
    encoder.batch_size = batch
    encode_seconds = 0.0
    started = time.perf_counter()
    for start in range(0, len(payloads), batch):
        pictures = [decode_image(data, limits).image for data in payloads[start:start + batch]]
        t = time.perf_counter()
        encoder.encode_images(pictures)
        encode_seconds += time.perf_counter() - t
    total = time.perf_counter() - started
    return len(payloads) / total, encode_seconds / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model only, few images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    tiny_dir = save_tiny_clip(tempfile.mkdtemp(prefix="sieve-tiny-clip-"))
    models = [("tiny (64-d, 32 px)", f"local-dir:{tiny_dir}", 64 if args.quick else 512)]
    if not args.quick:
        models.append(("ViT-B-32 (random weights)", "ViT-B-32", 96))
    print(f"\nSieve image benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPU cores, device {args.device}; generated 640x480 JPEGs\n")
    print("| model | batch | images/s (decode + preprocess + encode) "
          "| share in encode_images (preprocess + model) |")
    print("|---|---:|---:|---:|")
    for label, model, count in models:
        encoder = OpenClipEncoder(model, None, device=args.device, torch_threads=args.threads)
        payloads = [photo_jpeg(i) for i in range(count)]
        measure(encoder, payloads[:8], 8)  # warm-up
        for batch in (1, 8, 32):
            rate, share = measure(encoder, payloads, batch)
            print(f"| {label} | {batch} | {rate:.1f} | {share:.0%} |")


if __name__ == "__main__":
    main()
