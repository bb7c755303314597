"""MEDS reading: schema conformance and one test per kind of bad input."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehr.ehr_helpers import events, write_shard
from healthfm.ehr.reader import LABEL_SCHEMA, normalize_shard, open_meds, read_labels, scan_meds
from healthfm.errors import DataError
from healthfm.modality import get_modality

D = datetime


def _good(rows=None) -> pl.DataFrame:
    return events(
        rows
        or [
            (1, None, "SEX//F"),
            (1, D(1970, 1, 1), "MEDS_BIRTH"),
            (1, D(2010, 1, 1), "LAB", 1.5),
            (2, D(1980, 1, 1), "MEDS_BIRTH"),
            (2, D(2011, 1, 1), "DX"),
        ]
    )


def test_meds_testing_helpers_fixture_conforms(tmp_path):
    """The MEDS community's static sample data set (meds-testing-helpers) reads as is."""
    from meds_testing_helpers.dataset import MEDSDataset
    from meds_testing_helpers.static_sample_data import exported_yamls

    MEDSDataset.from_yaml(exported_yamls["SIMPLE_STATIC_SHARDED_BY_SPLIT_WITH_TASKS"]).write(
        tmp_path
    )
    ehr = get_modality("ehr")
    samples = ehr.read(tmp_path, {})
    assert len(samples) == 6
    splits = ehr.split(samples, "salt", (0.7, 0.1, 0.2))
    meds = pl.read_parquet(tmp_path / "metadata" / "subject_splits.parquet")
    expected = dict(zip(meds["subject_id"], meds["split"], strict=True))
    mapping = {"train": "train", "tuning": "val", "held_out": "test"}
    assert [mapping[expected[int(k)]] for k in samples.keys] == list(splits)
    labels = read_labels(
        tmp_path / "task_labels" / "boolean_value_task", samples.payload["subjects"]
    )
    assert labels.column == "boolean_value" and len(labels) == 21
    # static rows (null time) and birth are summarised per subject
    subj = samples.payload["subjects"]
    assert subj["birth_us"].null_count() == 0


def test_synthetic_population_matches_meds_schemas(syn_meds):
    import meds

    for f in sorted((syn_meds / "data").glob("*.parquet")):
        schema = pl.read_parquet_schema(f)
        assert schema["subject_id"] == pl.Int64 and schema["time"] == pl.Datetime("us")
    labels = pl.read_parquet(syn_meds / "task_labels" / "admission_1y" / "labels.parquet")
    assert set(labels.columns) <= set(LABEL_SCHEMA.names)
    meds.SubjectSplitSchema.validate(
        pq.read_table(syn_meds / "metadata" / "subject_splits.parquet")
    )
    meds.CodeMetadataSchema.validate(pq.read_table(syn_meds / "metadata" / "codes.parquet"))
    meds.LabelSchema.validate(
        pq.read_table(syn_meds / "task_labels" / "admission_1y" / "labels.parquet")
    )
    for f in sorted((syn_meds / "data").glob("*.parquet")):
        meds.DataSchema.validate(pq.read_table(f))
    meta = json.loads((syn_meds / "metadata" / "dataset.json").read_text())
    assert meta["meds_version"].startswith("0.4")


def test_static_rows_text_and_extra_columns(tmp_path):
    df = _good().with_columns(
        pl.lit("x").alias("extra_col"), pl.lit(None, pl.String).alias("text_value")
    )
    root = write_shard(tmp_path / "m", df)
    s = get_modality("ehr").read(root, {})
    assert sorted(s.keys.tolist()) == [1, 2]


def test_missing_required_column(tmp_path):
    root = write_shard(tmp_path / "m", _good().drop("code"))
    with pytest.raises(DataError, match="required MEDS column") as e:
        scan_meds(open_meds(root))
    assert e.value.column == "code" and e.value.file.endswith("0.parquet")


def test_mistyped_column(tmp_path):
    root = write_shard(tmp_path / "m", _good().with_columns(pl.col("subject_id").cast(pl.String)))
    with pytest.raises(DataError, match="int64") as e:
        scan_meds(open_meds(root))
    assert e.value.column == "subject_id"


def test_integer_width_and_time_unit_are_fixed_up(tmp_path):
    df = _good().with_columns(
        pl.col("subject_id").cast(pl.Int32), pl.col("time").dt.cast_time_unit("ns")
    )
    out = normalize_shard(df.to_arrow(), tmp_path / "x.parquet")
    assert out.schema["subject_id"] == pl.Int64 and out.schema["time"] == pl.Datetime("us")
    assert out["time"].to_list() == _good()["time"].to_list()


