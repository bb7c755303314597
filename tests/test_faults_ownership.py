"""Issue 24: fault injection. healthfm never touches what it did not write, keeps every
path built from data inside its folder, checks splits by content, and answers bad input
and failing outputs with one clear line (exit 2), never a traceback.

Each test runs the real command (``healthfm.cli.main``, or a subprocess for signals) on
tiny data, and hashes the tree around the command before and after: nothing outside the
command's own files may change. ``FAULT_CLASSES`` counts the classes tried (the report's
numbers); every one of them is asserted below.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from healthfm.cli import main
from healthfm.datasets import promoters
from healthfm.errors import ConfigError, DataError
from healthfm.fsutil import (
    MARKER_NAME,
    check_not_input,
    check_output_dir,
    confined,
    lock_path,
    output_lock,
)

FAST = ["--steps", "2", "--batch-size", "8", "--eval-every", "0"]
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _run(argv, capsys=None) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """SHA-256 of every file below ``root`` (links by target), except below ``skip``."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line(err: str) -> bool:
    """One line on stderr (warnings aside), no traceback."""
    lines = [x for x in err.strip().splitlines() if x.startswith("healthfm:")]
    return "Traceback" not in err and len(lines) == 1


@pytest.fixture(scope="module")
def dna_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "dna"
    assert main(["pretrain", "dna", str(promoters()), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture()
def hf_folder(tmp_path) -> Path:
    """A folder laid out like a downloaded Hugging Face model (config + weights + its own
    README, vocabulary and tokenizer files), which healthfm must never replace."""
    folder = tmp_path / "hf_model"
    folder.mkdir()
    for name, text in {
        "config.json": "{}",
        "model.safetensors": "weights",
        "README.md": "published card",
        "vocab.txt": "A\nC\nG\nT\n",
        "tokenizer_config.json": "{}",
    }.items():
        (folder / name).write_text(text)
    return folder


# ------------------------------------------------------------------ 1. ownership by manifest
def test_a_folder_that_looks_like_a_model_is_never_replaced(tmp_path, hf_folder, capsys):
    before = tree(tmp_path)
    rc, err = _run(["pretrain", "dna", promoters(), "--out", hf_folder, *FAST], capsys)
    assert rc == 2 and "not written by healthfm" in err and one_line(err)
    assert tree(tmp_path) == before  # no run folder, no lock file, the files as they were


def test_a_users_file_in_a_healthfm_folder_is_refused_by_name(tmp_path, capsys):
    store = tmp_path / "store"
    assert _run(["tokenize", "dna", promoters(), "--out", store])[0] == 0
    (store / "my_notes.txt").write_text("mine")
    before = tree(tmp_path)
    rc, err = _run(["tokenize", "dna", promoters(), "--out", store], capsys)
    assert rc == 2 and "my_notes.txt" in err and "did not write" in err and one_line(err)
    assert tree(tmp_path) == before
    (store / "my_notes.txt").unlink()  # without it, the folder is healthfm's again
    assert _run(["tokenize", "dna", promoters(), "--out", store])[0] == 0


def test_marker_lists_every_file_it_wrote(tmp_path):
    assert _run(["tokenize", "dna", promoters(), "--out", tmp_path / "s"])[0] == 0
    marker = json.loads((tmp_path / "s" / MARKER_NAME).read_text())
    on_disk = {
        str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("*") if p.is_file()
    }
    assert set(marker["files"]) == on_disk - {MARKER_NAME}


@pytest.mark.parametrize("via", ["same", "symlink", "inside"])
def test_an_input_is_never_the_output(tmp_path, dna_model, via, capsys):
    model = tmp_path / "model"
    import shutil

    shutil.copytree(dna_model, model)
    out = {"same": model, "symlink": tmp_path / "link", "inside": tmp_path}[via]
    if via == "symlink":
        (tmp_path / "link").symlink_to(model)
    before = tree(tmp_path)
    for argv in (
        ["finetune", model, promoters(), "--out", out, "--epochs", "1", "--n-boot", "0"],
        ["tokenize", "dna", promoters(), "--model", model, "--out", out],
    ):
        rc, err = _run(argv, capsys)
        assert rc == 2 and "input" in err and one_line(err), err
        assert tree(tmp_path) == before


def test_finetune_name_dir_out_dir_is_refused(tmp_path, dna_model, capsys):
    # NAME:DIR names the base by its registry entry; DIR is still an input.
    spec = f"healthfm:{dna_model}"
    before = tree(dna_model)
    rc, err = _run(["finetune", spec, promoters(), "--out", dna_model, "--epochs", "1"], capsys)
    assert rc == 2 and one_line(err)
    assert tree(dna_model) == before


def test_check_not_input_resolves_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.tsv").write_text("x")
    with pytest.raises(ConfigError, match="holds the input"):
        check_not_input(tmp_path / "data", [tmp_path / "data" / "x.tsv"])
    with pytest.raises(ConfigError, match="is the input itself"):
        check_not_input(tmp_path / "data" / ".." / "data", [tmp_path / "data"])
    check_not_input(tmp_path / "other", [tmp_path / "data"])  # elsewhere: fine


def test_interrupted_run_checkpoints_are_kept_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    args = ["pretrain", "dna", promoters(), "--out", out, "--steps", "4", "--batch-size", "8",
            "--eval-every", "0", "--checkpoint-every", "1"]  # fmt: skip
    assert _run([*args, "--stop-at", "2"])[0] == 0
    run = tmp_path / "m.run"
    before = tree(run)
    rc, err = _run(args, capsys)
    assert rc == 2 and "--resume" in err and "--overwrite" in err and one_line(err)
    assert tree(run) == before and not out.exists()
    assert _run([*args, "--resume"])[0] == 0 and (out / "model.safetensors").is_file()
    # A finished run's checkpoints are no unfinished work: the same command runs again.
    assert _run(args)[0] == 0
    # --overwrite discards them knowingly (and finishes a fresh run).
    assert _run([*args, "--stop-at", "2", "--overwrite", "--seed", "1"])[0] == 0


def test_finetune_keeps_an_interrupted_runs_epochs(tmp_path, dna_model, capsys):
    out = tmp_path / "ft"
    args = ["finetune", dna_model, promoters(), "--out", out, "--epochs", "3", "--n-boot", "0"]
    assert _run([*args, "--stop-at-epoch", "1"])[0] == 0
    before = tree(tmp_path)
    rc, err = _run(args, capsys)
    assert rc == 2 and "--resume" in err and one_line(err)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ writers' own files
def test_evaluate_never_replaces_a_file_it_did_not_write(tmp_path, dna_model, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_text("my own results")
    before = tree(tmp_path)
    args = ["evaluate", dna_model, promoters(), "--out", out, "--n-boot", "0", "--seeds", "0",
            "--no-controls"]  # fmt: skip
    rc, err = _run(args, capsys)
    assert rc == 2 and "results.json" in err and one_line(err)
    assert tree(tmp_path) == before
    (out / "results.json").unlink()
    (out / "notes.txt").write_text("kept")
    assert _run(args)[0] == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert "results.json" in marker["files"] and "notes.txt" not in marker["files"]
    assert (out / "notes.txt").read_text() == "kept"
    assert _run(args)[0] == 0  # its own files: replaced


def test_report_never_replaces_a_page_it_did_not_write(tmp_path, capsys):
    page = tmp_path / "index.html"
    page.write_text("<html>my page</html>")
    before = tree(tmp_path)
    rc, err = _run(["report", tmp_path, "--out", page], capsys)
    assert rc == 2 and "not written by healthfm" in err and one_line(err)
    assert tree(tmp_path) == before


def test_tile_never_replaces_a_file_it_did_not_write(tmp_path):
    from healthfm.fsutil import owned_outputs
    from healthfm.stages.common import is_healthfm_file

    out = tmp_path / "tiles"
    (out / "thumbnails").mkdir(parents=True)
    (out / "thumbnails" / "s1.png").write_bytes(b"mine")
    from healthfm.fsutil import atomic_write_bytes

    with pytest.raises(ConfigError, match=r"thumbnails/s1\.png"):
        with owned_outputs(out, "the tile --out folder", ours=is_healthfm_file):
            atomic_write_bytes(out / "thumbnails" / "s1.png", b"tile's")
    assert (out / "thumbnails" / "s1.png").read_bytes() == b"mine"


def test_embed_out_that_is_a_folder_is_refused(tmp_path, dna_model, capsys):
    # Regression (fixed in an earlier wave, lost in the parts rewrite).
    (tmp_path / "x.parquet").mkdir()
    before = tree(tmp_path)
    rc, err = _run(["embed", dna_model, promoters(), "--out", tmp_path / "x.parquet"], capsys)
    assert rc == 2 and "existing folder" in err and one_line(err)
    assert tree(tmp_path) == before


def test_non_utf8_out_is_a_clear_error(tmp_path, dna_model, capsys):
    bad = os.fsdecode(bytes(tmp_path) + b"/\xff\xfe.parquet")
    rc, err = _run(["embed", dna_model, promoters(), "--out", bad], capsys)
    assert rc == 2 and "not valid text" in err and one_line(err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ read-only, full
def test_read_only_output_location_is_refused_before_work(tmp_path, dna_model, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the monkeypatched test covers it")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, err = _run(["embed", dna_model, promoters(), "--out", ro / "e.parquet"], capsys)
    finally:
        ro.chmod(0o755)
    assert rc == 2 and "cannot write" in err and one_line(err)


@pytest.mark.parametrize("errno_name", ["EROFS", "ENOSPC", "EACCES"])
@pytest.mark.parametrize("command", ["tokenize", "embed", "evaluate", "report"])
def test_unwritable_or_full_location_is_one_line(
    tmp_path, dna_model, capsys, monkeypatch, errno_name, command
):
    import errno
    import tempfile

    def refuse(*a, **k):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    before = tree(tmp_path)
    out = tmp_path / "out"
    argv = {
        "tokenize": ["tokenize", "dna", promoters(), "--out", out],
        "embed": ["embed", dna_model, promoters(), "--out", tmp_path / "e.parquet"],
        "evaluate": ["evaluate", dna_model, promoters(), "--out", out, "--n-boot", "0"],
        "report": ["report", tmp_path, "--out", tmp_path / "r.html"],
    }[command]
    rc, err = _run(argv, capsys)
    assert rc == 2 and "cannot write" in err and one_line(err), err
    assert tree(tmp_path) == before


def test_a_full_disk_is_refused_before_work(tmp_path, dna_model, capsys, monkeypatch):
    import shutil

    from healthfm import fsutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: fsutil.shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024)
    )
    before = tree(tmp_path)
    rc, err = _run(["tokenize", "dna", promoters(), "--out", tmp_path / "s"], capsys)
    assert rc == 2 and "full" in err and one_line(err)
    assert tree(tmp_path) == before


def test_an_oserror_during_the_work_is_one_line_and_a_log(tmp_path, capsys, monkeypatch):
    import errno

    from healthfm.stages import tokenize as stage

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s"))

    monkeypatch.setattr(stage, "tokenize", full)
    monkeypatch.setenv("HEALTHFM_LOG_DIR", str(tmp_path / "logs"))
    rc, err = _run(["tokenize", "dna", promoters(), "--out", tmp_path / "s"], capsys)
    assert rc == 2 and "file system is full" in err and one_line(err)
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in err


def test_any_unexpected_error_is_one_line_with_its_traceback_in_a_log(
    tmp_path, capsys, monkeypatch
):
    from healthfm.stages import tokenize as stage

    def boom(*a, **k):
        raise ZeroDivisionError("deep inside")

    monkeypatch.setattr(stage, "tokenize", boom)
    monkeypatch.setenv("HEALTHFM_LOG_DIR", str(tmp_path / "logs"))
    rc, err = _run(["tokenize", "dna", promoters(), "--out", tmp_path / "s"], capsys)
    assert rc == 1 and "ZeroDivisionError" in err and one_line(err)
    (log,) = (tmp_path / "logs").glob("*.log")
    assert "deep inside" in log.read_text() and "Traceback" in log.read_text()


# ------------------------------------------------------------------ concurrent runs: the lock
def test_a_second_run_on_the_same_out_fails_at_once_naming_the_first(tmp_path, capsys):
    out = tmp_path / "m"
    with output_lock(out):
        t0 = time.perf_counter()
        rc, err = _run(["pretrain", "dna", promoters(), "--out", out, *FAST], capsys)
        assert time.perf_counter() - t0 < 30
    assert rc == 2 and f"pid {os.getpid()}" in err and "started" in err and one_line(err)
    assert not out.exists() and not (tmp_path / "m.run").exists()
    assert not lock_path(out).exists()  # the lock file goes with the run that held it


def test_the_lock_across_processes_and_after_kill_9(tmp_path):
    out = tmp_path / "m"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time; from healthfm.fsutil import output_lock\n"
         f"with output_lock({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"), output_lock(out):
            pass
        holder.kill()  # kill -9: the kernel releases the lock, no stale lock blocks a rerun
        holder.wait()
    finally:
        holder.kill()
    with output_lock(out):
        pass


@pytest.mark.parametrize("point", ["preparing", "training"])
def test_sigterm_keeps_a_resumable_run_or_nothing(tmp_path, point):
    """SIGTERM while reading / tokenizing unwinds (the run folder it made is removed);
    while training it checkpoints and stops. Either way exit 143, and nothing else changed."""
    out = tmp_path / "m"
    (tmp_path / "mine.txt").write_text("mine")
    before = tree(tmp_path)
    cmd = [sys.executable, "-m", "healthfm", "pretrain", "dna", str(promoters()), "--out",
           str(out), "--steps", "100000", "--batch-size", "8", "--eval-every", "0",
           "--checkpoint-every", "0", "--checkpoint-minutes", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        if point == "training":
            for line in proc.stderr:  # the plan is printed as training starts
                if "plan:" in line:
                    break
            time.sleep(0.5)
        else:
            deadline = time.time() + 60
            while not (tmp_path / "m.run").exists() and time.time() < deadline:
                time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and not out.exists() and not lock_path(out).exists()
    if point == "preparing":
        assert tree(tmp_path) == before
        return
    assert tree(tmp_path, skip=("m.run",)) == before
    assert list((tmp_path / "m.run" / "checkpoints").glob("step-*"))
    assert _run(cmd[3:])[0] == 2  # without --resume: refused, the checkpoint kept


# ------------------------------------------------------------------ 2. confined paths
def test_confined_refuses_dotdot_absolute_and_symlinks(tmp_path):
    base = tmp_path / "features"
    base.mkdir()
    (tmp_path / "outside").mkdir()
    (base / "escape").symlink_to(tmp_path / "outside")
    (base / "ok.h5").write_text("")
    where = {"file": "labels.csv", "column": "slide_id", "row": 4}
    for value in ("../../x/EVIL", "/etc/passwd", "escape/x", "a/../../b"):
        with pytest.raises(DataError) as err:
            confined(base, value, "slide id", **where)
        assert "labels.csv" in str(err.value) and "row 4" in str(err.value)
    assert confined(base, "ok.h5") == base / "ok.h5"
    assert confined(base, "sub/new.h5") == base / "sub" / "new.h5"  # not there yet: fine


@pytest.mark.parametrize("slide_id", ["../../x/EVIL", "/abs/EVIL", "link/EVIL"])
def test_evaluate_slides_ids_cannot_leave_their_folders(tmp_path, slide_id, capsys):
    features = tmp_path / "features"
    features.mkdir()
    (tmp_path / "x").mkdir()
    (features / "link").symlink_to(tmp_path / "x")
    (tmp_path / "x" / "EVIL.h5").write_bytes(b"victim")
    labels = tmp_path / "slides.csv"
    labels.write_text(f"slide_id,label\n{slide_id},b\ns1,a\n")
    before = tree(tmp_path)
    rc, err = _run(["evaluate-slides", tmp_path / "none", features, "--labels", labels,
                    "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert rc == 2 and "slide id" in err and "row 0" in err and one_line(err), err
    assert tree(tmp_path, skip=("out",)) == before


def test_mhist_image_names_stay_in_the_data_set(tmp_path):
    from healthfm.pathology.tilesets import read_mhist

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "annotations.csv").write_text(
        "Image Name,Majority Vote Label,Partition\n../secret.png,HP,train\n"
    )
    with pytest.raises(DataError, match="image name") as err:
        read_mhist(tmp_path)
    assert err.value.row == 0 and err.value.column == "Image Name"


def test_tile_source_attribute_reads_only_slides(tmp_path):
    from healthfm.pathology.modality import _slide_of_source

    h5 = tmp_path / "tiles" / "s.h5"
    h5.parent.mkdir()
    for source in ("../../etc/passwd", "/etc/passwd", "../outside.svs"):
        with pytest.raises(DataError, match="source"):
            _slide_of_source(source, h5)
    assert _slide_of_source("s.svs", h5) == h5.parent / "s.svs"


def test_corpus_source_names_stay_inside_the_store_folder(tmp_path, dna_model, capsys):
    manifest = tmp_path / "corpus.json"
    manifest.write_text(
        json.dumps({"sources": [{"path": str(promoters()), "name": "../../escaped"},
                                {"path": str(promoters()), "name": "b"}]})
    )  # fmt: skip
    before = tree(tmp_path)
    rc, err = _run(
        ["tokenize", "dna", manifest, "--model", dna_model, "--out", tmp_path / "stores"], capsys
    )
    assert rc == 2 and "corpus source name" in err and one_line(err), err
    assert tree(tmp_path) == before


# ------------------------------------------------------------------ 3. splits by content
def test_another_split_salt_on_pretraining_data_is_refused(tmp_path, dna_model, capsys):
    args = ["evaluate", dna_model, promoters(), "--out", tmp_path / "r", "--n-boot", "0",
            "--seeds", "0", "--no-controls"]  # fmt: skip
    rc, err = _run([*args, "--split-salt", "other"], capsys)
    assert rc == 2 and "split_salt" in err and "--accept-split-change" in err and one_line(err)
    assert not (tmp_path / "r" / "results.json").exists()
    assert _run([*args, "--split-salt", "other", "--accept-split-change"])[0] == 0
    rows = json.loads((tmp_path / "r" / "results.json").read_text())
    assert all("split_salt" in r["split_change_accepted"] for r in rows)
    rc, err = _run(["finetune", dna_model, promoters(), "--out", tmp_path / "ft",
                    "--split-salt", "other", "--epochs", "1"], capsys)  # fmt: skip
    assert rc == 2 and "split_salt" in err


def test_another_group_column_on_pretraining_data_is_refused(tmp_path, capsys):
    data = ROOT / "src" / "healthfm" / "data" / "singlecell" / "pbmc68k_counts.h5ad"
    model = tmp_path / "sc"
    argv = ["pretrain", "singlecell", data, "--out", model, "--group-column", "phase",
            "--max-length", "64", *FAST]  # fmt: skip
    assert _run(argv)[0] == 0
    rc, err = _run(["evaluate", model, data, "--out", tmp_path / "r", "--label-column",
                    "bulk_labels", "--n-boot", "0"], capsys)  # fmt: skip
    assert rc == 2 and "group_column" in err and "--group-column phase" in err and one_line(err)
    assert not (tmp_path / "r").exists()


def test_another_data_set_is_a_transfer_and_not_refused(tmp_path, dna_model):
    table = pl.read_csv(promoters(), separator="\t")
    other = tmp_path / "other.tsv"
    table.gather_every(2).write_csv(other, separator="\t")  # other data: half of it
    args = ["evaluate", dna_model, other, "--out", tmp_path / "r", "--n-boot", "0",
            "--seeds", "0", "--no-controls", "--no-baselines", "--split-salt", "other"]  # fmt: skip
    assert _run(args)[0] == 0


def test_split_file_content_is_compared(tmp_path):
    from healthfm.stages.common import split_changes

    class Modality:
        def __init__(self, sha):
            self.sha = sha

        def split_source(self, samples):
            return {"source": "metadata/subject_splits.parquet", "sha256": self.sha}

    class Samples:
        source = str(tmp_path / "meds")
        data_hash = "d" * 64
        info = None

    model = tmp_path / "model"
    model.mkdir()
    (model / "training_info.json").write_text(json.dumps({
        "split_salt": "healthfm", "split_fractions": [0.8, 0.1, 0.1], "data_hash": "d" * 64,
        "source": str(tmp_path / "meds"),
        "split_source": {"source": "metadata/subject_splits.parquet", "sha256": "a" * 64},
    }))  # fmt: skip
    assert split_changes(model, Modality("a" * 64), Samples(), None, None) == []
    ((field, then, now),) = split_changes(model, Modality("b" * 64), Samples(), None, None)
    assert field.startswith("split_source") and then == "a" * 64 and now == "b" * 64
    # A corpus model evaluated on another data set (transfer): never refused.
    Samples.data_hash, Samples.source = "e" * 64, str(tmp_path / "elsewhere")
    assert split_changes(model, Modality("b" * 64), Samples(), "x", None) == []


# ------------------------------------------------------------------ pickles that run code
def test_a_pickle_that_wants_to_run_code_is_refused_in_those_words(tmp_path):
    import torch

    from healthfm.encoders.published import read_state_dict
    from healthfm.errors import ModelError

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError) as err:
        read_state_dict(tmp_path / "pytorch_model.bin")
    text = str(err.value)
    assert "wants to run code" in text and "refused" in text and "weights_only" not in text


def test_check_output_dir_unit(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_dir(tmp_path / "absent") == tmp_path / "absent"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MARKER_NAME).write_text(json.dumps({"healthfm": 1, "kind": "model"}))
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="listing its files"):
        check_output_dir(tmp_path / "old")  # a marker that lists nothing owns nothing


# ------------------------------------------------------------------ 4. readers: garbage in
def _h5ad(path: Path, X, mutate=None) -> Path:
    import anndata as ad
    import h5py
    import pandas as pd

    n, g = X.shape
    obs = pd.DataFrame({"label": ["a", "b"] * (n // 2)}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)])).write_h5ad(path)
    if mutate is not None:
        with h5py.File(path, "r+") as handle:
            mutate(handle)
    return path


def _counts(n=20, g=12):
    X = np.random.default_rng(0).poisson(2, (n, g)).astype(np.float32)
    X[:, 0] += 1
    return X


def _bad_indices(handle):
    idx = handle["X/indices"][:]
    idx[3] = 10**6
    handle["X/indices"][...] = idx


def _no_attrs(handle):
    for key in list(handle["X"].attrs):
        del handle["X"].attrs[key]


def _byte_strings(handle):
    shape = handle["X"].shape
    del handle["X"]
    handle.create_dataset("X", data=np.full(shape, b"1"))
    handle["X"].attrs["encoding-type"] = "array"
    handle["X"].attrs["encoding-version"] = "0.2.0"


H5AD_CASES = {
    "complex": (lambda: _counts().astype(np.complex64) + 1j, None, "complex"),
    "overflow 3e38": (lambda: _huge(), None, "beyond"),
    "sparse index out of range": (lambda: _sparse(_counts()), _bad_indices, "out of range"),
    "missing X": (lambda: _sparse(_counts()), lambda h: h.__delitem__("X"), "X"),
    "X without encoding": (lambda: _sparse(_counts()), _no_attrs, "cannot read"),
    "byte strings": (lambda: _counts(), _byte_strings, "not numbers"),
}


def _sparse(X):
    import scipy.sparse as sp

    return sp.csr_matrix(X)


def _huge():
    X = _counts()
    X[:, 1] = 3e38
    return _sparse(X)


@pytest.mark.parametrize("case", list(H5AD_CASES))
def test_malformed_h5ad_is_one_clear_line(tmp_path, case, capsys):
    make, mutate, words = H5AD_CASES[case]
    path = _h5ad(tmp_path / "bad.h5ad", make(), mutate)
    before = tree(tmp_path)
    rc, err = _run(["pretrain", "singlecell", path, "--out", tmp_path / "m", *FAST], capsys)
    assert rc == 2 and words in err and str(path) in err and one_line(err), err
    assert tree(tmp_path) == before  # no model, no run folder, no lock, no .parts


def test_float16_h5ad_is_read_exactly(tmp_path):
    from healthfm.modality import get_modality

    X = _counts()
    m = get_modality("singlecell")
    half = m.read(_h5ad(tmp_path / "h.h5ad", X.astype(np.float16)), {})
    full = m.read(_h5ad(tmp_path / "f.h5ad", X), {})
    np.testing.assert_array_equal(half.payload.totals, full.payload.totals)


def _labels(path: Path, rows) -> Path:
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array(
                [dt.datetime(2020, 1, 1) + dt.timedelta(days=r[1]) for r in rows],
                pa.timestamp("us"),
            ),
            "boolean_value": pa.array([r[2] for r in rows], pa.bool_()),
        }
    )
    pq.write_table(table, path)
    return path


def test_labels_with_opposite_values_for_one_prediction_time(tmp_path):
    from healthfm.ehr.reader import read_labels

    path = _labels(tmp_path / "l.parquet", [(1, 0, True), (2, 0, False), (1, 0, False)])
    with pytest.raises(DataError, match="different labels") as err:
        read_labels(path)
    assert err.value.column == "boolean_value" and err.value.row == 2
    read_labels(_labels(tmp_path / "ok.parquet", [(1, 0, True), (1, 1, False)]))


def test_an_empty_label_file_is_an_error_not_zero_rows(tmp_path):
    from healthfm.ehr.reader import read_labels

    with pytest.raises(DataError, match="no rows"):
        read_labels(_labels(tmp_path / "l.parquet", []))


def test_a_1x1_tile_is_refused(tmp_path):
    from PIL import Image

    from healthfm.pathology.reader import read_image

    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "t.png")
    with pytest.raises(DataError, match="1 × 1 pixels"):
        read_image(tmp_path / "t.png")


def test_huge_config_dimensions_are_refused_before_allocating(tmp_path):
    import resource

    from healthfm.errors import ModelError
    from healthfm.model.pretrained import load, save_pretrained

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_model

    folder = tmp_path / "m"
    save_pretrained(tiny_model(), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(d_model=1 << 16, d_ff=1 << 20, vocab_size=1 << 20)
    (folder / "config.json").write_text(json.dumps(config))
    marker = json.loads((folder / MARKER_NAME).read_text())
    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    marker["sha256"]["config.json"] = digest
    (folder / MARKER_NAME).write_text(json.dumps(marker))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelError, match="does not describe these weights"):
        load(folder)  # 64 GiB of token table if it were allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # < 1 GiB


def test_info_of_a_published_folder(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from nt_folders import write_folder

    folder = write_folder(tmp_path / "nt")
    rc = main(["info", f"nucleotide-transformer:{folder}"])
    out = capsys.readouterr().out
    assert rc == 0 and '"modality": "dna"' in out
    rc, err = _run(["info", f"nucleotide-transformer:{tmp_path / 'absent'}"], capsys)
    assert rc == 2 and "nucleotide-transformer model folder does not exist" in err
    # And that published folder is a user's folder: pretrain --out never replaces it.
    before = tree(folder)
    rc, err = _run(["pretrain", "dna", promoters(), "--out", folder, *FAST], capsys)
    assert rc == 2 and tree(folder) == before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_baselines_and_controls_fit_on_empty_constant_and_missing_columns(seed):
    """The MEDS-Tab crash: a column with no observed value in a few-shot subset reached the
    trees' binning ('window shape cannot be larger than input array shape')."""
    from healthfm.ehr.evaluation import _fit_gbm, _fit_gbm_regressor
    from healthfm.evaluate.controls import _gbm_validation

    rng = np.random.default_rng(seed)
    n = 48
    y = np.arange(n) % 2
    X = rng.normal(size=(n, 5))
    X[:, 0] = np.nan  # never observed
    X[:, 1] = 3.0  # constant
    X[: n // 2, 2] = np.nan  # observed only in some rows
    X[5, 3] = np.inf
    tr, va = np.arange(0, 32), np.arange(32, n)
    for cols in (slice(None), [0], [0, 1]):  # all-missing only; constant only
        Z = X[:, cols]
        score = _gbm_validation(Z, y, tr, va, regression=False, seed=seed)
        assert np.isfinite(score)
        proba, _ = _fit_gbm(Z[tr], y[tr], Z[va], y[va], Z[va], seed=seed)
        assert proba.shape == (len(va), 2) and np.isfinite(proba).all()
        pred, _ = _fit_gbm_regressor(Z[tr], y[tr] * 1.0, Z[va], y[va] * 1.0, Z[va], seed=seed)
        assert np.isfinite(pred).all()
    empty = np.zeros((n, 0))
    assert np.isfinite(_gbm_validation(empty, y, tr, va, regression=False, seed=seed))


def test_fault_class_count():
    """The classes of fault this suite injects (for the report): each one is asserted."""
    assert len(FAULT_CLASSES) == len(set(FAULT_CLASSES))


FAULT_CLASSES = [
    "lookalike model folder as --out",
    "user file inside healthfm folder",
    "input as --out",
    "input via symlink as --out",
    "input inside --out",
    "NAME:DIR base as --out",
    "checkpoints without --resume (pretrain)",
    "checkpoints without --resume (finetune)",
    "evaluate over a user's results.json",
    "report over a user's page",
    "tile over a user's thumbnail",
    "embed --out is a folder",
    "non-UTF-8 --out",
    "read-only --out (chmod)",
    "EROFS",
    "ENOSPC",
    "EACCES",
    "full disk before work",
    "OSError during work",
    "unexpected exception",
    "concurrent run (same process)",
    "concurrent run (other process)",
    "kill -9 holding the lock",
    "SIGTERM preparing",
    "SIGTERM training",
    "slide id ..",
    "slide id absolute",
    "slide id symlink",
    "MHIST image name ..",
    "tile source outside",
    "corpus source name ..",
    "changed split salt",
    "changed split file",
    "changed group column",
    "transfer not refused",
    "pickle that runs code",
    "marker without file list",
    "complex h5ad",
    "3e38 counts",
    "sparse index out of range",
    "missing X",
    "X without encoding",
    "byte-string X",
    "float16 X",
    "duplicate opposite labels",
    "empty label file",
    "1x1 tile",
    "huge config.json",
    "info NAME:DIR",
    "GBM on all-missing columns",
    "GBM on constant columns",
    "GBM on no columns",
]
