"""load-tests/roofline.py: the FLOP count bench_peer's ceilings rest on, checked against torch's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sieve.encoders.st_model import bundled_minilm_path, read_layout

from .conftest import REPO

sys.path.insert(0, str(REPO / "load-tests"))

from roofline import (  # noqa: E402
    ModelShape,
    backend_precision,
    compute_bound,
    matmul_peak,
    matmul_peaks,
    token_lengths,
)


@pytest.fixture(scope="module")
def minilm() -> tuple[object, ModelShape]:
    from transformers import BertModel

    path = bundled_minilm_path()
    # no pooler: sentence-transformers mean-pools the last hidden states and never runs it
    model = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager").eval()
    return model, ModelShape.from_config(path)


def test_shape_is_read_from_the_models_config(minilm) -> None:
    _, shape = minilm
    assert shape == ModelShape(hidden=384, intermediate=1536, layers=6)
    assert shape.linear_flops_per_token == 2 * 6 * (4 * 384 * 384 + 2 * 384 * 1536)


@pytest.mark.parametrize("length", [2, 17, 128, 256])
def test_flops_match_torchs_flop_counter_on_the_real_model(minilm, length: int) -> None:
    model, shape = minilm
    ids = torch.randint(1000, 2000, (1, length))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert shape.flops([length])[0] == counter.get_total_flops()


def test_flops_add_up_text_by_text(minilm) -> None:
    _, shape = minilm
    lengths = [3, 40, 256]
    assert shape.flops(lengths).tolist() == [shape.flops([n])[0] for n in lengths]
    # attention grows with the square of the length, the linear layers with the length
    assert shape.attention_flops([256])[0] == 4 * shape.attention_flops([128])[0]


def test_token_lengths_truncate_as_the_encoder_does() -> None:
    path = Path(bundled_minilm_path())
    layout = read_layout(path, path.name)
    assert layout.max_seq_length == 256
    assert token_lengths(["hi", "word " * 600], layout) == [3, 256]  # [CLS] hi [SEP]


def test_compute_bound_divides_each_peak_by_the_flops_per_message(minilm) -> None:
    _, shape = minilm
    lengths = [10, 30]
    bound = compute_bound(lengths, shape, {"fp32": 100.0, "int8": 400.0})
    per_message = float(np.mean(shape.flops(lengths)))
    assert bound["gflop_per_message"] == pytest.approx(per_message / 1e9)
    assert bound["ceiling_rate"]["fp32"] == pytest.approx(100e9 / per_message)
    assert bound["ceiling_rate"]["int8"] == pytest.approx(4 * bound["ceiling_rate"]["fp32"])
    assert 0 < bound["attention_share"] < 0.1


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_matmul_peak_measures_a_rate_and_restores_the_thread_count(precision: str) -> None:
    before = torch.get_num_threads()
    rate = matmul_peak(precision, threads=1, shape=(64, 64, 64), repeats=1, seconds=0.01)
    assert rate > 0.01  # GFLOP/s: even a slow core does a 64^3 product faster than this
    assert torch.get_num_threads() == before


def test_matmul_peaks_cover_every_precision() -> None:
    peaks = matmul_peaks(threads=1, shapes=((32, 64, 64), (64, 32, 64)), repeats=1, seconds=0.01)
    assert set(peaks) == {"fp32", "bf16", "int8"} and all(rate > 0.01 for rate in peaks.values())


def test_each_backend_is_bounded_by_its_linear_layers_precision() -> None:
    assert backend_precision("torch", bf16=True) == backend_precision("onnx", bf16=True) == "fp32"
    assert backend_precision("openvino", bf16=True) == "bf16"
    assert backend_precision("openvino", bf16=False) == "fp32"
    assert backend_precision("onnx-int8", bf16=True) == "int8"
    assert backend_precision("openvino-int8", bf16=False) == "int8"