def test_timezone_aware_times_are_rejected(tmp_path):
    df = _good().with_columns(pl.col("time").dt.replace_time_zone("UTC"))
    with pytest.raises(DataError, match="timezone-aware") as e:
        normalize_shard(df.to_arrow(), tmp_path / "x.parquet")
    assert e.value.column == "time"


def test_null_subject_id(tmp_path):
    df = _good().with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(None)
        .otherwise(pl.col("subject_id"))
        .alias("subject_id")
    )
    with pytest.raises(DataError, match="null") as e:
        normalize_shard(df.to_arrow(), tmp_path / "x.parquet")
    assert e.value.column == "subject_id" and e.value.row == 2


def test_unsorted_rows_within_a_subject(tmp_path):
    df = _good([(1, D(1970, 1, 1), "MEDS_BIRTH"), (1, D(2012, 1, 1), "A"), (1, D(2011, 1, 1), "B")])
    with pytest.raises(DataError, match="not sorted by time") as e:
        normalize_shard(df.to_arrow(), tmp_path / "x.parquet")
    assert e.value.row == 2 and "2011" in str(e.value)


def test_static_row_after_timed_row_is_unsorted(tmp_path):
    df = _good([(1, D(1970, 1, 1), "MEDS_BIRTH"), (1, None, "SEX//F")])
    with pytest.raises(DataError, match="not sorted"):
        normalize_shard(df.to_arrow(), tmp_path / "x.parquet")


def test_non_contiguous_subject(tmp_path):
    df = _good([(1, D(2000, 1, 1), "A"), (2, D(2000, 1, 1), "A"), (1, D(2001, 1, 1), "B")])
    with pytest.raises(DataError, match="not contiguous") as e:
        normalize_shard(df.to_arrow(), tmp_path / "x.parquet")
    assert e.value.row == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_values(tmp_path, bad):
    df = _good().with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(bad)
        .otherwise(pl.col("numeric_value"))
        .alias("numeric_value")
    )
    with pytest.raises(DataError, match="NaN / inf") as e:
        normalize_shard(df.to_arrow(), tmp_path / "x.parquet")
    assert e.value.column == "numeric_value" and e.value.row == 2


def test_subject_in_two_shards(tmp_path):
    root = write_shard(tmp_path / "m", _good())
    write_shard(root, _good([(2, D(2015, 1, 1), "X")]), name="1.parquet")
    with pytest.raises(DataError, match="appears in two shards") as e:
        scan_meds(open_meds(root))
    assert "subject_id=2" in str(e.value)


def test_codes_file_missing_codes_warns_or_raises(tmp_path, caplog):
    root = write_shard(tmp_path / "m", _good())
    (root / "metadata").mkdir()
    pl.DataFrame({"code": ["MEDS_BIRTH", "LAB"], "description": ["", ""]}).write_parquet(
        root / "metadata" / "codes.parquet"
    )
    with caplog.at_level(logging.WARNING, logger="healthfm.ehr"):
        ds = open_meds(root)
        scan_meds(ds)
    assert (
        ds.info["codes_missing_from_metadata"] == 2
        and "not in metadata/codes.parquet" in caplog.text
    )
    with pytest.raises(DataError, match=r"not in metadata/codes\.parquet") as e:
        scan_meds(open_meds(root, strict_codes=True))
    assert e.value.column == "code"


def test_invalid_dataset_json(tmp_path):
    root = write_shard(tmp_path / "m", _good())
    (root / "metadata").mkdir()
    (root / "metadata" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json"):
        open_meds(root)


def test_not_a_meds_folder(tmp_path):
    with pytest.raises(DataError, match="data/ is missing"):
        open_meds(tmp_path)


def _labels(tmp_path, rows, **extra):
    df = pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "prediction_time": [r[1] for r in rows],
            "boolean_value": [r[2] for r in rows],
            **extra,
        },
        schema_overrides={"prediction_time": pl.Datetime("us")},
    )
    path = tmp_path / "labels.parquet"
    df.write_parquet(path)
    return path


def test_labels_unknown_subject(tmp_path):
    root = write_shard(tmp_path / "m", _good())
    subjects = scan_meds(open_meds(root))
    path = _labels(tmp_path, [(1, D(2012, 1, 1), True), (9, D(2012, 1, 1), False)])
    with pytest.raises(DataError, match="not in the MEDS data") as e:
        read_labels(path, subjects)
    assert e.value.row == 1 and e.value.column == "subject_id"


def test_labels_before_birth(tmp_path):
    root = write_shard(tmp_path / "m", _good())
    subjects = scan_meds(open_meds(root))
    path = _labels(tmp_path, [(1, D(2012, 1, 1), True), (2, D(1979, 1, 1), False)])
    with pytest.raises(DataError, match="before the subject's MEDS_BIRTH") as e:
        read_labels(path, subjects)
    assert e.value.column == "prediction_time" and e.value.row == 1


