"""The command line end to end on real bundled data (tiny model, a few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from healthfm.cli import main
from healthfm.datasets import promoters, splice
from healthfm.inference import load_embeddings
from healthfm.model.pretrained import save_pretrained
from helpers import tiny_model

FAST = ["--steps", "6", "--batch-size", "16", "--eval-every", "3", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model"
    assert main(["pretrain", "dna", str(promoters()), "--out", str(out), *FAST]) == 0
    return out


def test_pretrain_writes_model_folder(model_dir):
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == [
        ".healthfm.json",  # the marker: what wrote the folder, the SHA-256 of each file
        "README.md",  # the model card: the pretraining corpus and held-out loss
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_info.json",
    ]
    info = json.loads((model_dir / "training_info.json").read_text())
    assert info["steps"] == 6 and info["n_train"] > 0 and len(info["data_hash"]) == 64
    # The typed reader / tokenizer options the model was pretrained with.
    assert info["options"]["k"] == 1 and info["options"]["sequence_column"] == "sequence"
    run_dir = model_dir.with_name("model.run")
    assert (run_dir / "train_log.jsonl").exists() and (run_dir / "checkpoints").is_dir()


def test_resume_continues_to_more_steps(tmp_path):
    out = tmp_path / "m"
    args = [
        "pretrain",
        "dna",
        str(promoters()),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "2",
    ]
    assert main([*args, "--steps", "4", "--stop-at", "2"]) == 0
    assert not out.exists()  # stopped early: no model folder yet
    assert main([*args, "--steps", "4", "--resume"]) == 0
    assert json.loads((out / "training_info.json").read_text())["resumed"] is True


def test_embed_parquet_and_npy(model_dir, tmp_path, capsys):
    assert (
        main(["embed", str(model_dir), str(promoters()), "--out", str(tmp_path / "e.parquet")]) == 0
    )
    keys, emb = load_embeddings(tmp_path / "e.parquet")
    assert len(keys) == 106 and emb.shape == (106, 128) and np.isfinite(emb).all()
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith("embedded 106 rows with tiny in ") and final.endswith("e.parquet")
    assert (
        main(
            [
                "embed",
                str(model_dir),
                str(promoters()),
                "--out",
                str(tmp_path / "e.npy"),
                "--pooling",
                "cls",
            ]
        )
        == 0
    )
    keys2, emb2 = load_embeddings(tmp_path / "e.npy")
    assert keys2 == keys and not np.allclose(emb, emb2)


def test_evaluate_writes_results_next_to_baselines(model_dir, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            str(model_dir),
            str(promoters()),
            "--label-column",
            "label",
            "--out",
            str(tmp_path),
            "--seeds",
            "0",
            "1",
            "--n-boot",
            "50",
        ]
    )
    assert code == 0
    rows = [
        r
        for r in json.loads((tmp_path / "results.json").read_text())
        if r.get("row_type") != "delta"
    ]  # method rows
    methods = {(r["method"], r["is_baseline"]) for r in rows}
    assert ("kmer-counts+logreg", True) in methods and ("one-hot+logreg", True) in methods
    assert any(not b for _, b in methods)
    assert {r["seed"] for r in rows} == {0, 1}
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
        assert r["n_test"] > 0 and r["healthfm_version"]
    printed = capsys.readouterr().out
    assert "(baseline)" in printed and "auroc" in printed


def _composition_table(path, typo_row: int | None = None):
    """Promoters with a numeric target learnable from k-mers: G+C count + CpG count / 2."""
    import polars as pl

    frame = pl.read_csv(promoters(), separator="\t")
    seq = frame["sequence"]
    target = (seq.str.count_matches("[GC]") + 0.5 * seq.str.count_matches("CG")).cast(pl.Utf8)
    if typo_row is not None:
        target = target.scatter(typo_row, "n/a")
    frame.with_columns(target.alias("gc_score")).write_csv(path, separator="\t")
    return path


def test_evaluate_numeric_labels_is_a_ridge_regression(model_dir, tmp_path, capsys):
    # 38 distinct numbers (> 20): a regression, as finetune infers it; ridge probes.
    table = _composition_table(tmp_path / "gc.tsv")
    argv = ["evaluate", str(model_dir), str(table), "--label-column", "gc_score"]
    assert main([*argv, "--out", str(tmp_path / "r"), "--seeds", "0", "--n-boot", "50"]) == 0
    rows = [
        r
        for r in json.loads((tmp_path / "r" / "results.json").read_text())
        if r.get("row_type") != "delta"
    ]  # method rows
    assert {r["metric"] for r in rows} == {"mae", "rmse", "r2", "pearson"}
    assert {r["method"] for r in rows} == {
        "tiny-mean+ridge",
        "kmer-counts+ridge",
        "one-hot+ridge",
        "onehot-cnn+ridge",
        "tiny-untrained-mean+ridge",
        "tiny-mean⊕kmer-counts+ridge",
    }
    r2 = {r["method"]: r["value"] for r in rows if r["metric"] == "r2"}
    assert r2["kmer-counts+ridge"] > 0.85  # the 1- and 2-mer frequencies give the target
    assert all(r["task_type"] == "regression" and r["best_alpha"] > 0 for r in rows)
    assert "kmer-counts+ridge" in capsys.readouterr().out


def test_evaluate_numeric_labels_with_a_typo_names_the_row(model_dir, tmp_path, capsys):
    table = _composition_table(tmp_path / "gc.tsv", typo_row=7)
    argv = ["evaluate", str(model_dir), str(table), "--label-column", "gc_score"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "'n/a'" in err and "gc_score" in err and "row 7" in err
    assert not (tmp_path / "r").exists()


def test_evaluate_follows_the_fine_tuned_models_task(model_dir, tmp_path):
    # 25 integer cluster ids look like a regression to the label rule; a model fine-tuned
    # with --task classification makes evaluate score them as classes, probe included.
    import polars as pl

    frame = pl.read_csv(promoters(), separator="\t")
    frame.with_columns((pl.int_range(pl.len()) % 25).alias("cluster")).write_csv(
        tmp_path / "c.tsv", separator="\t"
    )
    base = [str(model_dir), str(tmp_path / "c.tsv"), "--label-column", "cluster"]
    assert main(["finetune", *base, "--out", str(tmp_path / "ft"), "--epochs", "1",
                 "--task", "classification", "--no-checkpoints"]) == 0  # fmt: skip
    assert main(["evaluate", *base, "--out", str(tmp_path / "r"), "--seeds", "0",
                 "--n-boot", "20", "--finetuned", str(tmp_path / "ft")]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {r["method"] for r in rows} >= {"tiny-mean+logreg", "tiny-finetune-full"}
    assert "auroc" in {r["metric"] for r in rows} and "r2" not in {r["metric"] for r in rows}


def test_tokenize_command(tmp_path):
    assert (
        main(["tokenize", "dna", str(splice()), "--out", str(tmp_path / "store"), "--k", "3"]) == 0
    )
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["n_samples"] == 3188 and meta["modality"] == "dna"


def test_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sequence\tlabel\nACGT\ta\nACXT\tb\n")
    assert main(["tokenize", "dna", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv" in err and "row 1" in err and "'X'" in err
    assert not (tmp_path / "s").exists()


def test_model_from_another_modality(tmp_path, capsys):
    model = tiny_model()  # modality "test"
    save_pretrained(model, tmp_path / "m")
    assert (
        main(["evaluate", str(tmp_path / "m"), str(promoters()), "--out", str(tmp_path / "r")]) == 2
    )
    assert "modality" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_single_class_label(model_dir, tmp_path, capsys):
    one = tmp_path / "one.tsv"
    one.write_text(
        "sequence\tlabel\n" + "".join(f"{'ACGT' * 5}{i % 4 * 'A'}\tx\n" for i in range(40))
    )
    assert main(["evaluate", str(model_dir), str(one), "--out", str(tmp_path / "r")]) == 2
    assert "single class" in capsys.readouterr().err


def test_help_is_useful(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "dna", "--help"])
    out = capsys.readouterr().out
    assert "--preset" in out and "--resume" in out and "--k" in out


def test_unlabelled_table_pretrains_and_labelled_evaluation_needs_labels(tmp_path, capsys):
    # A pretraining corpus has no label column; nothing needs to be said for it.
    corpus = tmp_path / "corpus.tsv"
    rng = np.random.default_rng(0)
    corpus.write_text(
        "sequence\n" + "".join("".join(rng.choice(list("ACGT"), 40)) + "\n" for _ in range(80))
    )
    out = tmp_path / "m"
    assert main(["pretrain", "dna", str(corpus), "--out", str(out), *FAST]) == 0
    assert (out / "model.safetensors").exists()
    assert main(["evaluate", str(out), str(corpus), "--out", str(tmp_path / "r")]) == 2
    assert "no label column" in capsys.readouterr().err
    missing = main(
        [
            "evaluate",
            str(out),
            str(promoters()),
            "--label-column",
            "class",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert missing == 2 and "'class'" in capsys.readouterr().err
