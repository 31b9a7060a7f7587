"""Text encoder backends: torch (our forward, length buckets, prefetch), ONNX Runtime and OpenVINO.

Real all-MiniLM-L6-v2 weights throughout. The int8 model is exported once per
module (by two threads at once, into a fresh cache folder: the cache's own test).
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sieve.encoders.base import TextEncoder, resolve_device
from sieve.encoders.batching import PaddingStats, pad_token_ids, padding_stats, plan_batches, prefetched
from sieve.encoders.clip import OpenClipEncoder
from sieve.encoders.factory import build_text_encoder, text_encoder_id
from sieve.encoders.onnx_cache import META_FILE, cache_key, publish_folder
from sieve.encoders.onnx_encoder import OnnxEncoder
from sieve.encoders.onnx_export import write_weight_int8
from sieve.encoders.onnx_runtime import (
    DISABLED_OPTIMIZERS,
    OPENVINO_GROUP_SIZE,
    onnxruntime_session,
    openvino_config,
)
from sieve.encoders.onnx_variants import VARIANTS
from sieve.encoders.sentence_transformers import SentenceTransformerEncoder
from sieve.encoders.st_model import read_layout
from sieve.encoders.trivial import TrivialEncoder
from sieve.quality.datasets import load_openai_moderation
from sieve.store.qdrant import space_name
from sieve.topology import EncoderSpec, Topology

from .conftest import DATASETS, REPO
from .progress_helpers import RecordingProgress

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA — the one allowed skip")


@pytest.fixture(scope="module")
def sample() -> list[str]:
    """200 texts of varied length: 100 demo messages (short), 100 moderation prompts (up to 256+ tokens)."""
    lines = (REPO / "routes" / "samples" / "demo-messages.jsonl").read_text(encoding="utf-8").splitlines()
    demo = [json.loads(line)["text"] for line in lines if line.strip()][:100]
    moderation = [ex.text for ex in load_openai_moderation(DATASETS).examples if ex.text]
    return demo + moderation[::16][:100]


@pytest.fixture(scope="module")
def torch_encoder() -> SentenceTransformerEncoder:
    """The torch backend on the CPU in fp32, batch 32 (also on a CUDA machine: the reference)."""
    return SentenceTransformerEncoder(device="cpu", batch_size=32)


@pytest.fixture(scope="module")
def export_progress() -> RecordingProgress:
    """What the two constructions of ``int8_pair`` reported (one of them exports)."""
    return RecordingProgress()


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory: pytest.TempPathFactory,
              export_progress: RecordingProgress) -> tuple[OnnxEncoder, OnnxEncoder]:
    """Two int8 encoders constructed at once by two threads over one empty cache folder."""
    cache = tmp_path_factory.mktemp("onnx-cache")
    built: list[OnnxEncoder] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def construct() -> None:
        start.wait()
        try:
            built.append(OnnxEncoder(batch_size=32, cache_dir=cache, progress=export_progress))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=construct) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    assert len(built) == 2
    return built[0], built[1]


@pytest.fixture(scope="module")
def int8(int8_pair) -> OnnxEncoder:
    return int8_pair[0]


@pytest.fixture(scope="module")
def fp32_reference(torch_encoder, sample) -> np.ndarray:
    return torch_encoder.encode(sample)


# --------------------------------------------------------------------------- batching plans


def test_plan_batches_sorts_by_length_and_covers_every_index_once():
    lengths = [5, 40, 7, 40, 3, 12, 12, 9]
    plan = plan_batches(lengths, 3, call_cost=10**6)  # calls dear: the fewest groups, least padding
    assert [len(group) for group in plan] == [2, 3, 3]
    order = np.concatenate(plan)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order.tolist()[:2] == [1, 3]  # ties keep the caller's order
    unsorted = plan_batches(lengths, 3, by_length=False)
    assert np.concatenate(unsorted).tolist() == list(range(len(lengths)))
    assert plan_batches([], 4) == []
    with pytest.raises(ValueError):
        plan_batches(lengths, 0)


def plan_cost(lengths: list[int], plan: list[np.ndarray], call_cost: int) -> int:
    return padding_stats(lengths, plan).padded + call_cost * len(plan)


def cheapest_cost(lengths: list[int], batch_size: int, call_cost: int) -> int:
    """Exhaustively: every way to cut the longest-first order into groups of at most batch_size."""
    ordered = sorted(lengths, reverse=True)
    best = None
    for cuts in itertools.product((False, True), repeat=max(0, len(ordered) - 1)):
        groups, start = [], 0
        for position, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(ordered[start:position])
                start = position
        groups.append(ordered[start:])
        if ordered and all(len(group) <= batch_size for group in groups):
            cost = sum(len(group) * group[0] + call_cost for group in groups)
            best = cost if best is None else min(best, cost)
    return best or 0


@settings(deadline=None, max_examples=200)
@given(st.lists(st.integers(1, 256), max_size=80), st.integers(1, 32), st.sampled_from([0, 8, 48, 500]))
def test_plan_batches_cuts_the_sorted_texts_at_the_cheapest_places(lengths, batch_size, call_cost):
    plan = plan_batches(lengths, batch_size, call_cost=call_cost)
    order = np.concatenate(plan).tolist() if plan else []
    assert sorted(order) == list(range(len(lengths)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert all(1 <= len(group) <= batch_size for group in plan)
    cost = plan_cost(lengths, plan, call_cost)
    if len(lengths) <= 10:
        assert cost == cheapest_cost(lengths, batch_size, call_cost)
    fixed = [np.asarray(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    assert cost <= plan_cost(lengths, fixed, call_cost)  # never worse than plain groups of batch_size


def test_plan_batches_splits_a_long_tail_in_a_small_batch():
    lengths = [256, 12, 10, 14, 9, 11, 13, 8]  # one long post among short chats
    plan = plan_batches(lengths, 16)
    assert [sorted(lengths[i] for i in group) for group in plan] == [[256], [8, 9, 10, 11, 12, 13, 14]]
    padded = padding_stats(lengths, plan).padded
    one_group = padding_stats(lengths, plan_batches(lengths, 16, by_length=False)).padded
    assert padded == 256 + 7 * 14 < one_group / 5


def test_padding_stats_count_real_and_padded_tokens():
    lengths = [2, 10, 3, 9]
    assert padding_stats(lengths, plan_batches(lengths, 2, by_length=False)) == PaddingStats(24, 38)
    assert padding_stats(lengths, plan_batches(lengths, 2)) == PaddingStats(24, 26)
    assert PaddingStats(24, 40).waste == pytest.approx(0.4)
    assert PaddingStats().waste == 0.0


def test_pad_token_ids_right_and_left():
    right = pad_token_ids([[101, 7, 102], [101, 102]], pad_id=0)
    np.testing.assert_array_equal(right["input_ids"], [[101, 7, 102], [101, 102, 0]])
    np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(right["token_type_ids"], np.zeros((2, 3)))
    assert right["input_ids"].dtype == np.int64
    left = pad_token_ids([[5, 6, 7], [8]], pad_id=9, left=True, token_types=False)
    np.testing.assert_array_equal(left["input_ids"], [[5, 6, 7], [9, 9, 8]])
    np.testing.assert_array_equal(left["attention_mask"], [[1, 1, 1], [0, 0, 1]])
    assert "token_type_ids" not in left


def test_prefetched_prepares_each_group_once_in_order_on_a_helper_thread():
    plan = plan_batches(list(range(10)), 3)
    threads: list[str] = []

    def prepare(group: np.ndarray) -> list[int]:
        threads.append(threading.current_thread().name)
        return group.tolist()

    pairs = list(prefetched(plan, prepare))
    assert [ready for _, ready in pairs] == [group.tolist() for group in plan]
    assert all(name.startswith("sieve-encode-prefetch") for name in threads)
    # One group (the latency case): prepared in the caller's thread.
    threads.clear()
    assert [ready for _, ready in prefetched(plan[:1], prepare)] == [plan[0].tolist()]
    assert threads == [threading.current_thread().name]


# --------------------------------------------------------------------------- torch backend


def test_device_auto_resolves_to_what_is_present(torch_encoder):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    auto = torch_encoder if expected == "cpu" else SentenceTransformerEncoder(device="auto", batch_size=32)
    assert auto.device == expected
    weights = next(auto._model.parameters())
    assert weights.device.type == expected
    assert weights.dtype == (torch.float16 if expected == "cuda" else torch.float32)
    # The CPU path copies from ordinary (pageable) memory.
    host = torch_encoder.host_batch([[101, 7592, 102], [101, 102]])
    assert torch_encoder.device == "cpu" and not any(tensor.is_pinned() for tensor in host.values())


def test_torch_path_matches_sentence_transformers_encode(torch_encoder, sample, fp32_reference):
    assert isinstance(torch_encoder, TextEncoder)
    assert torch_encoder.id == "st:all-MiniLM-L6-v2"
    reference = torch_encoder._model.encode(sample[::4], batch_size=32, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False)
    np.testing.assert_allclose(fp32_reference[::4], reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fp32_reference, axis=1), 1.0, atol=1e-5)


def test_torch_tokens_are_the_models_and_truncated(torch_encoder, int8, sample):
    ids = torch_encoder.token_ids(sample)
    assert max(len(row) for row in ids) == torch_encoder.max_seq_length == 256
    # Both backends tokenise alike (the fast tokenizer straight from tokenizer.json).
    assert int8.token_ids(sample) == ids
    assert int8.max_seq_length == 256


def test_torch_order_restored_with_shuffled_lengths(torch_encoder, sample, fp32_reference):
    permutation = np.random.default_rng(7).permutation(len(sample))[:60]
    shuffled = torch_encoder.encode([sample[i] for i in permutation])
    np.testing.assert_allclose(shuffled, fp32_reference[permutation], atol=1e-5)


def test_torch_bucketing_cuts_padding_and_keeps_vectors(torch_encoder, sample, fp32_reference):
    texts = sample[::5]  # 40 texts, demo and moderation, in batches of 8
    torch_encoder.batch_size = 8
    try:
        bucketed = torch_encoder.encode(texts)
        sorted_padding = torch_encoder.last_padding
        torch_encoder.bucket_by_length = False
        unsorted = torch_encoder.encode(texts)
        unsorted_padding = torch_encoder.last_padding
    finally:
        torch_encoder.bucket_by_length = True
        torch_encoder.batch_size = 32
    assert sorted_padding.real == unsorted_padding.real == sum(map(len, torch_encoder.token_ids(texts)))
    assert sorted_padding.padded < 0.75 * unsorted_padding.padded
    np.testing.assert_allclose(bucketed, unsorted, atol=1e-5)
    np.testing.assert_allclose(bucketed, fp32_reference[::5], atol=1e-5)


# --------------------------------------------------------------------------- ONNX int8 backend


def test_int8_cache_built_once_by_two_concurrent_constructions(int8_pair):
    first, second = int8_pair
    assert sorted([first.built, second.built]) == [False, True]
    assert first.folder == second.folder
    files = sorted(p.name for p in first.folder.iterdir())
    assert files == sorted({*(variant.file for variant in VARIANTS.values()), META_FILE})
    # No temporary folder left behind next to it.
    assert [p.name for p in first.folder.parent.iterdir() if p.is_dir()] == [first.folder.name]
    meta = json.loads((first.folder / META_FILE).read_text())
    assert meta["probe_min_cosine"]["onnx-int8"] >= 0.98 and meta["dim"] == 384
    assert meta["probe_min_cosine"]["onnx"] >= 0.9999
    assert sorted(meta["probe_min_cosine"]) == sorted(VARIANTS), "every variant was probed"
    assert len(meta["fp32_matmuls"]) == 12, "both feed-forward matmuls of the 6 layers stay fp32"
    texts = ["where is my refund", "a cat is sleeping on the sofa"]
    np.testing.assert_array_equal(first.encode(texts), second.encode(texts))


def test_the_export_reports_each_step_once(int8_pair, export_progress):
    assert export_progress.seen() == [
        ("exporting all-MiniLM-L6-v2 to ONNX", 1, 1),
        ("quantising all-MiniLM-L6-v2 to int8", 2, 2),
        ("checking all-MiniLM-L6-v2's exports against torch", len(VARIANTS), len(VARIANTS)),
    ]


def test_int8_cache_reused_by_the_next_construction(int8):
    model = int8.folder / VARIANTS["onnx-int8"].file
    written = model.stat().st_mtime_ns
    progress = RecordingProgress()
    again = OnnxEncoder(cache_dir=int8.folder.parent, progress=progress)
    assert again.built is False and again.folder == int8.folder
    assert progress.seen() == [], "nothing to report: the export was cached"
    assert model.stat().st_mtime_ns == written
    assert again.build_s < 5


def test_int8_identity(int8, torch_encoder):
    assert isinstance(int8, TextEncoder)
    assert int8.id == "st:all-MiniLM-L6-v2+onnx-int8"
    assert int8.dim == 384 and int8.device == "cpu"
    assert space_name(int8.id) != space_name(torch_encoder.id)
    empty = int8.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_int8_close_to_fp32_on_every_row(int8, sample, fp32_reference):
    vectors = int8.encode(sample)
    assert vectors.shape == (len(sample), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * fp32_reference, axis=1)
    assert cosines.min() >= 0.99, f"worst row {int(cosines.argmin())}: {cosines.min():.4f}"


def test_int8_captures_meaning(int8):
    cat, kitten, stocks = int8.encode(["a cat is sleeping on the sofa", "a kitten naps on the couch",
                                       "the stock market fell sharply today"])
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2


def test_int8_batch_row_close_to_single(int8, sample):
    # Activation scales are per batch: a row moves within the quantisation error, no more.
    texts = sample[:20] + sample[100:110]
    batch = int8.encode(texts)
    singles = np.stack([int8.encode([text])[0] for text in texts])
    cosines = np.sum(batch * singles, axis=1)
    assert cosines.min() >= 0.99, f"row {int(cosines.argmin())}: {cosines.min():.4f}"


def test_int8_order_restored_with_shuffled_lengths(int8, sample):
    texts = sample[::2]
    base = int8.encode(texts)
    permutation = np.random.default_rng(3).permutation(len(texts))
    shuffled = int8.encode([texts[i] for i in permutation])
    cosines = np.sum(shuffled * base[permutation], axis=1)
    assert cosines.min() >= 0.99
    # Each row is nearest to its own text's vector: nothing moved to another row.
    np.testing.assert_array_equal(np.argmax(shuffled @ base[permutation].T, axis=1), np.arange(len(texts)))


def test_int8_bucketing_cuts_padding(int8, sample):
    texts = sample[60:140]  # short demo messages, then long moderation prompts
    bucketed = int8.encode(texts)
    sorted_padding = int8.last_padding
    int8.bucket_by_length = False
    try:
        unsorted = int8.encode(texts)
        unsorted_padding = int8.last_padding
    finally:
        int8.bucket_by_length = True
    assert sorted_padding.real == unsorted_padding.real
    assert sorted_padding.padded < 0.75 * unsorted_padding.padded
    assert np.sum(unsorted * bucketed, axis=1).min() >= 0.99


def test_max_seq_length_truncates_int8(int8):
    short = OnnxEncoder(max_seq_length=16, cache_dir=int8.folder.parent)
    assert short.built is False  # one export serves every max_seq_length
    head = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    a, b = short.encode([head + " apples and pears", head + " volcanoes erupting"])
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- ONNX fp32 backend


@pytest.fixture(scope="module")
def onnx_fp32(int8) -> OnnxEncoder:
    """fp32 ONNX Runtime from the same cache folder as the int8 model (one export holds both)."""
    return OnnxEncoder(variant="onnx", batch_size=32, threads=1, cache_dir=int8.folder.parent)


def test_fp32_onnx_is_torchs_vector_space(onnx_fp32, torch_encoder):
    assert isinstance(onnx_fp32, TextEncoder)
    assert onnx_fp32.built is False, "the fp32 model comes from the export the int8 fixture built"
    assert onnx_fp32.id == torch_encoder.id == "st:all-MiniLM-L6-v2"
    assert onnx_fp32.dim == 384 and onnx_fp32.max_seq_length == torch_encoder.max_seq_length


def test_fp32_onnx_equals_sentence_transformers_on_every_row(onnx_fp32, sample, fp32_reference):
    vectors = onnx_fp32.encode(sample)
    assert vectors.shape == fp32_reference.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * fp32_reference, axis=1)
    assert cosines.min() >= 0.9999, f"worst row {cosines.argmin()}: {cosines.min():.6f}"


def test_fp32_onnx_batch_row_equals_single(onnx_fp32, sample):
    texts = sample[::10]
    batch = onnx_fp32.encode(texts)
    singles = np.stack([onnx_fp32.encode([text])[0] for text in texts])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_exported_graphs_carry_no_nan_guard_and_sessions_skip_the_slow_fusion(int8, tmp_path):
    """Eager attention exports without SDPA's IsNaN + Where over every attention cell, and
    the graph ONNX Runtime runs keeps plain LayerNormalization (its fused SkipLayerNorm
    kernel is the slower one on the CPU)."""
    import onnx

    assert "SkipLayerNormFusion" in DISABLED_OPTIMIZERS
    for file_name in sorted({variant.file for variant in VARIANTS.values()}):
        ops = [node.op_type for node in onnx.load(str(int8.folder / file_name)).graph.node]
        assert "IsNaN" not in ops, f"{file_name}: a NaN guard is back in the export"
        assert ops.count("Softmax") == 6, "one softmax per MiniLM layer"
        ran = tmp_path / f"{file_name}.optimized.onnx"
        onnxruntime_session(int8.folder / file_name, 1, optimized_to=ran)
        run_ops = [node.op_type for node in onnx.load(str(ran)).graph.node]
        assert "SkipLayerNormalization" not in run_ops
        assert run_ops.count("LayerNormalization") == 13, "embeddings + two per layer"


def test_auto_backend_is_openvino_on_the_cpu_and_torch_on_cuda(int8, torch_encoder, monkeypatch):
    spec = EncoderSpec(batch_size=8)
    on_cpu = build_text_encoder(spec, device="cpu", torch_threads=1, onnx_cache_dir=int8.folder.parent)
    assert isinstance(on_cpu, OnnxEncoder) and on_cpu.variant == "openvino" and on_cpu.id == torch_encoder.id
    assert on_cpu.batch_size == 8 and on_cpu.threads == 1
    explicit = build_text_encoder(EncoderSpec(backend="onnx"), device="auto", torch_threads=1,
                                  onnx_cache_dir=int8.folder.parent)
    assert isinstance(explicit, OnnxEncoder) and explicit.variant == "onnx"
    # Where CUDA is visible, auto means torch (fp16): check the choice without a GPU.
    built: list[str] = []
    monkeypatch.setattr("sieve.encoders.factory.SentenceTransformerEncoder",
                        lambda *a, **k: built.append(k["device"]) or torch_encoder)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert build_text_encoder(spec, device="auto", onnx_cache_dir=int8.folder.parent) is torch_encoder
    assert built == ["auto"]
    with pytest.raises(ValueError, match="one of onnx, onnx-int8, openvino, openvino-int8"):
        OnnxEncoder(variant="fp32", cache_dir=int8.folder.parent)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- OpenVINO backends


@pytest.fixture(scope="module")
def openvino(int8) -> OnnxEncoder:
    """The fp32 export on OpenVINO (bf16 where this CPU has it), from the int8 fixture's export."""
    return OnnxEncoder(variant="openvino", batch_size=32, threads=1, cache_dir=int8.folder.parent)