def test_labels_missing_or_ambiguous_value_column(tmp_path):
    path = _labels(tmp_path, [(1, D(2012, 1, 1), True)], integer_value=[1])
    with pytest.raises(DataError, match="cannot tell the label column"):
        read_labels(path)
    assert read_labels(path, column="integer_value").column == "integer_value"
    pl.DataFrame({"subject_id": [1], "boolean_value": [True]}).write_parquet(
        tmp_path / "l2.parquet"
    )
    with pytest.raises(DataError, match="required MEDS label column") as e:
        read_labels(tmp_path / "l2.parquet")
    assert e.value.column == "prediction_time"


def test_labels_sorted_and_keep_file_row(tmp_path):
    path = _labels(
        tmp_path, [(2, D(2012, 1, 1), True), (1, D(2013, 1, 1), False), (1, D(2012, 1, 1), True)]
    )
    lab = read_labels(path)
    assert lab.frame["row"].to_list() == [2, 1, 0]
    assert np.all(np.diff(lab.subject_ids) >= 0)


def test_unknown_split_name(tmp_path):
    root = write_shard(tmp_path / "m", _good(), splits={1: "train", 2: "validation"})
    ehr = get_modality("ehr")
    samples = ehr.read(root, {})
    with pytest.raises(DataError, match="unknown split names") as e:
        ehr.split(samples, "salt", (0.7, 0.1, 0.2))
    assert e.value.column == "split"


def test_subjects_missing_from_splits_fall_back_to_the_hash_split(tmp_path):
    root = write_shard(tmp_path / "m", _good(), splits={1: "held_out"})
    ehr = get_modality("ehr")
    samples = ehr.read(root, {})
    split = dict(
        zip(samples.keys.tolist(), ehr.split(samples, "salt", (0.7, 0.1, 0.2)), strict=True)
    )
    assert split[1] == "test" and split[2] in ("train", "val", "test")


# ---------------------------------------------------------------- streaming in batches
@pytest.mark.parametrize("batch_rows", [1, 3, 7, 10_000])
def test_batches_hold_whole_subjects_and_add_up_to_the_shard(syn_meds, batch_rows):
    """Subject-aligned batches of any size, concatenated, are the validated shard."""
    from healthfm.ehr.reader import iter_batches

    ds = open_meds(syn_meds)
    ds.shards = ds.shards[:1]
    whole = normalize_shard(pq.read_table(ds.shards[0]), ds.shards[0])
    if batch_rows < 7:  # a few hundred rows are enough to cross many boundaries
        first = whole["subject_id"].unique(maintain_order=True).head(12)
        whole = whole.filter(pl.col("subject_id").is_in(first.implode()))
    frames = [df for _, df in iter_batches(ds, whole["subject_id"].unique(), batch_rows)]
    seen: list[int] = []
    for df in frames:
        ids = df["subject_id"].unique(maintain_order=True).to_list()
        assert not set(ids) & set(seen)  # a subject is never split between frames
        seen += ids
    assert pl.concat(frames).equals(whole)


def test_non_contiguous_subject_across_batches_names_the_file_row(tmp_path):
    from healthfm.ehr.reader import iter_batches

    rows = [(1, D(2000, 1, 1), "A"), (1, D(2000, 1, 2), "A"), (2, D(2000, 1, 1), "A")]
    rows += [(3, D(2000, 1, 1), "A"), (3, D(2000, 1, 2), "A"), (1, D(2001, 1, 1), "B")]
    root = write_shard(tmp_path / "m", _good(rows))
    with pytest.raises(DataError, match="not contiguous") as e:
        list(iter_batches(open_meds(root), batch_rows=2))
    assert e.value.row == 5 and e.value.column == "subject_id"


def test_unsorted_rows_across_a_batch_boundary_name_the_file_row(tmp_path):
    from healthfm.ehr.reader import iter_batches

    rows = [(1, D(2000, 1, 1), "A"), (2, D(2000, 1, 1), "A"), (2, D(2003, 1, 1), "A")]
    rows += [(2, D(2002, 1, 1), "B"), (2, D(2004, 1, 1), "B")]
    root = write_shard(tmp_path / "m", _good(rows))
    with pytest.raises(DataError, match="not sorted by time") as e:
        list(iter_batches(open_meds(root), batch_rows=3))
    assert e.value.row == 3 and e.value.column == "time"


def test_batch_rows_must_be_positive(syn_meds):
    from healthfm.ehr.reader import iter_batches
    from healthfm.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_rows"):
        next(iter_batches(open_meds(syn_meds), batch_rows=0))
