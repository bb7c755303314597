"""A clinically structured synthetic population, written as a MEDS 0.4 folder.

Why our own generator: no real EHR can ship, and tests must run offline in seconds. (For
the bundled demo data set see ``src/healthfm/data/ehr/README.md``.) The population is a
monthly simulation, vectorized over subjects, of a few interacting chronic diseases:

* a latent frailty per subject and smoking status (a ``text_value``);
* onsets of hypertension, type 2 diabetes, chronic kidney disease (driven by diabetes and
  hypertension), heart failure (driven by hypertension, CKD, age) and COPD (driven by
  smoking), each with an age- and frailty-dependent monthly hazard;
* lab and vital trajectories tied to the diseases (creatinine rises with CKD, HbA1c with
  diabetes, systolic blood pressure with untreated hypertension, NT-proBNP and weight with
  heart-failure decompensation, a latent state that builds up over months before an
  admission), measured at outpatient visits whose frequency grows with the disease burden;
* medications started after diagnosis (metformin, lisinopril, furosemide, inhaler);
* inpatient admissions (hazard from heart failure, CKD, COPD, decompensation, age) with
  admission labs and a discharge, and death (age, heart failure, CKD, recent admission).

Codes look like real vocabularies (ICD-10-CM, LOINC, RxNorm) but nothing in healthfm
depends on them. Labels (MEDS label schema, prediction time = 23:59 on an outpatient
visit day, as EHRSHOT): ``admission_1y`` (an inpatient admission within a year) and
``new_hf_1y`` (a first heart-failure diagnosis within a year, among subjects without
one). Only prediction times with a full year of follow-up before the end of data are
kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

US_PER_DAY = 86_400_000_000
START = np.datetime64("2014-01-01T00:00:00", "us")
MONTHS = 132  # 2014-01 .. 2024-12
DAY = np.timedelta64(1, "D").astype("timedelta64[us]")

DX = {
    "htn": ("ICD10CM/I10", "Essential (primary) hypertension"),
    "dm": ("ICD10CM/E11.9", "Type 2 diabetes mellitus without complications"),
    "ckd": ("ICD10CM/N18.3", "Chronic kidney disease, stage 3"),
    "hf": ("ICD10CM/I50.9", "Heart failure, unspecified"),
    "copd": ("ICD10CM/J44.9", "Chronic obstructive pulmonary disease, unspecified"),
}
RX = {
    "htn": ("RxNorm/29046", "lisinopril"),
    "dm": ("RxNorm/6809", "metformin"),
    "hf": ("RxNorm/4603", "furosemide"),
    "copd": ("RxNorm/435", "albuterol"),
}
LABS = {
    "creat": ("LOINC/2160-0", "Creatinine [Mass/volume] in Serum or Plasma"),
    "a1c": ("LOINC/4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"),
    "sbp": ("LOINC/8480-6", "Systolic blood pressure"),
    "hr": ("LOINC/8867-4", "Heart rate"),
    "weight": ("LOINC/29463-7", "Body weight"),
    "bnp": ("LOINC/33762-6", "NT-proBNP [Mass/volume] in Serum or Plasma"),
    "na": ("LOINC/2951-2", "Sodium [Moles/volume] in Serum or Plasma"),
}
OTHER = {
    "op": ("Visit/OP", "Outpatient visit"),
    "ip": ("Visit/IP", "Inpatient admission"),
    "dc": ("Visit/IP//DISCHARGE", "Discharge from inpatient stay"),
    "smoke": ("SOCIAL/SMOKING", "Tobacco smoking status"),
    "sex_f": ("GENDER//F", "Female"),
    "sex_m": ("GENDER//M", "Male"),
    "pna": ("ICD10CM/J18.9", "Pneumonia, unspecified organism"),
    "hfx": ("ICD10CM/I50.23", "Acute on chronic systolic heart failure"),
}


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class _Rows:
    sid: list
    t: list
    code: list
    val: list
    text: list

    def add(self, sid, t, code, val=None, text=None) -> None:
        n = len(sid)
        if n == 0:
            return
        self.sid.append(np.asarray(sid, dtype=np.int64))
        self.t.append(np.asarray(t, dtype="datetime64[us]"))
        self.code.append(
            np.full(n, code, dtype=object)
            if isinstance(code, str)
            else np.asarray(code, dtype=object)
        )
        self.val.append(
            np.full(n, np.nan, np.float32) if val is None else np.asarray(val, dtype=np.float32)
        )
        self.text.append(
            np.full(n, None, dtype=object) if text is None else np.asarray(text, dtype=object)
        )


def simulate(n_subjects: int = 1500, seed: int = 0) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Simulate the population.

    Returns
    -------
    (polars.DataFrame, dict)
        MEDS events (sorted by subject, time; static rows first) and the label frames
        by task name.
    """
    # One generator for everything: the steps below draw from it in a fixed order (the
    # order of the draws is the data set: reordering them changes every event).
    rng = np.random.default_rng(seed)
    rows = _Rows([], [], [], [], [])
    people = _Cohort.draw(n_subjects, rng, rows)
    for m in range(MONTHS):
        month_start = START + np.timedelta64(int(m * 30.44), "D").astype("timedelta64[us]")
        age = (month_start - people.birth).astype(np.int64) / US_PER_DAY / 365.25
        a = (age - 60) / 10
        people.progress(rng, month_start, a)
        people.visit(rng, rows, m, month_start, a)
        people.admit(rng, rows, m, month_start, a)
        people.die(rng, rows, m, month_start, a)
    events = _events(rows)
    labels = _labels(events, rng)
    return events, labels


