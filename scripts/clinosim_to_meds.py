"""Convert a clinosim FHIR R4 Bulk Data export (NDJSON) to a MEDS 0.4 folder with labels.

`clinosim <https://pypi.org/project/clinosim/>`_ (MIT) simulates a hospital's catchment
population (chronic conditions, life events, admissions, ED visits, outpatient calendar,
deaths) and exports it as FHIR R4 NDJSON, one file per resource type. This script reads
that export and writes::

    OUT/data/{0..S-1}.parquet              events sorted by subject, then time (static first)
    OUT/metadata/codes.parquet             code, description (FHIR display), parent_codes ([])
    OUT/metadata/subject_splits.parquet    60 / 20 / 20 % train / tuning / held_out by subject
    OUT/metadata/dataset.json
    OUT/task_labels/<task>/labels.parquet  subject_id, prediction_time, boolean_value

Every table is cast to and validated against the ``meds`` package's pyarrow schemas.

Regenerate the bundled ``src/healthfm/data/ehr/clinosim_meds`` (see its README)::

    python3.11 -m venv /tmp/clinovenv && /tmp/clinovenv/bin/pip install clinosim==0.6.5
    /tmp/clinovenv/bin/clinosim simulate -p 1000 -s 7 --country US \\
        --start 2023-01-01 --end 2025-12-31 --format fhir-r4 -o /tmp/cs_1k
    .venv/bin/python scripts/clinosim_to_meds.py --fhir /tmp/cs_1k/fhir_r4 \\
        --start 2023-01-01 --end 2025-12-31

(clinosim is deterministic for a seed; the simulation takes about 10 min on 2 cores, the
conversion about 20 s.)

Mapping (one MEDS row per FHIR fact; codes are ``VOCAB/code``):

* ``Patient``: ``MEDS_BIRTH`` at ``birthDate`` 00:00, ``MEDS_DEATH`` at
  ``deceasedDateTime``, a static ``GENDER//F`` / ``GENDER//M`` row (null time).
* ``Encounter``: ``Visit/AMB`` / ``Visit/EMER`` / ``Visit/IMP`` ... at ``period.start``;
  an inpatient stay also gets ``Visit/IMP//DISCHARGE`` at ``period.end``.
* ``Condition``: ``ICD10CM/<code>`` at ``onsetDateTime`` for problem-list items whose onset
  is before ``--start`` (medical history known when follow-up starts), otherwise at
  ``recordedDate`` (the time the record knows it; an onset back-dated inside the follow-up
  would leak a diagnosis made at an admission into the days before it).
* ``Observation``: ``LOINC/<code>`` with ``numeric_value`` from ``valueQuantity`` /
  ``valueInteger`` and ``text_value`` from ``valueCodeableConcept`` (e.g. smoking status);
  panels with components (blood pressure) become one row per component.
* ``MedicationRequest`` (``authoredOn``), ``Procedure`` (``performedDateTime`` or
  ``performedPeriod.start``), ``Immunization`` (``occurrenceDateTime``): ``RxNorm/``,
  ``CPT/`` or ``SNOMED/``, ``CVX/`` codes; a medication without a coding uses
  ``MED/<text>``.

FHIR times are UTC (``Z``) and are written as naive UTC times; a partial date (``YYYY``,
``YYYY-MM``, ``YYYY-MM-DD``) is its first instant. Subject ids are 1..N in the order of the sorted FHIR ``Patient.id``. A patient with
events before its ``birthDate`` or after its ``deceasedDateTime`` (clinosim 0.6.5 gives
some infants a birth date after their first well-baby visits) is dropped with a message,
or refused with ``--strict``.

Labels (prediction time = 23:59 on the day of an outpatient ``AMB`` visit, as EHRSHOT;
only visits with a full year of follow-up before ``--end`` or a death inside that year,
before death, never before birth; at most ``--labels-per-subject`` per subject, drawn
at random with ``--seed``):

* ``admission_1y``: an inpatient admission (``Visit/IMP``) within the next 365 days;
* ``death_1y``: death within the next 365 days;
* ``ed_visit_1y``: an emergency-department visit (``Visit/EMER``) within the next 365 days.

Bad input (a missing file or field, an unparseable time, a reference to an unknown
patient) raises :class:`healthfm.errors.DataError` naming the file, the field and the
0-based line.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from healthfm.errors import DataError

DEFAULT_OUT = (
    Path(__file__).resolve().parent.parent / "src" / "healthfm" / "data" / "ehr" / "clinosim_meds"
)
CODING = pl.List(pl.Struct({"system": pl.String, "code": pl.String, "display": pl.String}))
CONCEPT = pl.Struct({"coding": CODING, "text": pl.String})
REF = pl.Struct({"reference": pl.String})
QUANTITY = pl.Struct({"value": pl.Float64, "unit": pl.String})
PERIOD = pl.Struct({"start": pl.String, "end": pl.String})
#: FHIR coding system URL -> MEDS vocabulary prefix (anything else: the URL's last part).
VOCAB = {
    "http://loinc.org": "LOINC",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://snomed.info/sct": "SNOMED",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://hl7.org/fhir/sid/cvx": "CVX",
}
#: Vocabularies whose terms are not free to redistribute (CPT descriptors are AMA
#: copyright; SNOMED CT terms need an affiliate licence): their codes ship without text.
NO_DESCRIPTION = ("CPT", "SNOMED")
#: Preferred vocabularies, best first, when a concept carries several codings.
PREFERRED = ["ICD10CM", "ICD10", "LOINC", "RxNorm", "CPT", "CVX", "SNOMED"]
RESOURCES = (
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "Procedure",
    "Immunization",
)


def _read(fhir: Path, resource: str, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Read ``<resource>.ndjson`` with only the fields in ``schema`` and a ``line`` column."""
    path = fhir / f"{resource}.ndjson"
    if not path.is_file():
        raise DataError(f"no {resource}.ndjson in the FHIR export", file=fhir)
    if path.stat().st_size == 0:
        return pl.DataFrame(schema=schema).with_row_index("line")
    try:
        df = pl.read_ndjson(path, schema=schema)
    except Exception as exc:  # polars names the problem, not the line: find it (error path only)
        row = None
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                try:
                    json.loads(line)
                except ValueError:
                    row = i
                    break
        raise DataError(f"cannot parse as FHIR NDJSON: {exc}", file=path, row=row) from exc
    return df.with_row_index("line")


