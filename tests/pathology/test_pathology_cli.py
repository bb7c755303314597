"""The pathology commands end to end on the bundled real files (tiny settings)."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import polars as pl
import pytest

from healthfm.cli import main
from healthfm.inference import load_embeddings
from healthfm.modality import get_modality, modality_names
from healthfm.pathology import PathologyModality


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, kather):
    out = tmp_path_factory.mktemp("cli") / "model"
    code = main(
        [
            "pretrain",
            "pathology",
            str(kather),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--patch-size",
            "8",
            "--eval-every",
            "1",
            "--checkpoint-every",
            "2",
        ]
    )
    assert code == 0
    return out


def test_registered():
    assert "pathology" in modality_names()
    assert isinstance(get_modality("pathology"), PathologyModality)


def test_pretrain_writes_model_folder(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["objective"] == "mae" and config["input_dim"] == 192 and config["max_len"] == 17
    info = json.loads((model_dir / "training_info.json").read_text())
    # 3 tiles per class leave no val tiles after the stratified test split: no held-out loss.
    assert info["steps"] == 2 and info["n_train"] == 17 and info["n_val"] == 0
    assert json.loads((model_dir / "tokenizer.json").read_text())["type"] == "pathology.patches"


def test_tile_command(svs, tmp_path, capsys):
    assert main(["tile", str(svs), "--out", str(tmp_path), "--mpp", "1.0", "--size", "112"]) == 0
    assert "tiles of 112 px" in capsys.readouterr().out
    assert (tmp_path / "patches" / "CMU-1-Small-Region.h5").is_file()
    assert main(["tile", str(svs), "--out", str(tmp_path / "x"), "--mpp", "0.1"]) == 2
    assert "finest level" in capsys.readouterr().err
    assert not (tmp_path / "x" / "patches").exists()


def test_embed_slide_then_evaluate_slides(model_dir, svs, tmp_path):
    out = tmp_path / "feats"
    assert (
        main(
            ["embed", str(model_dir), str(svs), "--out", str(out), "--mpp", "1.0", "--size", "112"]
        )
        == 0
    )
    with h5py.File(out / "CMU-1-Small-Region.h5", "r") as h5:
        assert h5["features"].shape == (h5["coords"].shape[0], 128)
        assert h5["features"].attrs["pooling"] == "mean"
        feats = h5["features"][:]
    assert np.isfinite(feats).all() and feats.std(0).mean() > 0
    # Embedding again from the tile files alone (Trident coords) gives the same features.
    again = tmp_path / "feats2"
    assert main(["embed", str(model_dir), str(out / "patches"), "--out", str(again)]) == 0
    with h5py.File(again / "CMU-1-Small-Region.h5", "r") as h5:
        assert np.allclose(h5["features"][:], feats, atol=1e-5)
    lines = ["slide_id,label"]
    for i in range(8):
        shutil.copyfile(out / "CMU-1-Small-Region.h5", out / f"copy{i}.h5")
        lines.append(f"copy{i},{'a' if i % 2 else 'b'}")
    (tmp_path / "slides.csv").write_text("\n".join(lines) + "\n")
    res = tmp_path / "mil"
    assert (
        main(
            [
                "evaluate-slides",
                str(model_dir),
                str(out),
                "--labels",
                str(tmp_path / "slides.csv"),
                "--out",
                str(res),
                "--seeds",
                "0",
                "--n-boot",
                "20",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    rows = [
        r for r in json.loads((res / "results.json").read_text()) if r.get("row_type") != "delta"
    ]  # method rows
    assert {r["method"] for r in rows} == {"gated-abmil", "mean-pool+logreg"}
    assert (res / "heatmaps" / "copy0.png").is_file()


def test_embed_and_evaluate_tiles(model_dir, kather, tmp_path):
    out = tmp_path / "emb"
    assert main(["embed", str(model_dir), str(kather), "--out", str(out)]) == 0
    keys, emb = load_embeddings(out / "embeddings.parquet")
    assert emb.shape == (24, 128) and len(set(keys)) == 24
    manifest = pl.read_csv(out / "manifest.csv")
    assert manifest.columns == ["key", "origin", "label", "split", "row"] and manifest.height == 24
    res = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(model_dir),
                str(kather),
                "--out",
                str(res),
                "--seeds",
                "0",
                "--n-boot",
                "20",
            ]
        )
        == 0
    )
    rows = [
        r for r in json.loads((res / "results.json").read_text()) if r.get("row_type") != "delta"
    ]  # method rows
    methods = {r["method"]: r["is_baseline"] for r in rows}
    assert methods == {
        "tiny-mae-mean+logreg": False,
        "colour-histogram+logreg": True,
        "downsampled-pixels+logreg": True,
        "tiny-untrained-mae-mean+logreg": False,  # control: the ViT untrained
        "tiny-mae-mean⊕colour-histogram+logreg": False,  # control: model ⊕ strongest baseline
    }
    assert {r["metric"] for r in rows} >= {"balanced_accuracy", "macro_f1", "auroc"}
    # Every method is scored on the same test tiles.
    assert len({r["n_test"] for r in rows}) == 1
    split = pl.read_csv(res / "embeddings" / "manifest.csv")["split"].to_list()
    assert split.count("test") == rows[0]["n_test"]


def test_tokenize_is_refused_clearly(kather, tmp_path, capsys):
    assert main(["tokenize", "pathology", str(kather), "--out", str(tmp_path / "s")]) == 2
    assert "not tokenized into a token store" in capsys.readouterr().err


def test_embed_pcam_folder(model_dir, kather, tmp_path):
    from healthfm.pathology.tilesets import read_class_folders

    tiles = read_class_folders(kather)
    pixels = tiles.load(np.arange(24), 96).numpy()
    root = tmp_path / "pcam"
    root.mkdir()
    for split, sel in (("train", slice(0, 16)), ("test", slice(16, 24))):
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as h5:
            h5["x"] = pixels[sel]
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as h5:
            h5["y"] = np.zeros((len(pixels[sel]), 1, 1, 1), np.uint8)
    assert main(["embed", str(model_dir), str(root), "--out", str(tmp_path / "e")]) == 0
    keys, emb = load_embeddings(tmp_path / "e" / "embeddings.parquet")
    assert emb.shape == (24, 128) and keys[0] == "train:0" and keys[-1] == "test:7"


def test_tile_folder_of_slides(pyramid, tmp_path, capsys):
    path, _ = pyramid
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copyfile(path, folder / "a.tif")
    shutil.copyfile(path, folder / "b.tiff")
    (folder / "notes.txt").write_text("not a slide")
    assert (
        main(
            [
                "tile",
                str(folder),
                "--out",
                str(tmp_path / "out"),
                "--mpp",
                "1.0",
                "--size",
                "128",
                "--min-tissue",
                "0",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out" / "patches").iterdir()) == ["a.h5", "b.h5"]
    assert main(["tile", str(tmp_path / "out" / "thumbnails"), "--out", str(tmp_path / "o2")]) == 2
    assert "no slide files" in capsys.readouterr().err


def test_finetune_tiles_full_and_lora_then_evaluate(model_dir, kather, tmp_path):
    # 24 tiles, 8 classes: too few to learn anything; this checks the plumbing end to end.
    base = ["finetune", str(model_dir), str(kather), "--epochs", "1", "--batch-size", "8"]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0
    assert main([*base, "--out", str(tmp_path / "lora"), "--lora", "--lora-rank", "2"]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    res = tmp_path / "eval"
    argv = ["evaluate", str(model_dir), str(kather), "--out", str(res), "--seeds", "0"]
    argv += ["--n-boot", "20", "--finetuned", str(tmp_path / "full"), str(tmp_path / "lora")]
    assert main(argv) == 0
    rows = json.loads((res / "results.json").read_text())
    n_test = {r["method"]: r["n_test"] for r in rows}
    assert {"tiny-finetune-full", "tiny-finetune-lora"} <= set(n_test)
    assert len(set(n_test.values())) == 1  # the same test tiles as the probe and baselines
    # An adapter folder is accepted wherever a model folder is.
    assert main(["embed", str(tmp_path / "lora"), str(kather), "--out", str(tmp_path / "e")]) == 0
    _, emb = load_embeddings(tmp_path / "e" / "embeddings.parquet")
    assert emb.shape == (24, 128)


def test_slide_folder_embeds_a_part_per_slide_and_resumes(
    model_dir, pyramid, tmp_path, monkeypatch
):
    """Each slide is one part: a run that dies on the second slide leaves the first one
    finished (its HDF5 and record), and --resume embeds only the second."""
    from healthfm.modality import get_modality

    path, _ = pyramid
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copyfile(path, folder / "a.tif")
    shutil.copyfile(path, folder / "b.tif")
    args = ["embed", str(model_dir), str(folder), "--mpp", "1.0", "--size", "112"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    modality = get_modality("pathology")
    real = type(modality.embedding).embed_part
    calls = []

    def dies_on_the_second_slide(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, mid-run
        return real(self, *a, **k)

    out = tmp_path / "feats"
    monkeypatch.setattr(type(modality.embedding), "embed_part", dies_on_the_second_slide)
    assert main([*args, "--out", str(out)]) == 130  # "interrupted"
    first = out / "a.h5"
    assert first.is_file() and not (out / "b.h5").exists()
    assert (tmp_path / "feats.parts" / "part-000000.json").is_file()
    stamp = first.stat().st_mtime_ns
    calls.clear()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert len(calls) == 1 and first.stat().st_mtime_ns == stamp  # only b was embedded
    assert not (tmp_path / "feats.parts").exists()
    for name in ("a.h5", "b.h5"):
        with h5py.File(out / name) as got, h5py.File(tmp_path / "whole" / name) as want:
            np.testing.assert_allclose(got["features"][:], want["features"][:], atol=1e-5)
