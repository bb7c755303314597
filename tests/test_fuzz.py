"""Fuzz harness (issue 16): every reader and the CLI's argument layer, on damaged input.

Inputs are the bundled real files, damaged by hypothesis: truncation, byte flips, bytes
inserted (separators, quotes, NUL, newlines), empty and huge fields, wrong types. Each
call must either succeed with valid output or raise one of healthfm's typed errors
naming a file; never another exception. A failed CLI command must leave its ``--out``
as it was (absent, or the user's content untouched).

Seeded (``derandomize``) and bounded (``max_examples``) so CI runs the same examples in
a bounded time on every machine; no deadline (shared CI machines are slow at times).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from healthfm.cli import main
from healthfm.errors import HealthFMError

DATA = Path(__file__).resolve().parent.parent / "src" / "healthfm" / "data"
FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

# ---------------------------------------------------------------------- damage
INSERTS = [b"\t", b",", b'"', b"\n", b"\r\n", b"\x00", b">", b"\xff\xfe", b"NaN", b"A" * 70_000]


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """``data`` after 1-3 damages: truncation, byte flips, insertions, deletions."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "empty"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "truncate":
            del out[pos:]
        elif kind == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            out[pos:pos] = draw(st.sampled_from(INSERTS))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 64))]
        elif kind == "empty":
            out = bytearray()
    return bytes(out)


def expect_typed(call):
    """Run ``call``: success, or a HealthFMError naming a file; anything else fails."""
    try:
        return call()
    except HealthFMError as exc:
        assert exc.file, f"{type(exc).__name__} names no file: {exc}"
        return None


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _fresh(tmp_path: Path, data: bytes) -> Path:
    # One folder per example (hypothesis reuses the function's tmp_path).
    folder = tmp_path / hashlib.sha256(data).hexdigest()[:16]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------- readers
PROMOTERS = (DATA / "dna" / "promoters.tsv").read_bytes()[:4000]
FASTA = b"".join(
    b">s%d desc\n%s\n" % (i, line.split(b"\t")[0])
    for i, line in enumerate(PROMOTERS.splitlines()[1:20])
)


@FUZZ
@given(data=damaged(PROMOTERS), suffix=st.sampled_from([".tsv", ".csv", ".txt"]))
def test_dna_table_reader(tmp_path, data, suffix):
    from healthfm.dna.reader import read_table

    path = _write(_fresh(tmp_path, data + suffix.encode()), "t" + suffix, data)
    samples = expect_typed(lambda: read_table(path))
    if samples is not None:  # valid output: one key, group and label per sample
        assert len(samples.keys) == len(samples.labels) == len(samples.payload) > 0
        assert len(set(samples.keys.tolist())) == len(samples.keys)


@FUZZ
@given(data=damaged(FASTA))
def test_dna_fasta_reader(tmp_path, data):
    from healthfm.dna.reader import read_fasta

    path = _write(_fresh(tmp_path, data), "s.fa", data)
    samples = expect_typed(lambda: read_fasta(path))
    if samples is not None:
        assert len(samples.keys) == len(samples.payload) > 0


MEDS = DATA / "ehr" / "synthetic_meds"
MEDS_FILES = ["data/0.parquet", "metadata/codes.parquet", "metadata/subject_splits.parquet"]


@FUZZ
@given(which=st.sampled_from(MEDS_FILES), seed=st.integers(0, 2**16), cut=st.floats(0, 1))
def test_meds_reader(tmp_path, which, seed, cut):
    from healthfm.modality import get_modality

    root = _fresh(tmp_path, f"{which}{seed}{cut}".encode()) / "meds"
    shutil.copytree(MEDS, root)
    path = root / which
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.integers(0, len(raw), 8):  # byte flips, then maybe a truncation
        raw[int(i)] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(raw[: max(1, int(len(raw) * cut))] if cut < 0.5 else raw))
    ehr = get_modality("ehr")

    def read_and_scan():
        samples = ehr.read(root, {})
        split = np.asarray(ehr.split(samples, "healthfm", (0.7, 0.1, 0.2)))
        return ehr.fit_tokenizer(samples, np.flatnonzero(split == "train"), {})

    tokenizer = expect_typed(read_and_scan)
    if tokenizer is not None:
        assert tokenizer.vocab_size > 0


LABELS = next((MEDS / "task_labels").glob("*/labels.parquet")).read_bytes()


@FUZZ
@given(data=damaged(LABELS))
def test_meds_label_reader(tmp_path, data):
    from healthfm.ehr.reader import read_labels

    path = _write(_fresh(tmp_path, data), "labels.parquet", data)
    labels = expect_typed(lambda: read_labels(path))
    if labels is not None:
        assert labels.frame.height == len(labels.subject_ids)


H5AD = (DATA / "singlecell" / "celltypist_sample_counts.h5ad").read_bytes()


@settings(FUZZ, max_examples=15)
@given(seed=st.integers(0, 2**16), cut=st.floats(0, 1))
def test_h5ad_reader(tmp_path, seed, cut):
    from healthfm.singlecell.reader import read_h5ad

    raw = bytearray(H5AD)
    rng = np.random.default_rng(seed)
    for i in rng.integers(0, len(raw), 16):
        raw[int(i)] ^= 1 << int(rng.integers(0, 8))
    data = bytes(raw[: max(1, int(len(raw) * cut))] if cut < 0.3 else raw)
    path = _write(_fresh(tmp_path, data), "cells.h5ad", data)
    samples = expect_typed(lambda: read_h5ad(path))
    if samples is not None:
        assert len(samples.keys) > 0 and len(set(samples.keys.tolist())) == len(samples.keys)


TILE = next((DATA / "pathology" / "kather2016_samples" / "01_TUMOR").glob("*.tif"))