@pytest.fixture(scope="module")
def openvino_int8(int8) -> OnnxEncoder:
    return OnnxEncoder(variant="openvino-int8", batch_size=32, threads=1, cache_dir=int8.folder.parent)


def test_openvino_keeps_torchs_vector_space(openvino, torch_encoder, sample, fp32_reference):
    """bf16 (or f32) on OpenVINO stays within cosine 0.9999 of torch on every row: one space."""
    assert openvino.built is False and openvino.id == torch_encoder.id
    vectors = openvino.encode(sample)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(vectors * fp32_reference, axis=1)
    assert cosines.min() >= 0.9999, f"worst row {cosines.argmin()}: {cosines.min():.6f}"
    texts = sample[::10]
    singles = np.stack([openvino.encode([text])[0] for text in texts])
    assert np.sum(openvino.encode(texts) * singles, axis=1).min() >= 0.9999  # bf16 kernels vary by shape


def test_openvino_int8_is_its_own_space_close_to_fp32_and_batch_independent(
        openvino_int8, sample, fp32_reference):
    assert openvino_int8.id == "st:all-MiniLM-L6-v2+openvino-int8"
    vectors = openvino_int8.encode(sample)
    cosines = np.sum(vectors * fp32_reference, axis=1)
    assert cosines.min() >= 0.99, f"worst row {cosines.argmin()}: {cosines.min():.6f}"
    assert cosines.mean() < 0.99999, "int8 arithmetic leaves a trace: the int8 model is what ran"
    # Activations are quantised per token (groups of channels), not per batch as onnx-int8's
    # are: a row hardly depends on its neighbours (kernels still vary by shape).
    texts = sample[::10]
    singles = np.stack([openvino_int8.encode([text])[0] for text in texts])
    assert np.sum(openvino_int8.encode(texts) * singles, axis=1).min() >= 0.999


