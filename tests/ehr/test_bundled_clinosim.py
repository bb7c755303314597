"""The bundled clinosim MEDS folder (src/healthfm/data/ehr/clinosim_meds) is valid MEDS 0.4.

Checks the shipped files only (the simulator need not be installed): every table against
the ``meds`` package's pyarrow schemas, sorting, disjoint subject splits, labels that are
never before birth or at / after death, and both classes in train and held_out.
"""

from __future__ import annotations

import json
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

import healthfm

FOLDER = Path(healthfm.__file__).resolve().parent / "data" / "ehr" / "clinosim_meds"
TASKS = ("admission_1y", "death_1y", "ed_visit_1y")

pytestmark = pytest.mark.skipif(not FOLDER.is_dir(), reason="clinosim_meds is not bundled")


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return pl.read_parquet(sorted(FOLDER.glob("data/*.parquet")))


@pytest.fixture(scope="module")
def splits() -> pl.DataFrame:
    return pl.read_parquet(FOLDER / "metadata" / "subject_splits.parquet")


def test_tables_validate_against_meds_schemas() -> None:
    shards = sorted(FOLDER.glob("data/*.parquet"))
    assert shards
    for path in shards:
        meds.DataSchema.validate(pq.read_table(path))
    meds.SubjectSplitSchema.validate(pq.read_table(FOLDER / "metadata" / "subject_splits.parquet"))
    meds.CodeMetadataSchema.validate(pq.read_table(FOLDER / "metadata" / "codes.parquet"))
    meta = json.loads((FOLDER / "metadata" / "dataset.json").read_text())
    assert meta["meds_version"].startswith("0.4")
    for task in TASKS:
        meds.LabelSchema.validate(pq.read_table(FOLDER / "task_labels" / task / "labels.parquet"))


def test_shards_sorted_and_subjects_in_one_shard() -> None:
    seen: set[int] = set()
    for path in sorted(FOLDER.glob("data/*.parquet")):
        df = pl.read_parquet(path)
        key = df.select("subject_id", pl.col("time").fill_null(pl.datetime(1, 1, 1)))
        assert key.equals(key.sort(["subject_id", "time"]))
        ids = set(df["subject_id"].unique().to_list())
        assert not ids & seen
        seen |= ids


def test_birth_death_and_codes(events: pl.DataFrame) -> None:
    births = events.filter(pl.col("code") == meds.birth_code)
    assert births["subject_id"].n_unique() == events["subject_id"].n_unique() == len(births)
    assert events.filter(pl.col("code") == meds.death_code)["subject_id"].is_unique().all()
    assert events.filter(pl.col("time").is_null())["code"].str.starts_with("GENDER//").all()
    assert events.filter(pl.col("numeric_value").is_not_null())["code"].n_unique() > 20
    codes = set(pl.read_parquet(FOLDER / "metadata" / "codes.parquet")["code"].to_list())
    assert set(events["code"].unique().to_list()) <= codes


def test_splits_disjoint_and_cover_subjects(events: pl.DataFrame, splits: pl.DataFrame) -> None:
    assert splits["subject_id"].is_unique().all()
    assert set(splits["split"].unique().to_list()) == {"train", "tuning", "held_out"}
    assert set(splits["subject_id"].to_list()) == set(events["subject_id"].unique().to_list())


@pytest.mark.parametrize("task", TASKS)
def test_labels_respect_birth_death_and_have_both_classes(
    task: str, events: pl.DataFrame, splits: pl.DataFrame
) -> None:
    labels = pl.read_parquet(FOLDER / "task_labels" / task / "labels.parquet")
    life = (
        events.filter(pl.col("code").is_in([meds.birth_code, meds.death_code]))
        .pivot("code", index="subject_id", values="time", aggregate_function="first")
        .rename({meds.birth_code: "birth"})
    )
    if meds.death_code not in life.columns:
        life = life.with_columns(pl.lit(None, pl.Datetime("us")).alias(meds.death_code))
    j = labels.join(life, on="subject_id", how="left")
    assert j["birth"].null_count() == 0, "a label for a subject without data"
    assert (j["prediction_time"] >= j["birth"]).all()
    dead = j.filter(pl.col(meds.death_code).is_not_null())
    assert (dead["prediction_time"] < dead[meds.death_code]).all()
    assert labels.select("subject_id", "prediction_time").is_unique().all()
    by_split = (
        labels.join(splits, on="subject_id")
        .group_by("split")
        .agg(pl.col("boolean_value").sum().alias("pos"), pl.len().alias("n"))
    )
    for split in ("train", "held_out"):
        row = by_split.filter(pl.col("split") == split)
        assert len(row) == 1 and 0 < row["pos"][0] < row["n"][0], (task, split)


# --- the converter (scripts/clinosim_to_meds.py) on a hand-written three-patient export ---

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "clinosim_to_meds.py"


