"""Text encoder backends side by side, in one run on this machine; prints Markdown tables.

1. sentences/s of the torch fp32 path (Sieve's own forward), the ONNX Runtime
   fp32 and int8 paths and the OpenVINO (bf16 where the CPU has it) and int8 paths,
   at 1 and 2 threads and batch sizes 16/32/64, each with length
   bucketing (texts sorted by token length before batching) and in the caller's
   order; and of ``SentenceTransformer.encode`` itself (the path before, which
   sorts by character length) for reference;
2. per message set: token lengths, the share of padded token positions with and
   without bucketing, and the cosine of each exported backend's rows to torch fp32's
   (min / mean);
The CPU backends only: the CUDA path (fp16 text, images, the pipeline) is bench_gpu.py's.

Message sets: the shipped demo messages (routes/samples/demo-messages.jsonl, short
chat messages) and openai-moderation prompts (a seeded sample; long, varied).

    .venv/bin/python load-tests/bench_encoders.py                 # full size
    .venv/bin/python load-tests/bench_encoders.py --threads 2 --batches 16   # the shipped setting only
    .venv/bin/python load-tests/bench_encoders.py --quick         # CI smoke size
    .venv/bin/python load-tests/bench_encoders.py --json out.json

Each rate is the best of ``--repeat`` passes over the whole set (one encode call
per pass, after a warm-up call). The ONNX models are exported into ``--onnx-cache``
on first use (the export time is printed when it happens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_rig import cpu_model  # noqa: E402

from sieve.cli.demo import SAMPLES  # noqa: E402
from sieve.encoders.onnx_encoder import OnnxEncoder  # noqa: E402
from sieve.encoders.onnx_variants import VARIANTS  # noqa: E402
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder  # noqa: E402
from sieve.quality.datasets import load_openai_moderation  # noqa: E402
from sieve.settings import get_settings  # noqa: E402


def message_sets(count: int, datasets_dir: Path) -> dict[str, list[str]]:
    lines = SAMPLES.read_text(encoding="utf-8").splitlines()
    demo = [json.loads(line)["text"] for line in lines if line.strip()]
    moderation = [ex.text for ex in load_openai_moderation(datasets_dir).examples if ex.text]
    return {
        "demo messages": demo[:count],
        "openai-moderation": random.Random(0).sample(moderation, min(count, len(moderation))),
    }


class StEncode:
    """``SentenceTransformer.encode`` itself (it sorts a call's texts by character length): the reference."""

    def __init__(self, encoder: SentenceTransformerEncoder) -> None:
        self.encoder = encoder
        self.batch_size = encoder.batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        with self.encoder._lock:
            if self.encoder.torch_threads is not None:
                torch.set_num_threads(self.encoder.torch_threads)
            return self.encoder._model.encode(texts, batch_size=self.batch_size, show_progress_bar=False)


def best_rate(encoder: Any, texts: list[str], repeat: int) -> float:
    encoder.encode(texts[:8])  # warm-up
    best = 0.0
    for _ in range(repeat):
        started = time.perf_counter()
        encoder.encode(texts)
        best = max(best, len(texts) / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="48 texts per set, 1 thread, batch 16, one pass")
    parser.add_argument("--texts", type=int, default=200, help="texts per message set")
    parser.add_argument("--repeat", type=int, default=2, help="passes per measurement (the best counts)")
    parser.add_argument("--onnx-cache", type=Path, default=None,
                        help="the ONNX model cache (default: settings onnx_cache_dir)")
    parser.add_argument("--threads", help="thread counts, comma-separated (default: 1,2)")
    parser.add_argument("--batches", help="batch sizes, comma-separated (default: 16,32,64)")
    parser.add_argument("--datasets-dir", type=Path, default=None, help="default: settings datasets_dir")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    settings = get_settings()
    count, repeat = (48, 1) if args.quick else (args.texts, args.repeat)
    threads, batches = ([1], [16]) if args.quick else ([1, 2], [16, 32, 64])
    if args.threads:
        threads = [int(n) for n in args.threads.split(",")]
    if args.batches:
        batches = [int(n) for n in args.batches.split(",")]
    sets = message_sets(count, args.datasets_dir or settings.datasets_dir)
    cache = args.onnx_cache or settings.onnx_cache_dir

    fp32 = SentenceTransformerEncoder(device="cpu")
    onnx_by_threads: dict[tuple[str, int], OnnxEncoder] = {}
    export_note = ""
    for n in threads:
        for backend in VARIANTS:
            made = OnnxEncoder(variant=backend, threads=n, cache_dir=cache)
            onnx_by_threads[backend, n] = made
            if made.built:
                meta = made.meta
                export_note = (f"ONNX models exported this run in {made.build_s:.1f} s (export "
                               f"{meta['export_s']} s, quantise {meta['quantise_s']} s) into {cache}")

    rows = []
    for set_name, texts in sets.items():
        for n in threads:
            fp32.torch_threads = n
            for batch in batches:
                reference = StEncode(fp32)
                reference.batch_size = batch
                rows.append({"set": set_name, "backend": "SentenceTransformer.encode (reference)",
                             "threads": n, "batch": batch, "bucketed": best_rate(reference, texts, repeat),
                             "caller_order": None})
            for backend, encoder in [("torch fp32", fp32),
                                     *((name, onnx_by_threads[name, n]) for name in VARIANTS)]:
                for batch in batches:
                    encoder.batch_size = batch
                    rates = {}
                    for bucketed in (True, False):
                        encoder.bucket_by_length = bucketed
                        rates[bucketed] = best_rate(encoder, texts, repeat)
                    encoder.bucket_by_length = True
                    rows.append({"set": set_name, "backend": backend, "threads": n, "batch": batch,
                                 "bucketed": rates[True], "caller_order": rates[False]})

    quality = []
    exported = {name: onnx_by_threads[name, threads[-1]] for name in VARIANTS}
    for set_name, texts in sets.items():
        fp32.batch_size = 32
        reference = fp32.encode(texts)
        sorted_waste = fp32.last_padding.waste
        fp32.bucket_by_length = False
        fp32.encode(texts)
        order_waste = fp32.last_padding.waste
        fp32.bucket_by_length = True
        cosines = {}
        for name, encoder in exported.items():
            encoder.batch_size = 32
            row_cosines = np.sum(encoder.encode(texts) * reference, axis=1)
            cosines[name] = {"min": float(row_cosines.min()), "mean": float(row_cosines.mean())}
        lengths = [len(ids) for ids in fp32.token_ids(texts)]
        quality.append({"set": set_name, "texts": len(texts), "tokens_mean": float(np.mean(lengths)),
                        "tokens_max": int(max(lengths)), "padding_bucketed": sorted_waste,
                        "padding_caller_order": order_waste, "cosine_to_torch_fp32": cosines})

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"\nSieve text encoder benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPU cores, {cpu_model()}, {gpu}; torch {torch.__version__}, "
          f"onnxruntime {metadata.version('onnxruntime')}, openvino {metadata.version('openvino')}; "
          f"all-MiniLM-L6-v2, best of {repeat} pass(es)\n")
    if export_note:
        print(export_note + "\n")
    print("| messages | backend | threads | batch | sentences/s, length-bucketed "
          "| sentences/s, caller's order |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        order = "—" if row["caller_order"] is None else f"{row['caller_order']:.0f}"
        print(f"| {row['set']} | {row['backend']} | {row['threads']} | {row['batch']} "
              f"| {row['bucketed']:.0f} | {order} |")
    print("\n| messages | texts | tokens mean / max "
          "| padded positions, bucketed / caller's order (batch 32) | "
          + " | ".join(f"{name} cosine to torch fp32, min / mean" for name in exported) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(exported))
    for q in quality:
        cells = " | ".join(f"{c['min']:.5f} / {c['mean']:.5f}" for c in q["cosine_to_torch_fp32"].values())
        print(f"| {q['set']} | {q['texts']} | {q['tokens_mean']:.0f} / {q['tokens_max']} "
              f"| {q['padding_bucketed']:.0%} / {q['padding_caller_order']:.0%} | {cells} |")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"node": platform.node(), "cores": os.cpu_count(), "cpu": cpu_model(), "gpu": gpu,
                        "torch": torch.__version__, "onnxruntime": metadata.version("onnxruntime"),
                        "openvino": metadata.version("openvino")},
            "export": export_note or None, "rates": rows, "quality": quality,
        }, indent=2))


if __name__ == "__main__":
    main()
