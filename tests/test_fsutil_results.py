import json

import pytest

from healthfm.evaluate.results import (
    ResultRow,
    format_table,
    read_results,
    summarize,
    write_results,
)
from healthfm.fsutil import atomic_dir, atomic_write_text, json_hash, sha256_path


def test_atomic_dir_replaces_whole_or_nothing(tmp_path):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError
    # Every folder healthfm writes carries its marker (what wrote it, the files' SHA-256).
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".healthfm.json", "a"]
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".healthfm.json", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_hashes_are_stable(tmp_path):
    assert json_hash({"b": 1, "a": [1, 2]}) == json_hash({"a": [1, 2], "b": 1})
    atomic_write_text(tmp_path / "x", "hello")
    first = sha256_path(tmp_path)
    atomic_write_text(tmp_path / "x", "hello!")
    assert sha256_path(tmp_path) != first


def _row(method, metric, value, seed, baseline=False):
    return ResultRow(
        task="t",
        method=method,
        is_baseline=baseline,
        metric=metric,
        value=value,
        ci_low=value - 0.1,
        ci_high=value + 0.1,
        n_test=50,
        seed=seed,
        extra={"pooling": "mean"},
    )


def test_results_json_schema_and_table(tmp_path):
    rows = [_row("fm", "accuracy", 0.8, s) for s in range(3)] + [
        _row("kmer", "accuracy", 0.9, s, True) for s in range(3)
    ]
    write_results(tmp_path / "results.json", rows)
    data = read_results(tmp_path / "results.json")
    required = {
        "task",
        "method",
        "is_baseline",
        "metric",
        "value",
        "ci_low",
        "ci_high",
        "n_test",
        "seed",
        "model_hash",
        "data_hash",
        "healthfm_version",
        "wall_seconds",
    }
    assert required <= set(data[0]) and data[0]["pooling"] == "mean"
    summary = {s["method"]: s for s in summarize(data)}
    assert summary["fm"]["mean"] == pytest.approx(0.8) and summary["fm"]["n_seeds"] == 3
    table = format_table(data)
    assert "kmer (baseline)" in table and "0.900*" in table and "0.800 " in table
    json.dumps(data)


def test_table_columns_fit_large_values():
    # Regression errors in a target's units (mmHg, mg/dL) are wider than AUROC cells.
    rows = [
        {
            "task": "t",
            "method": "m",
            "is_baseline": False,
            "metric": metric,
            "value": v,
            "ci_low": v - 1.5,
            "ci_high": v + 1.5,
            "n_test": 9,
            "seed": 0,
        }
        for metric, v in (("mae", 10.327), ("rmse", 12.83), ("r2", 0.348))
    ]
    line = format_table(rows, ["mae", "rmse", "r2"]).splitlines()[2]
    cells = [c for c in line.split("  ") if c.strip()]
    assert len(cells) == 4  # method + three cells, each separated by at least two spaces