@dataclass
class _Cohort:
    """The simulated subjects' state, one array entry per subject, month after month."""

    n: int
    sid: np.ndarray
    birth: np.ndarray
    frail: np.ndarray
    smoke: np.ndarray
    smoker: np.ndarray
    has: dict[str, np.ndarray]
    onset: dict[str, np.ndarray]
    dx_recorded: dict[str, np.ndarray]
    on_rx: dict[str, np.ndarray]
    creat: np.ndarray
    a1c: np.ndarray
    weight: np.ndarray
    decomp: np.ndarray
    alive: np.ndarray
    last_adm: np.ndarray
    first_visit: np.ndarray

    @classmethod
    def draw(cls, n: int, rng: np.random.Generator, rows: _Rows) -> _Cohort:
        """``n`` subjects at the start, their sex and birth written to ``rows``."""
        sid = np.arange(1, n + 1, dtype=np.int64) * 7 + 10_000
        birth = START - (rng.uniform(25, 85, n) * 365.25 * US_PER_DAY).astype("timedelta64[us]")
        frail = rng.normal(0, 1, n)
        smoke = rng.choice(
            np.array(["never", "former", "current"], dtype=object), n, p=[0.55, 0.28, 0.17]
        )
        female = rng.random(n) < 0.52
        rows.add(sid[female], np.full(female.sum(), "NaT", "datetime64[us]"), OTHER["sex_f"][0])
        rows.add(sid[~female], np.full((~female).sum(), "NaT", "datetime64[us]"), OTHER["sex_m"][0])
        rows.add(sid, birth, "MEDS_BIRTH")
        return cls(
            n=n,
            sid=sid,
            birth=birth,
            frail=frail,
            smoke=smoke,
            smoker=np.where(smoke == "current", 1.0, np.where(smoke == "former", 0.5, 0.0)),
            has={k: np.zeros(n, bool) for k in DX},
            onset={k: np.full(n, np.datetime64("NaT"), "datetime64[us]") for k in DX},
            dx_recorded={k: np.zeros(n, bool) for k in DX},
            on_rx={k: np.zeros(n, bool) for k in RX},
            creat=rng.normal(0.9, 0.12, n).clip(0.5),
            a1c=rng.normal(5.4, 0.3, n),
            weight=rng.normal(80, 14, n),
            decomp=np.zeros(n),
            alive=np.ones(n, bool),
            last_adm=np.full(n, -100),
            first_visit=np.ones(n, bool),
        )

    def progress(self, rng: np.random.Generator, month_start: np.datetime64, a: np.ndarray) -> None:
        """A month of disease: onsets (monthly hazards), then the latent trajectories."""
        n, has, frail, on_rx = self.n, self.has, self.frail, self.on_rx
        haz = {
            "htn": _sig(-6.3 + 0.55 * a + 0.5 * frail),
            "dm": _sig(-7.0 + 0.35 * a + 0.6 * frail + 0.3 * has["htn"]),
            "ckd": _sig(-7.6 + 0.5 * a + 0.9 * has["dm"] + 0.8 * has["htn"] + 0.3 * frail),
            "hf": _sig(-7.3 + 0.6 * a + 0.9 * has["htn"] + 1.0 * has["ckd"] + 0.4 * frail),
            "copd": _sig(-8.0 + 0.4 * a + 2.2 * self.smoker + 0.3 * frail),
        }
        for k, h in haz.items():
            new = self.alive & ~has[k] & (rng.random(n) < h)
            has[k] |= new
            self.onset[k] = np.where(new, month_start, self.onset[k])
        self.creat += (
            0.004 + 0.02 * has["ckd"] + 0.01 * has["dm"] * ~on_rx["dm"] + rng.normal(0, 0.01, n)
        )
        self.a1c += np.where(
            has["dm"], 0.05 * (~on_rx["dm"]) - 0.02 * on_rx["dm"], -0.01 * (self.a1c - 5.4)
        ) + rng.normal(0, 0.03, n)
        self.a1c = np.where(has["dm"], self.a1c.clip(6.2, 12), self.a1c.clip(4.6, 6.1))
        self.decomp = 0.8 * self.decomp + has["hf"] * rng.gamma(
            0.6, 0.5 + 0.3 * has["ckd"] + 0.2 * (~on_rx["hf"]), n
        )
        self.weight += rng.normal(0, 0.3, n)

    def visit(
        self,
        rng: np.random.Generator,
        rows: _Rows,
        m: int,
        month_start: np.datetime64,
        a: np.ndarray,
    ) -> None:
        """Outpatient visits of month ``m``: vitals, labs, diagnoses and prescriptions."""
        n, sid, has, on_rx, decomp = self.n, self.sid, self.has, self.on_rx, self.decomp
        burden = sum(has[k].astype(float) for k in DX)
        visit = self.alive & (rng.random(n) < 0.05 + 0.05 * burden + 0.1 * (m - self.last_adm == 1))
        vi = np.flatnonzero(visit)
        if not len(vi):
            return
        day = (
            month_start
            + (rng.integers(0, 28, len(vi)) * DAY)
            + rng.integers(8, 17, len(vi)) * 3_600_000_000
        )
        rows.add(sid[vi], day, OTHER["op"][0])
        fv = vi[self.first_visit[vi]]
        rows.add(sid[fv], day[self.first_visit[vi]], OTHER["smoke"][0], text=self.smoke[fv])
        self.first_visit[vi] = False
        sbp = (
            122
            + 18 * has["htn"][vi]
            - 12 * on_rx["htn"][vi]
            + 4 * a[vi]
            + rng.normal(0, 9, len(vi))
        )
        rows.add(sid[vi], day + 60_000_000, LABS["sbp"][0], sbp)
        rows.add(
            sid[vi],
            day + 60_000_000,
            LABS["hr"][0],
            72 + 8 * decomp[vi] + rng.normal(0, 8, len(vi)),
        )
        rows.add(sid[vi], day + 60_000_000, LABS["weight"][0], self.weight[vi] + 2.5 * decomp[vi])
        lab = vi[(rng.random(len(vi)) < 0.4 + 0.4 * (burden[vi] > 0))]
        ld = day[np.isin(vi, lab)] + 1_800_000_000
        rows.add(sid[lab], ld, LABS["creat"][0], self.creat[lab] * rng.lognormal(0, 0.05, len(lab)))
        dm_lab = lab[has["dm"][lab] | (rng.random(len(lab)) < 0.2)]
        rows.add(
            sid[dm_lab],
            ld[np.isin(lab, dm_lab)],
            LABS["a1c"][0],
            self.a1c[dm_lab] + rng.normal(0, 0.15, len(dm_lab)),
        )
        hf_lab = lab[has["hf"][lab] & (rng.random(len(lab)) < 0.6)]
        rows.add(
            sid[hf_lab],
            ld[np.isin(lab, hf_lab)],
            LABS["bnp"][0],
            np.exp(
                5.5
                + 0.9 * decomp[hf_lab]
                + 0.5 * has["ckd"][hf_lab]
                + rng.normal(0, 0.3, len(hf_lab))
            ),
        )
        # Diagnoses get recorded (and treated) at visits, with some delay.
        for k in DX:
            rec = vi[has[k][vi] & (self.dx_recorded[k][vi] | (rng.random(len(vi)) < 0.7))]
            self.dx_recorded[k][rec] = True
            rows.add(sid[rec], day[np.isin(vi, rec)] + 120_000_000, DX[k][0])
            if k in RX:
                start_rx = rec[~on_rx[k][rec] & (rng.random(len(rec)) < 0.8)]
                on_rx[k][start_rx] = True
                refill = rec[on_rx[k][rec]]
                rows.add(sid[refill], day[np.isin(vi, refill)] + 180_000_000, RX[k][0])

    def admit(
        self,
        rng: np.random.Generator,
        rows: _Rows,
        m: int,
        month_start: np.datetime64,
        a: np.ndarray,
    ) -> None:
        """Inpatient admissions of month ``m``: the stay's diagnosis, labs and discharge."""
        sid, has, decomp = self.sid, self.has, self.decomp
        h_adm = _sig(
            -6.4
            + 1.3 * decomp
            + 0.7 * has["ckd"]
            + 0.9 * has["copd"] * (self.smoke == "current")
            + 0.35 * a
            + 0.3 * self.frail
            + 0.9 * (self.creat > 1.8)
        )
        adm = self.alive & (rng.random(self.n) < h_adm)
        ai = np.flatnonzero(adm)
        if not len(ai):
            return
        t_adm = (
            month_start
            + rng.integers(0, 28, len(ai)) * DAY
            + rng.integers(0, 24, len(ai)) * 3_600_000_000
        )
        rows.add(sid[ai], t_adm, OTHER["ip"][0])
        hfx = has["hf"][ai] & (decomp[ai] > 0.8)
        rows.add(sid[ai[hfx]], t_adm[hfx] + 600_000_000, OTHER["hfx"][0])
        rows.add(sid[ai[~hfx]], t_adm[~hfx] + 600_000_000, OTHER["pna"][0])
        rows.add(
            sid[ai],
            t_adm + 1_800_000_000,
            LABS["creat"][0],
            self.creat[ai] * 1.2 * rng.lognormal(0, 0.08, len(ai)),
        )
        rows.add(
            sid[ai],
            t_adm + 1_800_000_000,
            LABS["na"][0],
            138 - 3 * decomp[ai] + rng.normal(0, 2.5, len(ai)),
        )
        rows.add(sid[ai], t_adm + rng.integers(2, 9, len(ai)) * DAY, OTHER["dc"][0])
        self.last_adm[ai] = m
        decomp[ai] *= 0.3

    def die(
        self,
        rng: np.random.Generator,
        rows: _Rows,
        m: int,
        month_start: np.datetime64,
        a: np.ndarray,
    ) -> None:
        """Deaths of month ``m`` (age, heart failure, CKD, a recent admission)."""
        has = self.has
        h_death = _sig(
            -9.6
            + 0.9 * a
            + 1.0 * has["hf"]
            + 0.6 * has["ckd"]
            + 1.2 * (m - self.last_adm <= 1)
            + 0.3 * self.frail
        )
        die = self.alive & (rng.random(self.n) < h_death)
        di = np.flatnonzero(die)
        rows.add(
            self.sid[di],
            month_start + 27 * DAY + rng.integers(0, 24, len(di)) * 3_600_000_000,
            "MEDS_DEATH",
        )
        self.alive &= ~die