def test_openvino_settings_follow_the_cpu(openvino, openvino_int8):
    assert openvino_config("fp32", 2, ["FP32", "INT8"])["INFERENCE_PRECISION_HINT"] == "f32"
    assert openvino_config("fp32", 2, ["BF16", "FP32"])["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "DYNAMIC_QUANTIZATION_GROUP_SIZE" not in openvino_config("fp32", 2, ["BF16"])
    int8_config = openvino_config("int8", 3, ["BF16"])
    assert int8_config["INFERENCE_PRECISION_HINT"] == "f32" and int8_config["INFERENCE_NUM_THREADS"] == 3
    assert int8_config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == OPENVINO_GROUP_SIZE
    assert int8_config["ENABLE_CPU_PINNING"] is False, "workers share cores: the OS places the threads"
    assert openvino._runner.session.config["INFERENCE_NUM_THREADS"] == openvino.threads == 1
    assert openvino_int8._runner.session.config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == OPENVINO_GROUP_SIZE


def test_weight_int8_copy_quantises_every_weight_matmul_per_channel(int8, tmp_path):
    import onnx
    from onnx import numpy_helper

    source = onnx.load(str(int8.folder / VARIANTS["onnx"].file))
    weights = {init.name: numpy_helper.to_array(init) for init in source.graph.initializer}
    matmul_weights = [node.input[1] for node in source.graph.node
                      if node.op_type == "MatMul" and node.input[1] in weights]
    assert len(matmul_weights) == 36, "q, k, v, output, up, down in each of 6 layers"
    target = tmp_path / "wq8.onnx"
    assert write_weight_int8(int8.folder / VARIANTS["onnx"].file, target) == 36
    copy = onnx.load(str(target))
    stored = {init.name: numpy_helper.to_array(init) for init in copy.graph.initializer}
    assert not set(matmul_weights) & set(stored), "no fp32 copy of a quantised weight is kept"
    dequantise = {node.output[0]: node for node in copy.graph.node if node.op_type == "DequantizeLinear"}
    assert len(dequantise) == 36
    for name in matmul_weights:
        node = dequantise[f"{name}_dequantised"]
        quantised, scale = stored[node.input[0]], stored[node.input[1]]
        assert quantised.dtype == np.int8 and scale.shape == (weights[name].shape[1],)
        error = np.abs(quantised.astype(np.float32) * scale - weights[name])
        assert (error <= scale / 2 + 1e-7).all(), name


# --------------------------------------------------------------------------- topology and cache


def test_encoder_id_from_the_spec_is_the_loaded_encoders(int8, onnx_fp32, torch_encoder, openvino,
                                                        openvino_int8):
    """A worker with a compute child finds its route index by these ids before any model loads."""
    loaded = {"torch": torch_encoder, "onnx": onnx_fp32, "onnx-int8": int8, "auto": openvino,
              "openvino": openvino, "openvino-int8": openvino_int8}
    for backend, encoder in loaded.items():
        assert text_encoder_id(EncoderSpec(backend=backend)) == encoder.id, backend
    assert text_encoder_id(EncoderSpec(kind="trivial")) == TrivialEncoder().id
    named = EncoderSpec(model="/models/paraphrase-MiniLM-L3-v2/", backend="onnx-int8")
    assert text_encoder_id(named) == "st:paraphrase-MiniLM-L3-v2+onnx-int8"


def test_topology_backend_picks_the_encoder(int8, torch_encoder):
    assert EncoderSpec().backend == "auto"
    topology = Topology.model_validate({
        "name": "t", "input": {"topics": ["in"]}, "route_set": {"name": "s"},
        "encoder": {"backend": "onnx-int8", "batch_size": 16},
        "output": {"outcome_topic_template": "o.{outcome}"},
    })
    encoder = build_text_encoder(topology.encoder, device="auto", torch_threads=1,
                                 onnx_cache_dir=int8.folder.parent)
    assert isinstance(encoder, OnnxEncoder)
    assert encoder.id == int8.id != torch_encoder.id
    assert encoder.built is False and encoder.batch_size == 16 and encoder.threads == 1
    with pytest.raises(ValidationError):
        EncoderSpec.model_validate({"backend": "tensorrt"})
    with pytest.raises(ValueError, match="run on the CPU"):
        OnnxEncoder(device="cuda", cache_dir=int8.folder.parent)


def test_cache_key_follows_the_model_files(tmp_path):
    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"\x00" * 64)
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    key = cache_key(model)
    assert key == cache_key(model)
    (model / "weights.bin").write_bytes(b"\x00" * 63 + b"\x01")
    assert cache_key(model) != key