@settings(FUZZ, max_examples=15)
@given(data=damaged(TILE.read_bytes()), suffix=st.sampled_from([".tif", ".png", ".jpg"]))
def test_tile_set_reader(tmp_path, data, suffix):
    from healthfm.pathology.reader import read_image
    from healthfm.pathology.tilesets import read_tile_set

    root = _fresh(tmp_path, data + suffix.encode()) / "tiles"
    for cls in ("a", "b"):
        shutil.copytree(TILE.parent, root / cls, ignore=lambda d, names: names[2:])
    bad = _write(root, "a/damaged" + suffix, data)
    tiles = expect_typed(lambda: read_tile_set(root))
    if tiles is not None:
        assert len(tiles.keys) >= 4
    image = expect_typed(lambda: read_image(bad))
    if image is not None:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


# ---------------------------------------------------------------------- model folders
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "model"
    argv = ["pretrain", "dna", str(DATA / "dna" / "promoters.tsv"), "--out", str(out)]
    assert main([*argv, "--steps", "1", "--batch-size", "8", "--eval-every", "0"]) == 0
    return out


@FUZZ
@given(
    which=st.sampled_from(
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "training_info.json",
            ".healthfm.json",
        ]
    ),
    seed=st.integers(0, 2**16),
    marker=st.booleans(),
)
def test_model_folder_loading(model_dir, tmp_path, which, seed, marker):
    import healthfm

    folder = _fresh(tmp_path, f"{which}{seed}{marker}".encode()) / "m"
    shutil.copytree(model_dir, folder)
    if not marker:  # an earlier version's folder: the strict checks alone must hold
        (folder / ".healthfm.json").unlink()
    path = folder / which
    if path.exists():
        raw = bytearray(path.read_bytes())
        rng = np.random.default_rng(seed)
        raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
        if rng.random() < 0.3:
            raw = raw[: int(rng.integers(0, len(raw)))]
        path.write_bytes(bytes(raw))
    model = expect_typed(lambda: healthfm.load(folder))
    if model is not None:
        assert len(model.model_hash) == 64


# ---------------------------------------------------------------------- the CLI
VALUES = ["0", "-1", "1", "2", "8", "1e9", "nan", "inf", "-0.5", "x", "", "3.5", "1e-3"]
PRETRAIN_FLAGS = [
    "--lr",
    "--warmup-steps",
    "--micro-batch-size",
    "--checkpoint-every",
    "--eval-every",
    "--grad-clip",
    "--weight-decay",
    "--checkpoint-minutes",
    "--stop-at",
    "--k",
    "--stride",
    "--num-workers",
]
OUT_STATES = ["absent", "user_folder", "user_file", "empty_folder"]


def _out_state(folder: Path, state: str) -> tuple[Path, object]:
    out = folder / "out"
    if state == "user_folder":
        out.mkdir()
        (out / "mine.txt").write_text("precious")
    elif state == "user_file":
        out.write_text("precious")
    elif state == "empty_folder":
        out.mkdir()
    return out, _snapshot(out)


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return sorted(
        (str(p.relative_to(path)), p.read_bytes()) for p in path.rglob("*") if p.is_file()
    )


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: a usage error, exit 2
            rc = exc.code
    return rc, err.getvalue()


@settings(FUZZ, max_examples=12)
@given(
    flags=st.lists(st.tuples(st.sampled_from(PRETRAIN_FLAGS), st.sampled_from(VALUES)), max_size=3),
    state=st.sampled_from(OUT_STATES),
)
def test_cli_pretrain_arguments(tmp_path, flags, state):
    folder = _fresh(tmp_path, repr((flags, state)).encode())
    out, before = _out_state(folder, state)
    argv = ["pretrain", "dna", str(DATA / "dna" / "promoters.tsv"), "--out", str(out)]
    argv += ["--steps", "1", "--batch-size", "8"]
    for flag, value in flags:
        if flag == "--num-workers" and value not in ("0", "-1", "x", ""):
            value = "0"  # worker processes would only slow the harness down
        argv += [flag, value]
    rc, err = _cli(argv)
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc == 0:
        assert (out / "model.safetensors").is_file() or (folder / "out.run").is_dir()
    else:
        assert err.strip(), "a failure says why"
        assert _snapshot(out) == before, "a failed command changed its --out"
        assert not (folder / "out.run").exists(), "a failed command left its run folder"


TOKENIZE_FLAGS = ["--k", "--stride", "--sequence-column", "--label-column", "--key-column"]
TEXT = ["sequence", "label", "none", "nope", "", "0", "-3", "6", "x" * 300]


@settings(FUZZ, max_examples=20)
@given(
    flags=st.lists(st.tuples(st.sampled_from(TOKENIZE_FLAGS), st.sampled_from(TEXT)), max_size=3),
    state=st.sampled_from(OUT_STATES),
    command=st.sampled_from(["tokenize", "embed"]),
)
def test_cli_tokenize_and_embed_arguments(model_dir, tmp_path, flags, state, command):
    folder = _fresh(tmp_path, repr((flags, state, command)).encode())
    out, before = _out_state(folder, state)
    table = str(DATA / "dna" / "promoters.tsv")
    if command == "embed":
        out = out if state != "absent" else folder / "out.parquet"
        before = _snapshot(out)
        argv = ["embed", str(model_dir), table, "--out", str(out)]
    else:
        argv = ["tokenize", "dna", table, "--out", str(out)]
    for flag, value in flags:
        if command == "embed" and flag in ("--k", "--stride"):
            continue  # the model's tokenizer decides those
        argv += [flag, value]
    rc, err = _cli(argv)
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc != 0:
        assert err.strip()
        assert _snapshot(out) == before, "a failed command changed its --out"
