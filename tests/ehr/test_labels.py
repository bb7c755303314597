"""Next-value regression labels (``python -m healthfm.ehr.labels``) on hand-made timelines."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from ehr.ehr_helpers import events, write_shard
from healthfm.ehr.labels import main, next_value_labels
from healthfm.ehr.reader import read_labels
from healthfm.errors import ConfigError, DataError

T = datetime(2024, 3, 1, 23, 59)
SBP = "LOINC/8480-6"


def _meds(tmp_path):
    day = timedelta(days=1)
    rows = [
        (1, datetime(1950, 1, 1), "MEDS_BIRTH"),
        (1, T - day, SBP, 150.0),  # before: input, not target
        (1, T, SBP, 140.0),  # at the prediction time: known then (MEDS), not target
        (1, T + day, SBP, None),  # no value: skipped
        (1, T + 2 * day, "LOINC/other", 1.0),
        (1, T + 3 * day, SBP, 130.0),  # the target of T
        (1, T + 10 * day, SBP, 124.0),  # the target of T + 5 days: the mean of two
        (1, T + 10 * day, SBP, 116.0),
        (2, datetime(1960, 1, 1), "MEDS_BIRTH"),
        (2, T + 400 * day, SBP, 110.0),  # beyond a 365-day horizon
    ]
    return write_shard(tmp_path / "meds", events(rows))


def _times(*rows):
    return pl.DataFrame(
        {"subject_id": [r[0] for r in rows], "prediction_time": [r[1] for r in rows]},
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    )


def test_next_value_is_strictly_after_and_inside_the_horizon(tmp_path):
    meds = _meds(tmp_path)
    times = _times((1, T), (1, T + timedelta(days=5)), (1, T + timedelta(days=20)), (2, T))
    out = next_value_labels(meds, times, SBP, horizon_days=365)
    assert out.rows() == [(1, T, 130.0), (1, T + timedelta(days=5), 120.0)]
    longer = next_value_labels(meds, times, SBP, horizon_days=500)
    assert (2, T, 110.0) in longer.rows()


def test_cli_writes_a_meds_label_file_the_reader_accepts(tmp_path, capsys):
    meds = _meds(tmp_path)
    _times((1, T), (2, T)).write_parquet(tmp_path / "times.parquet")
    argv = [str(meds), "--code", SBP, "--times", str(tmp_path / "times.parquet")]
    assert main([*argv, "--out", str(tmp_path / "sbp.parquet")]) == 0
    assert "1 of 2 prediction times" in capsys.readouterr().out
    labels = read_labels(tmp_path / "sbp.parquet")
    assert labels.column == "float_value" and labels.frame["label"].to_list() == [130.0]


def test_bad_input(tmp_path):
    meds = _meds(tmp_path)
    with pytest.raises(DataError, match="no event of code 'LOINC/none'"):
        next_value_labels(meds, _times((1, T)), "LOINC/none")
    with pytest.raises(DataError, match="missing column 'prediction_time'") as e:
        next_value_labels(meds, pl.DataFrame({"subject_id": [1]}), SBP, times_source="t.parquet")
    assert str(e.value.file) == "t.parquet"
    with pytest.raises(DataError, match="null subject_id") as e:
        next_value_labels(meds, _times((1, T), (None, T)), SBP)
    assert e.value.row == 1
    for bad in (0, float("inf"), float("nan"), 1e12):
        with pytest.raises(ConfigError, match="horizon"):
            next_value_labels(meds, _times((1, T)), SBP, horizon_days=bad)
    _times((2, T)).write_parquet(tmp_path / "t2.parquet")
    with pytest.raises(DataError, match="nothing written"):
        main([str(meds), "--code", SBP, "--times", str(tmp_path / "t2.parquet"),
              "--out", str(tmp_path / "none.parquet")])  # fmt: skip
    assert not (tmp_path / "none.parquet").exists()
    with pytest.raises(DataError, match="no data"):
        next_value_labels(tmp_path / "empty", _times((1, T)), SBP)
