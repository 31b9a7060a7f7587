"""The GPU path, measured: text sentences/s, images/s and the router pipeline's events/s on CUDA.

1. MiniLM (all-MiniLM-L6-v2) sentences/s: Sieve's torch path on CUDA (fp16 weights, one
   tokenisation per call, length-sorted batches, the next batch padded in pinned memory on a
   helper thread) at batch 32/128/512, and ``SentenceTransformer.encode`` itself in fp32 on the
   same GPU for reference; on short chat messages (the demo's) and long prompts
   (openai-moderation). The cosine of each fp16 row to the CPU fp32 row is printed (min).
2. open_clip ViT-B-32 (random weights: no CLIP weights can be downloaded here, and weights do
   not change the speed) images/s in fp16 at batch 32/128/256: the encoder alone on
   preprocessed tensors, and the whole path from JPEG bytes (decode, preprocess, pin, copy,
   encode).
3. The router pipeline (decode, encode, match against routes/moderation.yaml, decide,
   serialise, plan) with MiniLM on the GPU: events/s per batch size, no broker.

    python load-tests/bench_gpu.py                                   # on a CUDA machine
    .venv/bin/python load-tests/bench_gpu.py --device cpu --quick    # CI smoke (CPU, tiny)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoders import StEncode, best_rate, message_sets  # noqa: E402
from bench_images import photo_jpeg  # noqa: E402

from sieve.encoders.clip import OpenClipEncoder  # noqa: E402
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder  # noqa: E402
from sieve.flow.images import decode_image  # noqa: E402
from sieve.flow.match import RouteIndex  # noqa: E402
from sieve.flow.pipeline import RouterPipeline  # noqa: E402
from sieve.kafka.records import RawRecord  # noqa: E402
from sieve.routeset import load_route_set  # noqa: E402
from sieve.settings import get_settings  # noqa: E402
from sieve.topology import LimitsSpec, Topology  # noqa: E402
from sieve.worker.compute import limit_blas_threads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def text_rows(sets: dict[str, list[str]], device: str, batches: list[int], size: int,
              repeat: int) -> list[dict]:
    reference = SentenceTransformerEncoder(device="cpu", batch_size=64)
    sieve = SentenceTransformerEncoder(device=device)
    library = StEncode(SentenceTransformerEncoder(device=device))
    library.encoder._model.float()  # the library's own default: fp32
    rows = []
    for set_name, texts in sets.items():
        many = (texts * (size // len(texts) + 1))[:size]
        cosine = float(np.sum(sieve.encode(texts) * reference.encode(texts), axis=1).min())
        for batch in batches:
            sieve.batch_size = library.batch_size = batch
            rows.append({"set": set_name, "batch": batch, "cosine_min": cosine,
                         "sieve": best_rate(sieve, many, repeat),
                         "library_fp32": best_rate(library, many, repeat)})
    return rows


def image_rows(device: str, model: str, batches: list[int], count: int, repeat: int) -> list[dict]:
    encoder = OpenClipEncoder(model, None, device=device)
    payloads = [photo_jpeg(i) for i in range(count)]
    limits = LimitsSpec()
    decoders = ThreadPoolExecutor(get_settings().images.fetch_concurrency)
    pictures = [decode_image(data, limits).image for data in payloads]
    dtype = torch.float16 if device.startswith("cuda") else torch.float32  # as OpenClipEncoder runs it
    tensors = encoder.preprocess(pictures).to(device, dtype)
    rows = []
    for batch in batches:
        encoder.batch_size = batch
        with torch.inference_mode():
            encoder._model.encode_image(tensors[:batch])  # warm-up
            sync(device)
            best_model = 0.0
            for _ in range(repeat):
                started = time.perf_counter()
                for start in range(0, count, batch):
                    encoder._model.encode_image(tensors[start:start + batch])
                sync(device)
                best_model = max(best_model, count / (time.perf_counter() - started))
        best_path = 0.0
        for _ in range(repeat):
            started = time.perf_counter()
            for start in range(0, count, batch):
                # decoded on threads, as the pipeline's image fetchers do
                chunk = payloads[start:start + batch]
                decoded = decoders.map(lambda data: decode_image(data, limits), chunk)
                encoder.encode_images([d.image for d in decoded])
            best_path = max(best_path, count / (time.perf_counter() - started))
        rows.append({"model": model, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                     "model_only": best_model, "from_jpeg": best_path})
    return rows


def pipeline_rows(texts: list[str], device: str, batches: list[int], size: int, repeat: int) -> list[dict]:
    encoder = SentenceTransformerEncoder(device=device, batch_size=512)
    route_set = load_route_set(REPO / "routes" / "moderation.yaml")
    topology = Topology.model_validate({
        "name": "gpu", "input": {"topics": ["in"]},
        "route_set": {"name": "moderation", "file": str(REPO / "routes" / "moderation.yaml")},
        "encoder": {"kind": "sentence-transformers"},
        "output": {"outcome_topics": {"clean": "c", "violating": "v", "needs_review": "r"},
                   "dead_letter_topic": "d"},
    })
    pipeline = RouterPipeline(topology, encoder, RouteIndex.build(route_set, encoder), "bench")
    now = time.time()
    many = (texts * (size // len(texts) + 1))[:size]
    records = [RawRecord("in", 0, i, f"e{i}".encode(), json.dumps({"id": f"e{i}", "text": t}).encode(), now)
               for i, t in enumerate(many)]
    rows = []
    for batch in batches:
        pipeline.process(records[:batch])  # warm-up
        alone = 0.0  # the encoder by itself, called with the same batches
        for _ in range(repeat):
            started = time.perf_counter()
            for start in range(0, size, batch):
                encoder.encode(many[start:start + batch])
            alone = max(alone, size / (time.perf_counter() - started))
        best, stages = 0.0, {}
        for _ in range(repeat):
            started = time.perf_counter()
            seconds: dict[str, float] = {}
            for start in range(0, size, batch):
                result = pipeline.process(records[start:start + batch])
                for stage, value in result.seconds.items():
                    seconds[stage] = seconds.get(stage, 0.0) + value
            rate = size / (time.perf_counter() - started)
            if rate > best:
                best, stages = rate, {k: v / size * 1e6 for k, v in seconds.items()}
        rows.append({"batch": batch, "rate": best, "encoder_alone": alone, "us_per_event": stages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="CI smoke size (use with --device cpu)")
    parser.add_argument("--repeat", type=int, default=3, help="passes per figure (the best counts)")
    parser.add_argument("--datasets-dir", type=Path, default=None, help="default: settings datasets_dir")
    parser.add_argument("--parts", default="text,images,pipeline", help="which tables (comma-separated)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    limit_blas_threads(get_settings())  # as a worker does
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu (a smoke run) or on a GPU machine")
    quick = args.quick
    sets = message_sets(16 if quick else 200, args.datasets_dir or get_settings().datasets_dir)
    repeat = 1 if quick else args.repeat
    text = images = pipeline = []
    if "text" in parts:
        text = text_rows(sets, args.device, [8] if quick else [32, 128, 512], 32 if quick else 4096, repeat)
    if "images" in parts:
        images = image_rows(args.device, "ViT-B-32", [4] if quick else [32, 128, 256], 8 if quick else 512,
                            repeat)
    if "pipeline" in parts:
        pipeline = pipeline_rows(sets["demo messages"], args.device, [16] if quick else [256, 1024, 4096],
                                 32 if quick else 16384, repeat)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "CPU"
    print(f"\nSieve GPU path — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {name}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")
    precision = "fp16, sorted, pinned, prefetch" if args.device.startswith("cuda") else "fp32 on the CPU"
    tables = [
        (text, f"| texts | batch | Sieve's torch path ({precision}) sentences/s "
               "| SentenceTransformer.encode fp32 | cosine to CPU fp32 (min) |\n|---|---:|---:|---:|---:|",
         lambda r: f"| {r['set']} | {r['batch']} | {r['sieve']:,.0f} | {r['library_fp32']:,.0f} "
                   f"| {r['cosine_min']:.4f} |"),
        (images, "| image model | dtype | batch | images/s, model only "
                 "| images/s from JPEG bytes (decode on threads) |\n|---|---|---:|---:|---:|",
         lambda r: f"| {r['model']} (random weights) | {r['dtype']} | {r['batch']} "
                   f"| {r['model_only']:,.0f} | {r['from_jpeg']:,.0f} |"),
        (pipeline, "| router pipeline, MiniLM on the device, demo messages | events/s | the encoder alone, "
                   "same batches, sentences/s | µs per event by stage |\n|---|---:|---:|---|",
         lambda r: f"| batches of {r['batch']} | {r['rate']:,.0f} | {r['encoder_alone']:,.0f} | "
                   + ", ".join(f"{k} {v:.1f}" for k, v in r["us_per_event"].items()) + " |"),
    ]
    for rows, header, line in tables:
        if rows:
            print(header)
            for row in rows:
                print(line(row))
            print()
    if args.json:
        figures = {"device": name, "text": text, "images": images, "pipeline": pipeline}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