def _check_null(df: pl.DataFrame, column: str, path: Path, what: str) -> None:
    bad = df.filter(pl.col(column).is_null())
    if len(bad):
        raise DataError(f"{what} is missing", file=path, column=what, row=int(bad["line"][0]))


def _parse_time(df: pl.DataFrame, column: str, path: Path, field: str) -> pl.DataFrame:
    """Parse an ISO 8601 FHIR date / dateTime column to naive UTC microseconds, in place.

    Null stays null; a non-null value that does not parse raises a DataError naming the
    file, the FHIR field and the 0-based NDJSON line.
    """
    raw = pl.col(column)
    n = raw.str.len_chars()  # FHIR allows YYYY, YYYY-MM and YYYY-MM-DD: take the first instant
    text = (
        pl.when(n == 4)
        .then(raw + "-01-01T00:00:00Z")
        .when(n == 7)
        .then(raw + "-01T00:00:00Z")
        .when(n == 10)
        .then(raw + "T00:00:00Z")
        .otherwise(raw)
    )
    parsed = (
        text.str.to_datetime(strict=False, time_zone="UTC", time_unit="us")
        .dt.replace_time_zone(None)
        .alias(column)
    )
    out = df.with_columns(parsed)
    bad = df.filter(raw.is_not_null() & out[column].is_null())
    if len(bad):
        raise DataError(
            f"cannot parse {bad[column][0]!r} as an ISO 8601 date/time",
            file=path,
            column=field,
            row=int(bad["line"][0]),
        )
    return out


