"""Issue 16, one test (or a few) per class of failure: data loss on --out, silent garbage,
leakage, tracebacks, leftovers, integrity, interruption, umask, first use.

Each runs the real command (``healthfm.cli.main``) on the bundled data or on files made
from it; the small models are pretrained here for a few steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from healthfm.cli import main
from healthfm.datasets import promoters
from healthfm.errors import DataError
from healthfm.fsutil import MARKER_NAME

DATA = Path(__file__).resolve().parent.parent / "src" / "healthfm" / "data"
FAST = ["--steps", "2", "--batch-size", "8", "--eval-every", "0"]


def _run(argv, capsys=None) -> tuple[int, str]:
    """Exit code and stderr of the CLI; argparse's SystemExit is an exit code too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


@pytest.fixture(scope="module")
def dna_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "dna"
    assert main(["pretrain", "dna", str(promoters()), "--out", str(out), *FAST]) == 0
    return out


def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    return folder


# ---------------------------------------------------------------------- data loss
@pytest.mark.parametrize("command", ["tokenize", "pretrain"])
def test_out_at_a_users_folder_is_refused_and_kept(tmp_path, capsys, command):
    folder = _user_folder(tmp_path)
    extra = FAST if command == "pretrain" else []
    rc, err = _run([command, "dna", promoters(), "--out", folder, *extra], capsys)
    assert rc == 2 and "not written by healthfm" in err and str(folder) in err
    assert (folder / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no run folder either


def test_out_at_a_file_is_refused_without_leftovers(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("precious")
    rc, err = _run(["tokenize", "dna", promoters(), "--out", target], capsys)
    assert rc == 2 and "is a file" in err
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no .notes.txt.old-*


def test_own_outputs_are_replaced_and_a_lookalike_never(tmp_path, capsys):
    store = tmp_path / "store"
    assert _run(["tokenize", "dna", promoters(), "--out", store])[0] == 0
    assert (store / MARKER_NAME).is_file()
    assert _run(["tokenize", "dna", promoters(), "--out", store])[0] == 0
    # A folder that merely looks like a model folder (a downloaded Hugging Face model:
    # config.json + model.safetensors + its own files) is a user's folder: refused, kept.
    old = tmp_path / "old_model"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "model.safetensors").write_bytes(b"x")
    (old / "README.md").write_text("published")
    rc, err = _run(["pretrain", "dna", promoters(), "--out", old, *FAST], capsys)
    assert rc == 2 and "not written by healthfm" in err
    assert sorted(p.name for p in old.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["tokenize", "dna", promoters(), "--out", empty])[0] == 0


def test_embed_never_replaces_its_input_or_a_users_file(dna_model, tmp_path, capsys):
    mine = tmp_path / "mine.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(mine)
    rc, err = _run(["embed", dna_model, promoters(), "--out", mine], capsys)
    assert rc == 2 and "not one healthfm wrote" in err
    assert pl.read_parquet(mine)["a"].to_list() == [1]
    copy = tmp_path / "in.tsv"
    shutil.copy(promoters(), copy)
    rc, err = _run(["embed", dna_model, copy, "--out", copy], capsys)
    assert rc == 2 and "input itself" in err and copy.read_bytes() == promoters().read_bytes()
    out = tmp_path / "e.parquet"  # its own output: replaced on a re-run
    assert _run(["embed", dna_model, promoters(), "--out", out])[0] == 0
    assert _run(["embed", dna_model, promoters(), "--out", out])[0] == 0


# ---------------------------------------------------------------------- silent garbage
@pytest.mark.parametrize("missing", ["NaN", "NA", "", "nan", "None"])
def test_missing_label_strings_are_refused_not_a_class(dna_model, tmp_path, capsys, missing):
    lines = promoters().read_text().splitlines()
    seq, _ = lines[4].split("\t")
    lines[4] = f"{seq}\t{missing}" if missing else f'{seq}\t""'
    table = tmp_path / "t.tsv"
    table.write_text("\n".join(lines) + "\n")
    rc, err = _run(
        ["evaluate", dna_model, table, "--out", tmp_path / "ev", "--n-boot", "5"], capsys
    )
    assert rc == 2 and ("missing label" in err) and "row 3" in err
    assert not (tmp_path / "ev" / "results.json").exists()


def test_duplicate_cell_barcodes_are_refused(tmp_path):
    import anndata as ad

    from healthfm.singlecell.reader import read_h5ad

    adata = ad.read_h5ad(DATA / "singlecell" / "celltypist_sample_counts.h5ad")
    names = list(adata.obs_names)
    names[5] = names[2]
    adata.obs_names = names
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(DataError, match="duplicate cell barcode") as err:
        read_h5ad(path)
    assert err.value.file == str(path) and err.value.row == 5


def test_a_sequence_longer_than_the_context_is_said(dna_model, tmp_path, caplog):
    table = tmp_path / "long.tsv"
    table.write_text("sequence\tlabel\n" + "ACGT" * 5000 + "\ta\nACGTACGT\tb\n")
    with caplog.at_level(logging.WARNING, logger="healthfm"):
        assert main(["embed", str(dna_model), str(table), "--out", str(tmp_path / "e.npy")]) == 0
    assert "1 of 2 sequences are longer than the model's context of 64" in caplog.text
    assert "20001 tokens" in caplog.text or "20002 tokens" in caplog.text


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--num-workers", "-1"], "--num-workers"),
        (["--k", "0"], "--k"),
        (["--checkpoint-minutes", "-5"], "--checkpoint-minutes"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(tmp_path, capsys, flags, flag):
    out = tmp_path / "m"
    rc, err = _run(["pretrain", "dna", promoters(), "--out", out, "--steps", "2", *flags], capsys)
    assert rc == 2 and flag in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no m.run/


def test_python_api_validates_too(tmp_path):
    from healthfm.errors import ConfigError
    from healthfm.stages.pretrain import pretrain
    from healthfm.train.trainer import TrainConfig

    with pytest.raises(ConfigError, match="--steps") as err:
        pretrain("dna", promoters(), tmp_path / "m", train_config=TrainConfig(steps=0))
    assert err.value.column == "steps" and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="--k"):
        pretrain("dna", promoters(), tmp_path / "m", options={"k": 0})


@pytest.mark.parametrize(
    "make_input, looks_like",
    [
        (lambda tmp: DATA / "ehr" / "synthetic_meds", "MEDS folder"),
        (lambda tmp: DATA / "singlecell" / "celltypist_sample_counts.h5ad", ".h5ad"),
    ],
)
def test_model_of_another_modality_is_named(dna_model, tmp_path, capsys, make_input, looks_like):
    rc, err = _run(["embed", dna_model, make_input(tmp_path), "--out", tmp_path / "e.npy"], capsys)
    assert rc == 2 and "this is a dna model" in err and looks_like in err


def test_evaluate_slides_refuses_a_model_of_another_modality(dna_model, tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("slide_id,label\na,0\nb,1\n")
    (tmp_path / "features").mkdir()
    rc, err = _run(
        [
            "evaluate-slides",
            dna_model,
            tmp_path / "features",
            "--labels",
            tmp_path / "labels.csv",
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert rc == 2 and "this is a dna model" in err and "pathology" in err


def test_ehr_model_on_another_vocabulary_is_refused(tmp_path):
    from healthfm.ehr.embed import featurize_labels
    from healthfm.ehr.reader import open_meds, read_labels
    from healthfm.ehr.tokenizer import MedsTokenizer
    from healthfm.model import FoundationModel, ModelConfig

    tok = MedsTokenizer(codes=["MEDS_BIRTH", "A", "B"], bins={}, texts=[])
    torch.manual_seed(0)
    model = FoundationModel(
        ModelConfig(
            modality="ehr",
            vocab_size=tok.vocab_size,
            d_model=16,
            n_layers=1,
            n_heads=2,
            d_ff=32,
            max_len=32,
            objective="causal",
            use_times=True,
        )
    ).eval()
    t0 = datetime(2010, 1, 1)
    rows = [(s, t0 + timedelta(days=d), f"ICD10//X{d % 7}") for s in (1, 2) for d in range(20)]
    root = tmp_path / "meds"
    (root / "data").mkdir(parents=True)
    pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "time": [r[1] for r in rows],
            "code": [r[2] for r in rows],
            "numeric_value": [None] * len(rows),
        },
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    ).write_parquet(root / "data" / "0.parquet")
    pl.DataFrame(
        {"subject_id": [1, 2], "prediction_time": [t0 + timedelta(days=30)] * 2},
        schema_overrides={"prediction_time": pl.Datetime("us")},
    ).with_columns(pl.Series("boolean_value", [True, False])).write_parquet(tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"100% of the labelled subjects' 40 events") as err:
        featurize_labels(open_meds(root), tok, read_labels(tmp_path / "l.parquet"), model)
    assert err.value.file == str(root) and "ICD10//X" in str(err.value)


# ---------------------------------------------------------------------- leakage
def test_model_pretrained_on_meds_splits_refuses_a_hash_split(tmp_path, capsys):
    from healthfm.ehr.synthetic import write_meds

    meds = write_meds(tmp_path / "syn", n_subjects=60, seed=1, n_shards=1)
    model = tmp_path / "ehr"
    argv = ["pretrain", "ehr", meds, "--out", model, "--steps", "1", "--batch-size", "4"]
    assert _run([*argv, "--eval-every", "0"])[0] == 0
    info = json.loads((model / "training_info.json").read_text())
    assert info["split_source"]["source"] == "metadata/subject_splits.parquet"
    (meds / "metadata" / "subject_splits.parquet").unlink()
    labels = next((meds / "task_labels").glob("*/labels.parquet"))
    rc, err = _run(
        ["evaluate", model, meds, "--labels", labels, "--out", tmp_path / "ev", "--n-boot", "5"],
        capsys,
    )
    assert rc == 2 and "subject_splits.parquet" in err and "pretrained on into the test" in err


# ---------------------------------------------------------------------- tracebacks
@pytest.mark.parametrize("name", ["codes.parquet", "subject_splits.parquet"])
def test_corrupt_meds_metadata_is_one_line(tmp_path, capsys, name):
    meds = tmp_path / "meds"
    shutil.copytree(DATA / "ehr" / "synthetic_meds", meds)
    path = meds / "metadata" / name
    path.write_bytes(path.read_bytes()[:100])
    rc, err = _run(["tokenize", "ehr", meds, "--out", tmp_path / "t"], capsys)
    assert rc == 2 and "cannot read the metadata file" in err and str(path) in err
    assert len(err.strip().splitlines()) == 1


def test_ragged_tsv_row_names_the_row(tmp_path, capsys):
    lines = promoters().read_text().splitlines()
    lines[8] += "\textra"
    table = tmp_path / "ragged.tsv"
    table.write_text("\n".join(lines) + "\n")
    rc, err = _run(["tokenize", "dna", table, "--out", tmp_path / "t"], capsys)
    assert rc == 2 and "row has 3 fields, the header 2" in err and "row 7" in err
    assert len(err.strip().splitlines()) == 1


def test_evaluate_out_at_a_file_is_one_line(dna_model, tmp_path, capsys):
    target = tmp_path / "f"
    target.write_text("mine")
    rc, err = _run(["evaluate", dna_model, promoters(), "--out", target], capsys)
    assert rc == 2 and "is a file" in err and target.read_text() == "mine"


# ---------------------------------------------------------------------- leftovers
def test_a_failed_pretrain_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "m"
    # Fails after the token stores were written (the micro batch does not divide the batch).
    rc, err = _run(
        ["pretrain", "dna", promoters(), "--out", out, *FAST, "--micro-batch-size", "3"], capsys
    )
    assert rc == 2 and "multiple" in err
    assert list(tmp_path.iterdir()) == []


def test_tile_slide_with_corrupt_tiles_writes_nothing(tmp_path, capsys):
    slide = tmp_path / "bad.svs"
    data = bytearray((DATA / "pathology" / "CMU-1-Small-Region.svs").read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 200_000, 97):
        data[i] ^= 0xFF
    slide.write_bytes(bytes(data))
    rc, err = _run(["tile", slide, "--out", tmp_path / "tiles"], capsys)
    assert rc == 2 and "decode" in err
    left = [p for p in (tmp_path / "tiles").rglob("*") if p.is_file()]
    assert left == []


# ---------------------------------------------------------------------- interruption
def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    out = tmp_path / "m"
    argv = ["pretrain", "dna", str(promoters()), "--out", str(out), "--batch-size", "8"]
    argv += ["--eval-every", "0", "--checkpoint-every", "100000"]
    code = (
        "import sys; from healthfm.cli import main; "
        f"raise SystemExit(main({[*argv, '--steps', '100000']!r}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env
    )
    log = tmp_path / "m.run" / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    checkpoints = sorted((tmp_path / "m.run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and not out.exists()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 10  # the first log row comes at step 10; none of those steps is lost
    # Resume to a few steps past the checkpoint: it continues from it.
    steps = str(step + 2)
    assert main([*argv, "--steps", steps, "--resume"]) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["resumed"] is True and info["steps"] == step + 2


def test_time_based_checkpoints(tmp_path, monkeypatch):
    from healthfm.train import trainer as T

    clock = [0.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: clock[0])
    real_step = T.Trainer.train_step

    def step_and_tick(self):
        clock[0] += 61.0  # each step "takes" a minute
        return real_step(self)

    monkeypatch.setattr(T.Trainer, "train_step", step_and_tick)
    out = tmp_path / "m"
    argv = ["pretrain", "dna", str(promoters()), "--out", str(out), "--steps", "3"]
    argv += ["--batch-size", "8", "--eval-every", "0", "--checkpoint-every", "0"]
    assert main([*argv, "--checkpoint-minutes", "2", "--stop-at", "3"]) == 0
    log = [json.loads(x) for x in (tmp_path / "m.run" / "train_log.jsonl").read_text().splitlines()]
    assert log and all("eta_s" in r and "steps_per_s" in r for r in log if "loss" in r)
    # Saved at step 2 (two minutes after the start) and at the end (step 3); kept 2.
    names = sorted(p.name for p in (tmp_path / "m.run" / "checkpoints").glob("step-*"))
    assert names == ["step-00000002", "step-00000003"]


def test_plan_and_eta_are_printed_without_a_terminal(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["pretrain", "dna", promoters(), "--out", out, "--steps", "30", "--batch-size", "8"]
    rc, err = _run([*argv, "--eval-every", "0"], capsys)
    assert rc == 0
    assert "plan: 30 steps × batch 8 × 64 tokens = 15.4 k token slots" in err
    assert "tokens/s" in err and "ETA" in err


# ---------------------------------------------------------------------- umask
def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        assert main(["pretrain", "dna", str(promoters()), "--out", str(tmp_path / "m"), *FAST]) == 0
        assert main(["tokenize", "dna", str(promoters()), "--out", str(tmp_path / "s")]) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "m", tmp_path / "s"):
        assert folder.stat().st_mode & 0o777 == 0o775
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o664}


# ---------------------------------------------------------------------- first use
@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "t"
    assert (
        main(["tile", str(DATA / "pathology" / "CMU-1-Small-Region.svs"), "--out", str(out)]) == 0
    )
    return out


def test_tile_output_is_a_pretraining_and_embedding_input(tiles, tmp_path):
    model = tmp_path / "path"
    argv = ["pretrain", "pathology", str(tiles), "--out", str(model), "--steps", "1"]
    argv += ["--batch-size", "4", "--image-size", "32", "--patch-size", "8", "--eval-every", "0"]
    assert main(argv) == 0
    h5 = next((tiles / "patches").glob("*.h5"))
    for source in (tiles, tiles / "patches", h5):
        out = tmp_path / f"emb_{source.name}"
        assert main(["embed", str(model), str(source), "--out", str(out)]) == 0
        import h5py

        with h5py.File(out / h5.name) as f:
            assert f["features"].shape[0] == f["coords"].shape[0] > 0
            assert np.isfinite(f["features"][:]).all()