def test_layout_refuses_what_the_backend_cannot_run(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""},
               {"type": "sentence_transformers.models.Pooling", "path": "pool"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    layout = read_layout(tmp_path, "m")
    assert layout.pooling == "mean" and layout.max_seq_length == 512
    assert read_layout(tmp_path, "m", 1000).max_seq_length == 512
    dense = {"type": "sentence_transformers.models.Dense", "path": "2_Dense"}
    (tmp_path / "modules.json").write_text(json.dumps([*modules, dense]))
    with pytest.raises(ValueError, match="'Dense' is not supported"):
        read_layout(tmp_path, "m")


def test_publish_folder_loses_the_race_gracefully(tmp_path):
    final = tmp_path / "model-abc"
    final.mkdir()
    (final / META_FILE).write_text("{}")
    (final / VARIANTS["onnx-int8"].file).write_bytes(b"first")
    late = tmp_path / ".tmp-model-abc-x"
    late.mkdir()
    (late / META_FILE).write_text("{}")
    (late / VARIANTS["onnx-int8"].file).write_bytes(b"second")
    assert publish_folder(late, final) is False
    assert not late.exists() and (final / VARIANTS["onnx-int8"].file).read_bytes() == b"first"
    fresh = tmp_path / ".tmp-other"
    fresh.mkdir()
    (fresh / META_FILE).write_text("{}")
    assert publish_folder(fresh, tmp_path / "other") is True
    assert (tmp_path / "other" / META_FILE).is_file()


# --------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_fp16_pinned_matches_cpu(torch_encoder, sample, fp32_reference):
    gpu = SentenceTransformerEncoder(device="cuda", batch_size=32)
    assert next(gpu._model.parameters()).dtype == torch.float16
    host = gpu.host_batch([[101, 7592, 102], [101, 102]])
    assert all(tensor.is_pinned() for tensor in host.values())
    vectors = gpu.encode(sample)
    assert np.sum(vectors * fp32_reference, axis=1).min() >= 0.999


@needs_cuda
def test_cuda_open_clip_images_match_cpu(tiny_clip_dir: Path):
    from PIL import Image

    images = [Image.new("RGB", (64, 48), (i * 40 % 255, 90, 200 - i * 10)) for i in range(12)]
    cpu = OpenClipEncoder(f"local-dir:{tiny_clip_dir}", None, device="cpu", batch_size=5)
    gpu = OpenClipEncoder(f"local-dir:{tiny_clip_dir}", None, device="cuda", batch_size=5)
    cosines = np.sum(cpu.encode_images(images) * gpu.encode_images(images), axis=1)
    assert cosines.min() >= 0.99