def _concept_code(concept: pl.Expr, fallback: str | None = None) -> tuple[pl.Expr, pl.Expr]:
    """The MEDS code ``VOCAB/code`` and description of a CodeableConcept expression.

    Among several codings the first of :data:`PREFERRED` wins; a concept without a coding
    falls back to ``<fallback>/<text>`` when ``fallback`` is given (else null).
    """
    coding = concept.struct.field("coding")
    vocab = (
        pl.element()
        .struct.field("system")
        .replace_strict(
            VOCAB, default=pl.element().struct.field("system").str.split("/").list.last()
        )
    )
    rank = vocab.replace_strict(
        {v: i for i, v in enumerate(PREFERRED)}, default=len(PREFERRED), return_dtype=pl.Int32
    )
    best = coding.list.eval(
        pl.struct(
            (vocab + "/" + pl.element().struct.field("code")).alias("code"),
            pl.element().struct.field("display").alias("display"),
            rank.alias("rank"),
        )
        .sort_by(rank)
        .first()
    ).list.first()
    code = best.struct.field("code")
    descr = pl.coalesce(best.struct.field("display"), concept.struct.field("text"))
    if fallback is not None:
        code = pl.coalesce(code, pl.lit(fallback + "/") + concept.struct.field("text"))
    return code, descr


def _events(
    df: pl.DataFrame,
    subject: str,
    time: pl.Expr,
    code: pl.Expr,
    descr: pl.Expr | None = None,
    value: pl.Expr | None = None,
    text: pl.Expr | None = None,
) -> pl.DataFrame:
    return df.select(
        pl.col(subject).struct.field("reference").str.split("/").list.last().alias("subject"),
        time.alias("time"),
        code.alias("code"),
        (value if value is not None else pl.lit(None, pl.Float64)).alias("numeric_value"),
        (text if text is not None else pl.lit(None, pl.String)).alias("text_value"),
        (descr if descr is not None else pl.lit(None, pl.String)).alias("description"),
    )


