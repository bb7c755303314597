"""Several MEDS roots as one pretraining corpus, and the model transferred to a third."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from healthfm.cli import main
from healthfm.ehr.synthetic import write_meds


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    return [
        write_meds(base / f"site{i}", n_subjects=60 + 40 * i, seed=10 + i, n_shards=1)
        for i in range(3)
    ]


@pytest.fixture(scope="module")
def corpus_model(roots, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus_model") / "m"
    argv = ["pretrain", "ehr", str(roots[0]), str(roots[1]), "--out", str(out)]
    argv += ["--steps", "6", "--batch-size", "8", "--max-len", "128", "--eval-every", "3"]
    assert main([*argv, "--temperature", "2"]) == 0
    return out


def test_training_info_and_card_record_the_corpus(corpus_model, roots):
    info = json.loads((corpus_model / "training_info.json").read_text())
    corpus = info["corpus"]
    assert corpus["temperature"] == 2.0
    rows = corpus["sources"]
    assert [r["name"] for r in rows] == ["site0", "site1"]
    for row, root in zip(rows, roots[:2], strict=False):
        splits = pq.read_table(root / "metadata" / "subject_splits.parquet").to_pandas()
        assert row["n_train"] == (splits["split"] == "train").sum()  # each root's own splits
        assert row["data_hash"] and row["tokens_seen"] > 0
    assert sum(r["samples_seen"] for r in rows) == 6 * 8
    sizes = np.array([r["n_train"] for r in rows], dtype=float)
    want = np.sqrt(sizes) / np.sqrt(sizes).sum()  # temperature 2: size ** (1/2)
    assert np.allclose([r["probability"] for r in rows], want)
    assert info["pretraining_baseline"]["name"] == "bigram"
    card = (corpus_model / "README.md").read_text()
    assert "site0" in card and "site1" in card and "bigram" in card


def test_a_held_out_source_is_never_trained_on(roots, tmp_path):
    out = tmp_path / "m"
    argv = ["pretrain", "ehr", str(roots[0]), str(roots[1]), "--out", str(out)]
    argv += ["--steps", "3", "--batch-size", "8", "--max-len", "64", "--holdout-source", "site1"]
    assert main(argv) == 0
    rows = json.loads((out / "training_info.json").read_text())["corpus"]["sources"]
    assert rows[1]["split"] == "val" and rows[1]["n_train"] == 0
    assert rows[1]["samples_seen"] == 0 and rows[1]["probability"] == 0
    assert rows[0]["samples_seen"] == 24


def test_the_corpus_model_embeds_a_root_it_never_saw(corpus_model, roots, tmp_path):
    labels = roots[2] / "task_labels" / "admission_1y" / "labels.parquet"
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(corpus_model), str(roots[2]), "--labels", str(labels), "--out", str(out)]
    assert main(argv) == 0
    assert pq.read_table(out).num_rows == pq.read_table(labels).num_rows


def test_tokenize_a_corpus_writes_a_store_per_source(roots, tmp_path):
    out = tmp_path / "stores"
    assert main(["tokenize", "ehr", str(roots[0]), str(roots[1]), "--out", str(out)]) == 0
    metas = [json.loads((out / n / "meta.json").read_text()) for n in ("site0", "site1")]
    assert metas[0]["tokenizer_hash"] == metas[1]["tokenizer_hash"]
    assert all(m["n_samples"] > 0 for m in metas)
