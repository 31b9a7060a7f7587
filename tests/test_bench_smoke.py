"""The benchmarks run in CI at small sizes, so they cannot go stale (figures not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def run_bench(script: str, *args: str, json_out: Path | None = None) -> tuple[str, Any]:
    """Run ``load-tests/<script> args`` (with ``--json json_out``); its stdout and the JSON figures."""
    extra = ["--json", str(json_out)] if json_out is not None else []
    result = subprocess.run([sys.executable, str(REPO / "load-tests" / script), *args, *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout, json.loads(json_out.read_text()) if json_out is not None else None


def test_bench_spine_runs_and_prints_its_table(tmp_path) -> None:
    stdout, figures = run_bench("bench_spine.py", "--events", "300", "--quick",
                                json_out=tmp_path / "bench.json")
    assert "| worker end to end, MiniLM |" in stdout
    assert "| worker end to end, trivial encoder (ceiling) |" in stdout
    assert figures["end_to_end"]["decided"] == 300
    assert figures["best"]["rate"] > 0 and figures["end_to_end"]["memory_mib"] > 0


def test_bench_images_runs_and_prints_its_table() -> None:
    stdout, _ = run_bench("bench_images.py", "--quick")
    rows = [line for line in stdout.splitlines() if line.startswith("| tiny")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "8", "32"]
    assert all(float(row.split("|")[3]) > 0 for row in rows)


def test_bench_gpu_runs_on_the_cpu_and_prints_its_tables(tmp_path) -> None:
    # The CUDA figures come from a GPU machine; here the same code runs on the CPU, tiny.
    stdout, figures = run_bench("bench_gpu.py", "--device", "cpu", "--quick", json_out=tmp_path / "gpu.json")
    assert "| demo messages | 8 |" in stdout and "| ViT-B-32 (random weights) | float32 | 4 |" in stdout
    assert {row["set"] for row in figures["text"]} == {"demo messages", "openai-moderation"}
    assert all(row["sieve"] > 0 and row["cosine_min"] >= 0.999 for row in figures["text"])
    assert figures["images"][0]["model_only"] > 0 and figures["images"][0]["from_jpeg"] > 0
    [row] = figures["pipeline"]
    assert row["batch"] == 16 and row["rate"] > 0
    assert {"decode", "encode", "match", "decide"} <= set(row["us_per_event"])


def test_bench_latency_runs_and_prints_its_table(tmp_path) -> None:
    stdout, figures = run_bench("bench_latency.py", "--encoder", "trivial", "--quick", "--duration", "3",
                                json_out=tmp_path / "latency.json")
    assert "| end to end (input record → decision record) p50 / p90 / p99 / max |" in stdout
    assert "| target: p99 ≤ max_wait + 2 × encode |" in stdout
    assert figures["decided"] == figures["paced_events"] > 0
    assert figures["max_rate"] > 0 and figures["paced_rate"] > 0
    assert {"p50", "p90", "p99", "max"} <= set(figures["latency_ms"])
    assert figures["compute"] in ("thread", "process")
    for key in ("encode_s_mean", "batch_size_mean", "target_ms", "passed", "max_wait_s"):
        assert key in figures


def test_bench_peer_runs_its_sieve_side_and_prints_its_table(tmp_path) -> None:
    stdout, figures = run_bench("bench_peer.py", "--skip-peer", "--events", "120", "--max-events", "32",
                                "--backends", "onnx", json_out=tmp_path / "peer.json")
    assert "| system | backend | threads | messages | events/s | ratio vs peer | target |" in stdout
    assert "| Sieve, one worker" in stdout
    assert figures["peer"] is None and figures["messages"] == 120
    [row] = figures["sieve"]
    assert row["backend"] == "onnx" and row["decided"] == 120 and row["rate"] > 0
    assert {"mean", "p50", "p95"} <= set(figures["words"])
    # the compute bound: the messages' matmul work and this machine's measured peaks
    assert "| precision | matmul peak (GFLOP/s) | messages/s at that peak |" in stdout
    bound = figures["compute_bound"]
    assert row["precision"] == "fp32" and f"onnx {row['rate'] * bound['gflop_per_message']:.0f} (" in stdout
    assert set(bound["peaks_gflops"]) == {"fp32", "bf16", "int8"}
    assert all(rate > 0 for rate in bound["ceiling_rate"].values())
    assert 3 <= bound["tokens_mean"] <= bound["max_seq_length"]


def test_bench_encoders_runs_and_prints_its_tables(tmp_path) -> None:
    stdout, figures = run_bench("bench_encoders.py", "--quick", "--onnx-cache", str(tmp_path / "onnx"),
                                json_out=tmp_path / "encoders.json")
    assert "| demo messages | torch fp32 | 1 | 16 |" in stdout
    assert "| openai-moderation | onnx-int8 | 1 | 16 |" in stdout
    assert "ONNX models exported this run" in stdout
    backends = ("SentenceTransformer.encode (reference)", "torch fp32", "onnx", "onnx-int8", "openvino",
                "openvino-int8")
    assert {(r["set"], r["backend"]) for r in figures["rates"]} == {
        (s, b) for s in ("demo messages", "openai-moderation") for b in backends}
    assert all(r["bucketed"] > 0 for r in figures["rates"])
    assert all(r["caller_order"] > 0 for r in figures["rates"] if r["backend"] != backends[0])
    for q in figures["quality"]:
        cosines = q["cosine_to_torch_fp32"]
        assert q["padding_bucketed"] <= q["padding_caller_order"]
        assert cosines["onnx-int8"]["min"] >= 0.99 and cosines["openvino-int8"]["min"] >= 0.99
        assert cosines["onnx"]["min"] >= 0.9999 and cosines["openvino"]["min"] >= 0.9999


def test_bench_stream_runs_and_prints_its_table(tmp_path) -> None:
    stdout, figures = run_bench("bench_stream.py", "--events", "1500", "--quick", "--max-events", "256",
                                json_out=tmp_path / "stream.json")
    assert "| loop | events out | events/s | vs. aiokafka loop |" in stdout
    assert [row["events"] for row in figures["rows"]] == [1500, 1500, 1500]  # reference, thread, process
    assert [row["loop"].rsplit("compute=", 1)[-1] for row in figures["rows"][1:]] == ["thread", "process"]
    assert all(row["rate"] > 0 for row in figures["rows"])
    assert len(figures["reference_runs"]) == 2
    assert figures["default_compute"] in ("thread", "process")  # what compute=auto resolved to here


def test_bench_lists_runs_and_prints_its_tables() -> None:
    stdout, _ = run_bench("bench_lists.py", "--quick")
    assert "| clinc150 (all) | 300 |" in stdout and "| davidson hate/offensive | 300 |" in stdout
    assert "| jpeg q50 |" in stdout and "| distinct images (false matches) |" in stdout


def test_bench_waves_runs_and_prints_its_table() -> None:
    stdout, _ = run_bench("bench_waves.py", "--events", "1500", "--runs", "1", "--quick")
    assert "| 70% | on |" in stdout and "| 30% | off |" in stdout
    assert "LLM calls" in stdout  # the script exits non-zero when calls exceed distinct texts


def test_bench_tenants_runs_and_prints_its_table() -> None:
    stdout, _ = run_bench("bench_tenants.py", "--events", "300", "--runs", "1", "--quick")
    assert "| one set |" in stdout and "| 3 tenants, 3 sets |" in stdout
    assert "median ratio (3 tenants / one set):" in stdout


def test_peak_rss_counts_the_workers_child_processes() -> None:
    # compute=process: a worker's memory is its own plus its compute child's
    sys.path.insert(0, str(REPO / "load-tests"))
    from bench_spine import _descendants, peak_rss_mib

    holder = subprocess.Popen([sys.executable, "-c", "import time; held = b'x' * (300 * 2**20); "
                               "print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert holder.pid in _descendants(os.getpid())
        with open(f"/proc/{os.getpid()}/status") as status:
            mine = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
        assert peak_rss_mib(os.getpid()) >= mine + 290  # the child's 300 MiB counted
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