def patients(fhir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read Patient.ndjson.

    Returns
    -------
    (polars.DataFrame, polars.DataFrame)
        The patient table (``id``, ``line``, ``subject_id``, ``birth``, ``death``) and the
        birth / death / sex events.
    """
    path = fhir / "Patient.ndjson"
    df = _read(
        fhir,
        "Patient",
        {
            "id": pl.String,
            "gender": pl.String,
            "birthDate": pl.String,
            "deceasedDateTime": pl.String,
        },
    )
    if df.is_empty():
        raise DataError("no patients in the FHIR export", file=path)
    _check_null(df, "id", path, "id")
    _check_null(df, "birthDate", path, "birthDate")
    dup = df.filter(pl.col("id").is_duplicated())
    if len(dup):
        raise DataError(
            f"patient id {dup['id'][0]!r} appears twice",
            file=path,
            column="id",
            row=int(dup["line"][1]),
        )
    df = _parse_time(df, "birthDate", path, "birthDate")
    df = _parse_time(df, "deceasedDateTime", path, "deceasedDateTime")
    bad = df.filter(pl.col("deceasedDateTime") < pl.col("birthDate"))
    if len(bad):
        raise DataError(
            "death before birth", file=path, column="deceasedDateTime", row=int(bad["line"][0])
        )
    table = df.sort("id").select(
        "id",
        "line",
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("subject_id"),
        pl.col("birthDate").alias("birth"),
        pl.col("deceasedDateTime").alias("death"),
    )
    ref = pl.struct(pl.lit("Patient/") + pl.col("id")).struct.rename_fields(["reference"])
    df = df.with_columns(ref.alias("subject"))
    sex = pl.col("gender").replace_strict(
        {"female": "GENDER//F", "male": "GENDER//M"}, default=pl.lit("GENDER//") + pl.col("gender")
    )
    events = pl.concat(
        [
            _events(df, "subject", pl.col("birthDate"), pl.lit("MEDS_BIRTH"), pl.lit("Birth")),
            _events(
                df.filter(pl.col("deceasedDateTime").is_not_null()),
                "subject",
                pl.col("deceasedDateTime"),
                pl.lit("MEDS_DEATH"),
                pl.lit("Death"),
            ),
            _events(
                df.filter(pl.col("gender").is_not_null()),
                "subject",
                pl.lit(None, pl.Datetime("us")),
                sex,
                pl.lit("Administrative gender: ") + pl.col("gender"),
            ),
        ]
    )
    return table, events


def encounters(fhir: Path) -> pl.DataFrame:
    """Encounter starts (``Visit/<class>``) and inpatient discharges."""
    path = fhir / "Encounter.ndjson"
    df = _read(
        fhir,
        "Encounter",
        {
            "subject": REF,
            "class": pl.Struct({"code": pl.String, "display": pl.String}),
            "period": PERIOD,
        },
    )
    df = df.with_columns(
        pl.col("class").struct.field("code").alias("cls"),
        pl.col("class").struct.field("display").alias("cls_display"),
        pl.col("period").struct.field("start").alias("start"),
        pl.col("period").struct.field("end").alias("end"),
    )
    _check_null(df, "cls", path, "class.code")
    _check_null(df, "start", path, "period.start")
    df = _parse_time(df, "start", path, "period.start")
    df = _parse_time(df, "end", path, "period.end")
    starts = _events(
        df,
        "subject",
        pl.col("start"),
        pl.lit("Visit/") + pl.col("cls"),
        pl.lit("Encounter: ") + pl.col("cls_display"),
    )
    ends = _events(
        df.filter((pl.col("cls") == "IMP") & pl.col("end").is_not_null()),
        "subject",
        pl.col("end"),
        pl.lit("Visit/IMP//DISCHARGE"),
        pl.lit("Discharge from inpatient stay"),
    )
    return pl.concat([starts, ends])


def conditions(fhir: Path, start: datetime) -> pl.DataFrame:
    """Diagnoses, timed as explained in the module docstring."""
    path = fhir / "Condition.ndjson"
    df = _read(
        fhir,
        "Condition",
        {
            "subject": REF,
            "code": CONCEPT,
            "onsetDateTime": pl.String,
            "recordedDate": pl.String,
            "category": pl.List(CONCEPT),
        },
    )
    df = _parse_time(df, "onsetDateTime", path, "onsetDateTime")
    df = _parse_time(df, "recordedDate", path, "recordedDate")
    category = (
        pl.col("category").list.first().struct.field("coding").list.first().struct.field("code")
    )
    history = (category == "problem-list-item") & (pl.col("onsetDateTime") < start)
    time = (
        pl.when(history)
        .then(pl.col("onsetDateTime"))
        .otherwise(pl.coalesce("recordedDate", "onsetDateTime"))
    )
    code, descr = _concept_code(pl.col("code"))
    ev = _events(df.with_columns(time.alias("t")), "subject", pl.col("t"), code, descr)
    bad = df.filter(code.is_null())
    if len(bad):
        raise DataError(
            "condition without a coding", file=path, column="code", row=int(bad["line"][0])
        )
    return ev


def observations(fhir: Path) -> pl.DataFrame:
    """Labs, vitals, scores and social history; panel components become their own rows."""
    path = fhir / "Observation.ndjson"
    component = pl.Struct(
        {"code": CONCEPT, "valueQuantity": QUANTITY, "valueCodeableConcept": CONCEPT}
    )
    df = _read(
        fhir,
        "Observation",
        {
            "subject": REF,
            "effectiveDateTime": pl.String,
            "code": CONCEPT,
            "valueQuantity": QUANTITY,
            "valueInteger": pl.Int64,
            "valueCodeableConcept": CONCEPT,
            "component": pl.List(component),
        },
    )
    _check_null(df, "effectiveDateTime", path, "effectiveDateTime")
    df = _parse_time(df, "effectiveDateTime", path, "effectiveDateTime")
    has_parts = (
        pl.col("component")
        .list.eval(
            pl.element().struct.field("valueQuantity").is_not_null()
            | pl.element().struct.field("valueCodeableConcept").is_not_null()
        )
        .list.any()
    )
    has_parts = has_parts.fill_null(False)
    value = pl.coalesce(
        pl.col("valueQuantity").struct.field("value"), pl.col("valueInteger").cast(pl.Float64)
    )

    def concept_text(c: pl.Expr) -> pl.Expr:
        return pl.coalesce(
            c.struct.field("text"), c.struct.field("coding").list.first().struct.field("display")
        )

    code, descr = _concept_code(pl.col("code"))
    whole = _events(
        df.filter(~has_parts),
        "subject",
        pl.col("effectiveDateTime"),
        code,
        descr,
        value,
        concept_text(pl.col("valueCodeableConcept")),
    )
    parts = (
        df.filter(has_parts)
        .select("line", "subject", "effectiveDateTime", "component")
        .explode("component")
        .unnest("component")
    )
    pcode, pdescr = _concept_code(pl.col("code"))
    parts = _events(
        parts,
        "subject",
        pl.col("effectiveDateTime"),
        pcode,
        pdescr,
        pl.col("valueQuantity").struct.field("value"),
        concept_text(pl.col("valueCodeableConcept")),
    )
    ev = pl.concat([whole, parts])
    bad = df.filter(code.is_null())
    if len(bad):
        raise DataError(
            "observation without a coding", file=path, column="code", row=int(bad["line"][0])
        )
    return ev


def medications(fhir: Path) -> pl.DataFrame:
    """Medication orders at ``authoredOn``."""
    path = fhir / "MedicationRequest.ndjson"
    df = _read(
        fhir,
        "MedicationRequest",
        {"subject": REF, "authoredOn": pl.String, "medicationCodeableConcept": CONCEPT},
    )
    _check_null(df, "authoredOn", path, "authoredOn")
    df = _parse_time(df, "authoredOn", path, "authoredOn")
    code, descr = _concept_code(pl.col("medicationCodeableConcept"), fallback="MED")
    bad = df.filter(code.is_null())
    if len(bad):
        raise DataError(
            "medication without a coding or text",
            file=path,
            column="medicationCodeableConcept",
            row=int(bad["line"][0]),
        )
    return _events(df, "subject", pl.col("authoredOn"), code, descr)


def procedures(fhir: Path) -> pl.DataFrame:
    """Procedures at ``performedDateTime`` (or the start of ``performedPeriod``)."""
    path = fhir / "Procedure.ndjson"
    df = _read(
        fhir,
        "Procedure",
        {
            "subject": REF,
            "code": CONCEPT,
            "performedDateTime": pl.String,
            "performedPeriod": PERIOD,
        },
    )
    df = df.with_columns(
        pl.coalesce("performedDateTime", pl.col("performedPeriod").struct.field("start")).alias("t")
    )
    _check_null(df, "t", path, "performedDateTime")
    df = _parse_time(df, "t", path, "performedDateTime")
    code, descr = _concept_code(pl.col("code"), fallback="PROC")
    return _events(df, "subject", pl.col("t"), code, descr)


def immunizations(fhir: Path) -> pl.DataFrame:
    """Vaccinations (CVX) at ``occurrenceDateTime``."""
    path = fhir / "Immunization.ndjson"
    df = _read(
        fhir,
        "Immunization",
        {"patient": REF, "occurrenceDateTime": pl.String, "vaccineCode": CONCEPT},
    )
    _check_null(df, "occurrenceDateTime", path, "occurrenceDateTime")
    df = _parse_time(df, "occurrenceDateTime", path, "occurrenceDateTime")
    code, descr = _concept_code(pl.col("vaccineCode"), fallback="VACCINE")
    return _events(df, "patient", pl.col("occurrenceDateTime"), code, descr)


def convert(
    fhir: Path,
    start: datetime,
    resources: Sequence[str] = RESOURCES,
    inconsistent: str = "drop",
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read a clinosim FHIR export.

    Patients with events before their ``birthDate`` or after their ``deceasedDateTime``
    are dropped with a message (``inconsistent="drop"``) or refused with a DataError
    naming the Patient line (``inconsistent="error"``).

    Returns
    -------
    (polars.DataFrame, polars.DataFrame, polars.DataFrame)
        MEDS events (sorted by subject, time; static rows first), the code descriptions
        (``code``, ``description``) and the patient table (``subject_id``, ``birth``,
        ``death``).
    """
    readers = {
        "Encounter": encounters,
        "Condition": lambda f: conditions(f, start),
        "Observation": observations,
        "MedicationRequest": medications,
        "Procedure": procedures,
        "Immunization": immunizations,
    }
    unknown = sorted(set(resources) - set(readers))
    if unknown:
        raise DataError(f"unsupported resource types {unknown}; choose among {sorted(readers)}")
    table, events = patients(fhir)
    parts = [events] + [readers[r](fhir) for r in resources]
    ev = pl.concat(parts).join(
        table.select(pl.col("id").alias("subject"), "subject_id"), on="subject", how="left"
    )
    orphan = ev.filter(pl.col("subject_id").is_null())
    if len(orphan):
        raise DataError(
            f"{len(orphan)} events refer to patients missing from Patient.ndjson, "
            f"e.g. {orphan['subject'][0]!r} (code {orphan['code'][0]!r})",
            file=fhir / "Patient.ndjson",
            column="id",
        )
    ev = ev.filter(pl.col("time").is_not_null() | pl.col("code").str.starts_with("GENDER//"))
    # clinosim 0.6.5 gives some infants a birthDate after their first well-baby visits:
    # such timelines cannot be placed on a consistent clock, so they are dropped (or refused).
    life = ev.join(table.select("subject_id", "birth", "death", "line"), on="subject_id")
    bad = (
        life.filter(
            (pl.col("time") < pl.col("birth"))
            | (pl.col("death").is_not_null() & (pl.col("time") > pl.col("death")))
        )
        .group_by("subject_id")
        .agg(pl.len().alias("n"), pl.col("line").first(), pl.col("subject").first())
        .sort("line")
    )
    if len(bad) and inconsistent == "error":
        raise DataError(
            f"{bad['n'][0]} events of patient {bad['subject'][0]!r} are before its birthDate or "
            f"after its deceasedDateTime ({len(bad)} patients in all)",
            file=fhir / "Patient.ndjson",
            column="birthDate",
            row=int(bad["line"][0]),
        )
    if len(bad):
        print(
            f"dropped {len(bad)} patients with {bad['n'].sum()} events before birth or after "
            f"death (e.g. Patient/{bad['subject'][0]})"
        )
        ev = ev.filter(~pl.col("subject_id").is_in(bad["subject_id"].implode()))
        table = table.filter(~pl.col("subject_id").is_in(bad["subject_id"].implode()))
    descr = (
        ev.filter(pl.col("description").is_not_null())
        .group_by("code")
        .agg(pl.col("description").mode().sort().first())
        .filter(~pl.col("code").str.split("/").list.first().is_in(NO_DESCRIPTION))
    )
    ev = (
        ev.select(
            "subject_id",
            pl.col("time").cast(pl.Datetime("us")),
            "code",
            pl.col("numeric_value").cast(pl.Float32),
            "text_value",
        )
        .unique(maintain_order=True)
        .sort(["subject_id", "time", "code"], nulls_last=False)
    )
    return ev, descr, table.drop("id", "line")


def make_labels(
    events: pl.DataFrame,
    table: pl.DataFrame,
    end: datetime,
    per_subject: int,
    seed: int,
) -> dict[str, pl.DataFrame]:
    """Binary 1-year outcome labels at 23:59 on outpatient-visit days (see the docstring)."""
    year = pl.duration(days=365)
    visits = (
        events.filter(pl.col("code") == "Visit/AMB")
        .select(
            "subject_id",
            (pl.col("time").dt.truncate("1d") + pl.duration(hours=23, minutes=59)).alias(
                "prediction_time"
            ),
        )
        .unique()
        .join(table, on="subject_id", how="left")
        .filter(
            (pl.col("prediction_time") >= pl.col("birth"))
            & (pl.col("death").is_null() | (pl.col("prediction_time") < pl.col("death")))
            & (
                (pl.col("prediction_time") + year <= end)
                | (pl.col("death") <= pl.col("prediction_time") + year)
            )
        )
        .sort(["subject_id", "prediction_time"])
    )
    rng = np.random.default_rng(seed)
    visits = (
        visits.with_columns(pl.Series("u", rng.random(len(visits))))
        .filter(pl.col("u").rank("ordinal").over("subject_id") <= per_subject)
        .drop("u")
    )

    def within_year(code: str) -> pl.DataFrame:
        ev = events.filter(pl.col("code") == code).select("subject_id", pl.col("time").alias("t"))
        j = visits.join(ev, on="subject_id", how="left")
        hit = (pl.col("t") > pl.col("prediction_time")) & (
            pl.col("t") <= pl.col("prediction_time") + year
        )
        return (
            j.group_by(["subject_id", "prediction_time"])
            .agg(hit.any().fill_null(False).alias("boolean_value"))
            .select(
                "subject_id", pl.col("prediction_time").cast(pl.Datetime("us")), "boolean_value"
            )
            .sort(["subject_id", "prediction_time"])
        )

    return {
        "admission_1y": within_year("Visit/IMP"),
        "death_1y": within_year("MEDS_DEATH"),
        "ed_visit_1y": within_year("Visit/EMER"),
    }


def _write(df: pl.DataFrame, schema_cls: type, path: Path) -> None:
    """Cast to the meds package's pyarrow schema (polars writes large_string), validate, write."""
    full = schema_cls.schema()
    table = df.to_arrow()
    table = table.cast(pa.schema([full.field(name) for name in table.column_names]))
    schema_cls.validate(table)
    pq.write_table(table, path)


def write_meds(
    fhir: str | Path,
    out: str | Path,
    start: datetime,
    end: datetime | None = None,
    n_shards: int = 3,
    seed: int = 0,
    per_subject: int = 10,
    resources: Sequence[str] = RESOURCES,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    inconsistent: str = "drop",
) -> Path:
    """Convert a clinosim FHIR export and write a MEDS 0.4 folder.

    An existing ``out`` is replaced, except its ``README.md`` (the data card), which is kept.

    Parameters
    ----------
    fhir
        Folder of FHIR R4 NDJSON files (``Patient.ndjson``, ``Encounter.ndjson``, ...).
    out
        MEDS folder to write.
    start
        Start of the simulated follow-up (``clinosim --start``); problem-list conditions
        with an earlier onset are placed at their onset.
    end
        End of the data (``clinosim --end``, the snapshot date); labels need a year of
        follow-up before it. Default: the export's snapshot date if it records one, else
        the last event.
    n_shards, seed, per_subject
        Data shards; seed of the shard / split assignment and label sampling; maximum
        label rows per subject and task.
    resources
        FHIR resource types to convert besides ``Patient``.
    split_fractions
        train / tuning / held_out fractions of subjects.
    inconsistent
        ``"drop"`` or ``"error"``: what to do with a patient whose events precede its
        birth or follow its death (see :func:`convert`).
    """
    fhir, out = Path(fhir), Path(out)
    if not fhir.is_dir():
        raise DataError("FHIR export folder not found", file=fhir)
    if inconsistent not in ("drop", "error"):
        raise ValueError(f"inconsistent must be 'drop' or 'error', not {inconsistent!r}")
    events, descr, table = convert(fhir, start, resources, inconsistent)
    meta_path = fhir / "_generator_metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    cif = meta.get("cif_metadata", {})
    if end is None:
        snap = cif.get("snapshot_date")
        end = (
            datetime.fromisoformat(snap).replace(hour=23, minute=59, second=59)
            if snap
            else events["time"].max()
        )
    labels = make_labels(events, table, end, per_subject, seed)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    (tmp / "metadata").mkdir()
    rng = np.random.default_rng([seed, 1])
    perm = rng.permutation(table["subject_id"].to_numpy())
    shard_of = pl.DataFrame({"subject_id": perm, "shard": np.arange(len(perm)) % n_shards})
    ev = events.join(shard_of, on="subject_id", how="left", maintain_order="left")
    for s in range(n_shards):
        _write(
            ev.filter(pl.col("shard") == s).drop("shard"),
            meds.DataSchema,
            tmp / "data" / f"{s}.parquet",
        )
    n_tr, n_tu = int(split_fractions[0] * len(perm)), int(split_fractions[1] * len(perm))
    split = ["train"] * n_tr + ["tuning"] * n_tu + ["held_out"] * (len(perm) - n_tr - n_tu)
    _write(
        pl.DataFrame({"subject_id": perm, "split": split}),
        meds.SubjectSplitSchema,
        tmp / "metadata" / "subject_splits.parquet",
    )
    codes = (
        events.select(pl.col("code").unique())
        .join(descr, on="code", how="left")
        .sort("code")
        .with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("parent_codes"))
    )
    _write(codes, meds.CodeMetadataSchema, tmp / "metadata" / "codes.parquet")
    dataset = {
        "dataset_name": f"clinosim-{cif.get('country', 'unknown')}",
        "dataset_version": (
            f"clinosim-{meta.get('clinosim_version', 'unknown')}-seed{cif.get('random_seed', '?')}"
            f"-{start.date()}-{end.date()}"
        ),
        "etl_name": "healthfm scripts/clinosim_to_meds.py",
        "etl_version": "1",
        "meds_version": "0.4.1",
        "created_at": meta.get("generated_at", datetime.now().isoformat()),
    }
    (tmp / "metadata" / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    for task, df in labels.items():
        (tmp / "task_labels" / task).mkdir(parents=True)
        _write(df, meds.LabelSchema, tmp / "task_labels" / task / "labels.parquet")
    if (out / "README.md").is_file():  # the data card of a bundled folder survives a rewrite
        shutil.copy2(out / "README.md", tmp / "README.md")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fhir", required=True, help="clinosim FHIR R4 NDJSON folder")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--start", required=True, type=datetime.fromisoformat)
    parser.add_argument("--end", type=datetime.fromisoformat, default=None)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels-per-subject", type=int, default=10)
    parser.add_argument("--resources", nargs="+", default=list(RESOURCES))
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse (instead of dropping) patients with events before birth or after death",
    )
    args = parser.parse_args(argv)
    end = args.end.replace(hour=23, minute=59, second=59) if args.end else None
    out = write_meds(
        args.fhir,
        args.out,
        args.start,
        end,
        args.shards,
        args.seed,
        args.labels_per_subject,
        args.resources,
        inconsistent="error" if args.strict else "drop",
    )
    data = pl.read_parquet(out / "data")
    print(
        f"wrote {out}: {data['subject_id'].n_unique()} subjects, {len(data)} events, "
        f"{data['code'].n_unique()} codes"
    )
    for task in sorted(p.name for p in (out / "task_labels").iterdir()):
        labels = pl.read_parquet(out / "task_labels" / task / "labels.parquet")
        print(
            f"  {task}: {len(labels)} label rows, {labels['boolean_value'].mean():.1%} positive, "
            f"{labels['subject_id'].n_unique()} subjects"
        )


if __name__ == "__main__":
    main()
