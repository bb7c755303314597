"""Gated ABMIL on bags whose positive instances are known by construction.

These bags are synthetic on purpose: negative bags hold only "background" instances,
positive bags additionally hold 1–3 instances shifted along a fixed direction. The
learner must classify held-out bags and put its attention on exactly those instances,
which real slides (without tile annotations) cannot verify.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from healthfm.errors import DataError
from healthfm.evaluate.metrics import classification_metrics
from healthfm.pathology.mil import GatedABMIL, evaluate_slides, fit_abmil, pad_bags, predict_abmil
from healthfm.pathology.tiling import TileGrid, tile_slide, write_tiles_h5


def constructed_bags(n_bags: int, seed: int, dim: int = 16, size: int = 20):
    """Bags of Gaussian instances; odd bags get 1–3 instances shifted by +2.5 on a fixed unit direction."""
    rng = np.random.default_rng(seed)
    direction = np.ones(dim) / np.sqrt(dim)
    bags, labels, positives = [], [], []
    for b in range(n_bags):
        n = int(rng.integers(size // 2, size + 1))
        x = rng.normal(size=(n, dim)).astype(np.float32)
        pos = np.zeros(n, dtype=bool)
        if b % 2:
            k = int(rng.integers(1, 4))
            where = rng.choice(n, size=k, replace=False)
            x[where] += (2.5 * direction * np.sqrt(dim) / 2).astype(np.float32)
            pos[where] = True
        bags.append(x)
        labels.append(b % 2)
        positives.append(pos)
    return bags, np.array(labels), positives


def test_padding_does_not_change_attention():
    torch.manual_seed(0)
    model = GatedABMIL(4, 2).eval()
    bag = torch.randn(1, 5, 4)
    alone, attn_alone = model(bag)
    x, mask = pad_bags([bag[0].numpy(), np.zeros((9, 4), np.float32)])
    padded, attn = model(x, mask)
    assert torch.allclose(alone, padded[:1], atol=1e-6)
    assert torch.allclose(attn_alone, attn[:1, :5], atol=1e-6) and (attn[0, 5:] == 0).all()


def test_abmil_finds_the_constructed_positive_instances():
    train, y_train, _ = constructed_bags(80, seed=0)
    test, y_test, positives = constructed_bags(40, seed=1)
    model = fit_abmil(train, y_train, 2, seed=0, epochs=30)
    proba, attns = predict_abmil(model, test)
    auroc = classification_metrics(y_test, proba, n_boot=0, metrics=["auroc"])["auroc"].value
    assert auroc > 0.95
    # In positive bags the most-attended instance is one of the inserted positives.
    hits = [pos[np.argmax(a)] for a, pos, lab in zip(attns, positives, y_test, strict=True) if lab]
    assert np.mean(hits) >= 0.9
    assert all(np.isclose(a.sum(), 1.0, atol=1e-5) for a in attns)


def test_abmil_is_deterministic():
    bags, y, _ = constructed_bags(12, seed=2)
    a = predict_abmil(fit_abmil(bags, y, 2, seed=3, epochs=3), bags)[0]
    b = predict_abmil(fit_abmil(bags, y, 2, seed=3, epochs=3), bags)[0]
    assert np.array_equal(a, b)


def _write_slides(root, svs, tmp_path, n=16):
    """Trident files of constructed bags laid on the real slide's tile grid."""
    _, grid = tile_slide(svs, tmp_path / "tiles", mpp=1.0, size=112)
    bags, labels, positives = constructed_bags(n, seed=4, size=len(grid))
    lines = ["slide_id,label"]
    for i, (bag, lab) in enumerate(zip(bags, labels, strict=True)):
        sub = TileGrid(grid.coords[: len(bag)], grid.tissue_fraction[: len(bag)], grid.attrs)
        write_tiles_h5(root / f"s{i:02d}.h5", sub, bag)
        lines.append(f"s{i:02d},{'tumor' if lab else 'normal'}")
    (tmp_path / "slides.csv").write_text("\n".join(lines) + "\n")
    return positives


def test_evaluate_slides_writes_rows_attention_and_heatmaps(svs, tmp_path):
    feats = tmp_path / "tiles"
    _write_slides(feats, svs, tmp_path)
    out = tmp_path / "eval"
    rows = evaluate_slides(
        None, feats, tmp_path / "slides.csv", out, seeds=(0, 1), n_boot=50, epochs=10, echo=False
    )
    methods = {r.method for r in rows}
    assert methods == {"gated-abmil", "mean-pool+logreg"}
    assert {r.seed for r in rows} == {0, 1}
    saved = [
        r for r in json.loads((out / "results.json").read_text()) if r.get("row_type") != "delta"
    ]  # method rows
    assert len(saved) == len(rows) and any(r["is_baseline"] for r in saved)
    with h5py.File(out / "attention" / "s03.h5", "r") as h5:
        attn = h5["attention"][:]
        assert attn.shape == (h5["coords"].shape[0],) and np.isclose(attn.sum(), 1.0, atol=1e-5)
    # Thumbnails found beside the features folder: one heat map per slide.
    assert len(list((out / "heatmaps").glob("*.png"))) == 16


def test_evaluate_slides_bad_input(svs, tmp_path):
    feats = tmp_path / "tiles"
    _write_slides(feats, svs, tmp_path, n=6)
    csv = tmp_path / "slides.csv"
    csv.write_text(csv.read_text() + "missing_slide,tumor\n")
    with pytest.raises(DataError, match="missing_slide") as info:
        evaluate_slides(None, feats, csv, tmp_path / "o", seeds=(0,), n_boot=0, echo=False)
    assert info.value.row == 6
    (tmp_path / "nolabel.csv").write_text("slide_id,diagnosis\ns00,a\n")
    with pytest.raises(DataError, match="lacks column 'label'"):
        evaluate_slides(None, feats, tmp_path / "nolabel.csv", tmp_path / "o", echo=False)
    # A coordinates-only file (never embedded) is refused with a hint.
    (tmp_path / "one.csv").write_text("slide_id,label\nCMU-1-Small-Region,a\ns00,b\n")
    with pytest.raises(DataError, match="healthfm embed"):
        evaluate_slides(
            None, tmp_path / "tiles" / "patches", tmp_path / "one.csv", tmp_path / "o", echo=False
        )