def _events(rows: _Rows) -> pl.DataFrame:
    """The MEDS events of ``rows``, without those after a death, by subject and time."""
    events = pl.DataFrame(
        {
            "subject_id": np.concatenate(rows.sid),
            "time": np.concatenate(rows.t),
            "code": pl.Series(np.concatenate(rows.code).tolist(), dtype=pl.String),
            "numeric_value": np.concatenate(rows.val),
            "text_value": pl.Series(np.concatenate(rows.text).tolist(), dtype=pl.String),
        }
    ).with_columns(pl.col("numeric_value").fill_nan(None))
    # Events after death are dropped (a discharge scheduled after a death).
    death = events.filter(pl.col("code") == "MEDS_DEATH").select(
        "subject_id", pl.col("time").alias("death")
    )
    events = (
        events.join(death, on="subject_id", how="left")
        .filter(
            pl.col("death").is_null()
            | pl.col("time").is_null()
            | (pl.col("time") <= pl.col("death"))
        )
        .drop("death")
    )
    return events.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)


def _labels(
    events: pl.DataFrame, rng: np.random.Generator, per_subject: int = 8
) -> dict[str, pl.DataFrame]:
    end = events["time"].max()
    year = pl.duration(days=365)
    visits = (
        events.filter(pl.col("code") == "Visit/OP")
        .select(
            "subject_id",
            (pl.col("time").dt.truncate("1d") + pl.duration(hours=23, minutes=59)).alias(
                "prediction_time"
            ),
        )
        .unique(maintain_order=True)  # row order feeds the draws below
        .filter(pl.col("prediction_time") + year <= end)
    )
    visits = (
        visits.with_columns(pl.Series("u", rng.random(len(visits))))
        .filter(pl.col("u").rank("ordinal").over("subject_id") <= per_subject)
        .drop("u")
        .sort(["subject_id", "prediction_time"])
    )

    def within_year(code: str) -> pl.DataFrame:
        ev = events.filter(pl.col("code") == code).select("subject_id", pl.col("time").alias("t"))
        j = visits.join(ev, on="subject_id", how="left")
        hit = (pl.col("t") > pl.col("prediction_time")) & (
            pl.col("t") <= pl.col("prediction_time") + year
        )
        return j.group_by(["subject_id", "prediction_time"], maintain_order=True).agg(
            hit.any().fill_null(False).alias("hit"),
            (pl.col("t") <= pl.col("prediction_time")).any().fill_null(False).alias("before"),
        )

    adm = within_year("Visit/IP")
    hf = within_year(DX["hf"][0]).filter(~pl.col("before"))

    def fmt(df: pl.DataFrame) -> pl.DataFrame:
        return df.select(
            "subject_id",
            pl.col("prediction_time").cast(pl.Datetime("us")),
            pl.col("hit").alias("boolean_value"),
        ).sort(["subject_id", "prediction_time"])

    return {"admission_1y": fmt(adm), "new_hf_1y": fmt(hf)}


