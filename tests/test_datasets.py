"""The Davidson et al. tweets: rows, classes, the outcome mapping, and a test-only split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sieve.cli import app
from sieve.quality.datasets import ADAPTERS, DatasetError, LabelledData, load_data, load_davidson
from sieve.quality.splits import split_data
from tests.conftest import DATASETS, REPO

HEADER = ",count,hate_speech,offensive_language,neither,class,tweet\n"


@pytest.fixture(scope="module")
def davidson() -> LabelledData:
    return load_davidson(DATASETS)


def test_every_tweet_is_loaded_with_its_class(davidson: LabelledData) -> None:
    assert len(davidson) == 24_783
    assert davidson.label_counts() == Counter({"hate": 1_430, "offensive": 19_190})
    assert Counter(ex.outcome for ex in davidson.examples) == Counter(
        {"violating": 1_430 + 19_190, "clean": 4_163}
    )
    assert len({ex.id for ex in davidson.examples}) == 24_783
    assert davidson.label_names == ("hate", "offensive")
    assert (davidson.default_outcome, davidson.positive_outcome) == ("clean", "violating")
    assert (davidson.licence, davidson.name) == ("MIT", "davidson")
    assert "t-davidson/hate-speech-and-offensive-language" in davidson.source


def test_the_mapping_row_by_row(davidson: LabelledData) -> None:
    by_id = {ex.id: ex for ex in davidson.examples}
    # The first three rows of the file: class 2 (neither), then two of class 1 (offensive).
    first = by_id["davidson-00000"]
    assert (first.outcome, first.labels) == ("clean", frozenset())
    assert first.text is not None and first.text.startswith("!!! RT @mayasolovely: As a woman")
    assert "&amp;" in first.text, "tweets are kept raw: HTML entities are not decoded"
    assert (by_id["davidson-00001"].outcome, by_id["davidson-00001"].labels) == (
        "violating", frozenset({"offensive"})
    )
    hateful = [ex for ex in davidson.examples if "hate" in ex.labels]
    assert hateful and all(ex.outcome == "violating" and ex.labels == {"hate"} for ex in hateful)
    assert all(ex.text and ex.text.strip() for ex in davidson.examples)


def test_every_row_is_test_and_resplit_gives_seeded_splits(davidson: LabelledData) -> None:
    own = split_data(davidson)
    assert own.record.method == "source"
    assert own.record.sizes == {"train": 0, "calibration": 0, "test": 24_783}
    resplit = split_data(davidson, seed=1, source_splits=False)
    assert resplit.record.method == "seeded-stratified"
    assert sum(resplit.record.sizes.values()) == 24_783 and min(resplit.record.sizes.values()) > 6_000
    assert resplit.test.label_counts()["hate"] == pytest.approx(1_430 / 4, abs=2)


def test_load_data_knows_the_name() -> None:
    assert "davidson" in ADAPTERS
    assert len(load_data("davidson", DATASETS)) == 24_783


def test_a_bad_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read"):
        load_davidson(tmp_path)
    (tmp_path / "davidson").mkdir()
    csv = tmp_path / "davidson" / "labeled_data.csv"
    csv.write_text(HEADER + '0,3,0,0,3,2,"fine, thanks"\n1,3,0,0,3,7,what class\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"labeled_data.csv:3: class must be 0, 1 or 2, got '7'"):
        load_davidson(tmp_path)
    csv.write_text("id,text\n1,hello\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="expected the columns"):
        load_davidson(tmp_path)
    csv.write_text(HEADER + '5,3,0,0,3,2,"fine, thanks"\n', encoding="utf-8")
    (only,) = load_davidson(tmp_path).examples
    assert (only.id, only.text, only.outcome) == ("davidson-00005", "fine, thanks", "clean")


def test_fit_refuses_a_test_only_set(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["fit", "davidson", "--routes", str(REPO / "routes" / "moderation.yaml"), "--encoder", "trivial",
         "--sample", "20", "--out", str(tmp_path), "-q"],
        terminal_width=200,
    )
    assert result.exit_code != 0
    assert "no calibration or no test examples" in result.output and "--resplit" in result.output
