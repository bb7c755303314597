"""Helpers of the EHR tests (frames and one-shard MEDS folders for bad-input tests)."""

from __future__ import annotations

from pathlib import Path

import polars as pl


def write_shard(
    root: Path, df: pl.DataFrame, name: str = "0.parquet", splits: dict | None = None
) -> Path:
    """Write a one-shard MEDS folder from a frame (for bad-input tests)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    df.write_parquet(root / "data" / name)
    if splits is not None:
        (root / "metadata").mkdir(exist_ok=True)
        pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())}).write_parquet(
            root / "metadata" / "subject_splits.parquet"
        )
    return root


def events(rows: list[tuple]) -> pl.DataFrame:
    """A MEDS frame from (subject_id, time or None, code, numeric_value or None) tuples."""
    return pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "time": [r[1] for r in rows],
            "code": [r[2] for r in rows],
            "numeric_value": [r[3] if len(r) > 3 else None for r in rows],
        },
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    )