def _write(df: pl.DataFrame, schema_cls, path: Path) -> None:
    # Cast to the meds package's pyarrow schema (polars writes large_string) and validate.
    full = schema_cls.schema()
    table = df.to_arrow()
    table = table.cast(pa.schema([full.field(name) for name in table.column_names]))
    schema_cls.validate(table)
    pq.write_table(table, path)


def write_meds(
    out: str | Path,
    n_subjects: int = 1500,
    seed: int = 0,
    n_shards: int = 3,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> Path:
    """Simulate and write a MEDS 0.4 folder (data shards, metadata, task labels).

    Parameters
    ----------
    out
        Folder to create (replaced if it exists).
    n_subjects, seed
        Population size and seed.
    n_shards
        Data shards (subjects assigned round-robin in shuffled order).
    split_fractions
        train / tuning / held_out fractions of subjects.
    """
    out = Path(out)
    events, labels = simulate(n_subjects, seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    (tmp / "metadata").mkdir()
    rng = np.random.default_rng([seed, 1])
    subjects = np.unique(events["subject_id"].to_numpy())
    perm = rng.permutation(subjects)
    shard_of = pl.DataFrame({"subject_id": perm, "shard": np.arange(len(perm)) % n_shards})
    ev = events.join(shard_of, on="subject_id", how="left", maintain_order="left")
    schema = {
        "subject_id": pl.Int64,
        "time": pl.Datetime("us"),
        "code": pl.String,
        "numeric_value": pl.Float32,
        "text_value": pl.String,
    }
    for s in range(n_shards):
        part = ev.filter(pl.col("shard") == s).drop("shard").cast(schema)  # type: ignore[arg-type]
        _write(part, meds.DataSchema, tmp / "data" / f"{s}.parquet")
    n_tr, n_tu = int(split_fractions[0] * len(perm)), int(split_fractions[1] * len(perm))
    split = np.array(
        ["train"] * n_tr + ["tuning"] * n_tu + ["held_out"] * (len(perm) - n_tr - n_tu)
    )
    _write(
        pl.DataFrame({"subject_id": perm, "split": split}),
        meds.SubjectSplitSchema,
        tmp / "metadata" / "subject_splits.parquet",
    )
    descr = {
        **{v[0]: v[1] for v in DX.values()},
        **{v[0]: v[1] for v in RX.values()},
        **{v[0]: v[1] for v in LABS.values()},
        **{v[0]: v[1] for v in OTHER.values()},
        "MEDS_BIRTH": "Birth",
        "MEDS_DEATH": "Death",
    }
    codes = sorted(set(events["code"].unique().to_list()))
    codes_df = pl.DataFrame(
        {
            "code": codes,
            "description": [descr.get(c, "") for c in codes],
            "parent_codes": [[] for _ in codes],
        },
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )
    _write(codes_df, meds.CodeMetadataSchema, tmp / "metadata" / "codes.parquet")
    (tmp / "metadata" / "dataset.json").write_text(
        json.dumps(
            {
                "dataset_name": "healthfm-synthetic-chronic",
                "dataset_version": f"n{n_subjects}-seed{seed}",
                "etl_name": "healthfm.ehr.synthetic",
                "etl_version": "1",
                "meds_version": "0.4.1",
                "created_at": "2026-01-01T00:00:00",
            },
            indent=2,
        )
        + "\n"
    )
    for task, df in labels.items():
        (tmp / "task_labels" / task).mkdir(parents=True)
        _write(df, meds.LabelSchema, tmp / "task_labels" / task / "labels.parquet")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