def _converter():
    import importlib.util

    spec = importlib.util.spec_from_file_location("clinosim_to_meds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _coding(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _enc(pid: str, cls: str, start: str, end: str) -> dict:
    return {"subject": {"reference": f"Patient/{pid}"}, "class": {"code": cls, "display": cls},
            "period": {"start": start, "end": end}}  # fmt: skip


def _write_export(folder: Path, bad_time: bool = False) -> Path:
    loinc = "http://loinc.org"
    records = {
        "Patient": [
            {"id": "a", "gender": "female", "birthDate": "1950-05-01"},
            {
                "id": "b",
                "gender": "male",
                "birthDate": "1940-01-01",
                "deceasedDateTime": "2024-08-01T23:59:59Z",
            },
            {"id": "c", "gender": "male", "birthDate": "2023-06-01"},  # visit before birth
        ],
        "Encounter": [
            _enc("a", "AMB", "2023-02-01T10:00:00Z", "2023-02-01T10:20:00Z"),
            _enc("a", "AMB", "2023-06-01T10:00:00Z", "2023-06-01T10:20:00Z"),
            _enc("a", "IMP", "2023-09-01T08:00:00Z", "2023-09-05T12:00:00Z"),
            _enc("b", "AMB", "2023-03-01T10:00:00Z", "2023-03-01T10:20:00Z"),
            _enc("b", "AMB", "2024-01-10T10:00:00Z", "2024-01-10T10:20:00Z"),
            _enc("c", "AMB", "2023-01-15T10:00:00Z", "2023-01-15T10:20:00Z"),
        ],
        "Condition": [
            {
                "subject": {"reference": "Patient/a"},
                "code": _coding("http://hl7.org/fhir/sid/icd-10-cm", "I50.9", "Heart failure"),
                "onsetDateTime": "2019-04-02",
                "recordedDate": "2023-02-01T10:05:00Z",
                "category": [_coding("x", "problem-list-item", "Problem")],
            },
        ],
        "Observation": [
            {
                "subject": {"reference": "Patient/a"},
                "effectiveDateTime": "bad-time" if bad_time else "2023-02-01T10:10:00.5Z",
                "code": _coding(loinc, "2160-0", "Creatinine"),
                "valueQuantity": {"value": 1.4, "unit": "mg/dL"},
            },
            {
                "subject": {"reference": "Patient/b"},
                "effectiveDateTime": "2023-03-01T10:10:00Z",
                "code": _coding(loinc, "85354-9", "Blood pressure panel"),
                "component": [
                    {"code": _coding(loinc, "8480-6", "Systolic"), "valueQuantity": {"value": 150}},
                    {"code": _coding(loinc, "8462-4", "Diastolic"), "valueQuantity": {"value": 90}},
                ],
            },
            {
                "subject": {"reference": "Patient/b"},
                "effectiveDateTime": "2023-03-01T10:11:00Z",
                "code": _coding(loinc, "72166-2", "Tobacco smoking status"),
                "valueCodeableConcept": {"text": "Former smoker"},
            },
        ],
        "MedicationRequest": [
            {
                "subject": {"reference": "Patient/a"},
                "authoredOn": "2023-02-01T10:15:00Z",
                "medicationCodeableConcept": {"text": "Folic acid"},
            },
        ],
        "Procedure": [],
        "Immunization": [
            {
                "patient": {"reference": "Patient/b"},
                "occurrenceDateTime": "2020-10-01",
                "vaccineCode": _coding("http://hl7.org/fhir/sid/cvx", "150", "Influenza"),
            },
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in records.items():
        (folder / f"{name}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_converter_writes_valid_meds_with_correct_labels(tmp_path: Path) -> None:
    from datetime import datetime

    conv = _converter()
    fhir = _write_export(tmp_path / "fhir")
    out = conv.write_meds(fhir, tmp_path / "meds", datetime(2023, 1, 1), datetime(2025, 12, 31))
    for path in out.glob("data/*.parquet"):
        meds.DataSchema.validate(pq.read_table(path))
    ev = pl.read_parquet(out / "data")
    assert ev["subject_id"].n_unique() == 2  # c is dropped: a visit before its birth
    a = ev.filter(pl.col("subject_id") == 1)
    assert a["code"][0] == "GENDER//F" and a["time"][0] is None
    hf = a.filter(pl.col("code") == "ICD10CM/I50.9")["time"][0]
    assert hf == datetime(2019, 4, 2)  # problem-list history dated at its onset
    assert a.filter(pl.col("code") == "Visit/IMP//DISCHARGE").height == 1
    assert a.filter(pl.col("code") == "MED/Folic acid").height == 1
    b = ev.filter(pl.col("subject_id") == 2)
    assert set(b.filter(pl.col("numeric_value").is_not_null())["code"]) == {
        "LOINC/8480-6",
        "LOINC/8462-4",
    }
    assert b.filter(pl.col("code") == "LOINC/72166-2")["text_value"][0] == "Former smoker"
    adm = pl.read_parquet(out / "task_labels" / "admission_1y" / "labels.parquet")
    assert adm.filter(pl.col("subject_id") == 1)["boolean_value"].to_list() == [True, True]
    assert not adm.filter(pl.col("subject_id") == 2)["boolean_value"].any()
    death = pl.read_parquet(out / "task_labels" / "death_1y" / "labels.parquet")
    assert death.filter(pl.col("subject_id") == 2)["boolean_value"].to_list() == [False, True]
    assert death["prediction_time"][0] == datetime(2023, 2, 1, 23, 59)


def test_converter_errors_name_file_field_and_line(tmp_path: Path) -> None:
    from datetime import datetime

    from healthfm.errors import DataError

    conv = _converter()
    fhir = _write_export(tmp_path / "fhir", bad_time=True)
    with pytest.raises(DataError, match=r"Observation.ndjson.*effectiveDateTime.*row 0"):
        conv.write_meds(fhir, tmp_path / "meds", datetime(2023, 1, 1))
    fhir = _write_export(tmp_path / "fhir2")
    with pytest.raises(DataError, match=r"Patient.ndjson.*birthDate.*row 2"):
        conv.write_meds(fhir, tmp_path / "meds", datetime(2023, 1, 1), inconsistent="error")
    (fhir / "Patient.ndjson").write_text(
        '{"id": "a", "gender": "female", "birthDate": "1950-05"}\n'
    )
    with pytest.raises(DataError, match=r"patients missing from Patient\.ndjson"):
        conv.write_meds(fhir, tmp_path / "meds", datetime(2023, 1, 1))
