"""Slide-level learning on bags of tile embeddings: gated attention MIL (Ilse et al. 2018).

A slide is a bag of tile embeddings with one label. Gated ABMIL scores each tile,
``a_i ∝ exp(wᵀ(tanh(V h_i) ⊙ σ(U h_i)))``, pools ``z = Σ a_i h_i`` and classifies ``z``;
the attention ``a_i`` says which tiles drove the prediction and is saved per tile and
drawn as a heat map over the slide thumbnail. The baseline is the mean of the tile
embeddings + logistic regression, on the same splits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from healthfm.errors import DataError, ModelError
from healthfm.evaluate.paired import Prediction, compare
from healthfm.evaluate.results import ResultRow, format_table, rows_from_metrics, write_results
from healthfm.modality import DEFAULT_FRACTIONS, DEFAULT_SALT
from healthfm.report import render_report
from healthfm.report.inputs import provenance, save_inputs


class GatedABMIL(nn.Module):
    """Gated attention-based MIL classifier.

    Parameters
    ----------
    in_dim
        Tile-embedding size.
    n_classes
        Number of slide classes.
    hidden, attn_dim
        Width of the instance projection and of the attention network.
    dropout
        Dropout on the projected instances.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 128,
        attn_dim: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, C)`` and attention ``(B, N)`` (zero at padding) of padded bags ``(B, N, D)``."""
        h = self.project(x)
        scores = self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        z = torch.einsum("bn,bnd->bd", attn, h)
        return self.classifier(z), attn


def pad_bags(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad bags ``[(n_i, D)]`` into ``(B, max n, D)`` and a bool mask."""
    n = max(len(b) for b in bags)
    d = bags[0].shape[1]
    x = np.zeros((len(bags), n, d), dtype=np.float32)
    mask = np.zeros((len(bags), n), dtype=bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


class BagSource:
    """A batch source over bags: padded instances (``x``), their ``mask`` and ``targets``."""

    fingerprint = ""

    def __init__(self, bags: list[np.ndarray], y: np.ndarray) -> None:
        self.bags, self.y = bags, y

    def __len__(self) -> int:
        return len(self.bags)

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        x, mask = pad_bags([self.bags[i] for i in indices])
        return {"x": x, "mask": mask, "targets": torch.from_numpy(self.y[indices]).long()}


class MILLoss(nn.Module):
    """The trainer's loss module: class-weighted cross-entropy of the standardized bags."""

    def __init__(self, model: GatedABMIL, weight: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.weight = weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        x = (batch["x"] - self.model.feat_mean) / self.model.feat_std
        logits, _ = self.model(x, batch["mask"])
        targets = batch["targets"]
        return F.cross_entropy(logits, targets, weight=self.weight), len(targets)


def fit_abmil(
    bags: list[np.ndarray],
    y: np.ndarray,
    n_classes: int,
    seed: int = 0,
    epochs: int = 40,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    **kwargs: Any,
) -> GatedABMIL:
    """Train gated ABMIL on bags with labels ``y`` (class indices); deterministic in ``seed``.

    Features are standardized with the training instances' mean and std (stored in the
    model), class-balanced cross-entropy; trained by the one training loop
    (:class:`~healthfm.train.trainer.Trainer`, one process): AdamW at a constant rate,
    ``epochs`` passes in batches of ``batch_size``, each epoch's order the next
    permutation of one generator seeded by ``seed``.
    """
    from healthfm.train.data import TaskEpochs
    from healthfm.train.distributed import DistInfo
    from healthfm.train.trainer import TrainConfig, Trainer

    torch.manual_seed(seed)
    allx = np.concatenate(bags)
    mean, std = allx.mean(0), allx.std(0) + 1e-6
    model = GatedABMIL(bags[0].shape[1], n_classes, **kwargs)
    model.register_buffer("feat_mean", torch.from_numpy(mean.astype(np.float32)))
    model.register_buffer("feat_std", torch.from_numpy(std.astype(np.float32)))
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weight = torch.tensor(
        np.where(counts > 0, len(y) / np.maximum(counts, 1) / n_classes, 0.0), dtype=torch.float32
    )
    plan = TaskEpochs(np.arange(len(bags)), batch_size, seed, stream=True)
    config = TrainConfig(
        steps=epochs * plan.steps_per_epoch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.999),
        fused=None,
        schedule="constant",
        warmup_steps=0,
        grad_clip=0.0,
        eval_every=0,
        checkpoint_every=0,
        seed=seed,
        progress=False,
    )
    trainer = Trainer(
        model,
        BagSource(bags, y),
        config,
        None,
        dist_info=DistInfo(),
        loss=MILLoss(model, weight),
        batches=plan,
        groups=lambda m: [{"params": list(m.parameters()), "weight_decay": weight_decay}],
        name="abmil",
    )
    trainer.fit()
    model.eval()
    return model


@torch.inference_mode()
def predict_abmil(
    model: GatedABMIL, bags: list[np.ndarray], batch_size: int = 8
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities ``(n_bags, C)`` and each bag's attention over its tiles."""
    model.eval()
    probs, attns = [], []
    for s in range(0, len(bags), batch_size):
        chunk = bags[s : s + batch_size]
        x, mask = pad_bags(chunk)
        x = (x - model.feat_mean) / model.feat_std
        logits, attn = model(x, mask)
        probs.append(torch.softmax(logits, -1).numpy())
        attns.extend(attn[i, : len(b)].numpy().copy() for i, b in enumerate(chunk))
    return np.concatenate(probs), attns


# ---------------------------------------------------------------------- slide evaluation


def _find_h5(features_dir: Path, slide_id: str, where: dict[str, Any] | None = None) -> Path | None:
    """``<slide_id>.h5`` in the features folder (or its ``patches/`` / ``features/``); a
    slide id leading outside it (``..``, absolute, a link) is a DataError naming the row."""
    from healthfm.fsutil import confined

    for sub in (features_dir, features_dir / "patches", features_dir / "features"):
        cand = confined(sub, f"{slide_id}.h5", "slide id", **(where or {}))
        if cand.is_file():
            return cand
    return None


def _find_thumbnail(features_dir: Path, slide_id: str, attrs: dict[str, Any]) -> Path | None:
    """The plain thumbnail written by ``healthfm tile``: by slide id beside the features,
    or by the tile file's ``name`` / ``savetodir`` attributes."""
    from healthfm.fsutil import confined

    names = [slide_id] + ([str(attrs["name"])] if attrs.get("name") else [])
    roots = [features_dir, features_dir.parent]
    if attrs.get("savetodir"):
        roots.append(Path(str(attrs["savetodir"])).parent)
    for root in roots:
        for name in names:
            # Names and folders from the tile file stay inside the features' folder.
            try:
                rel = os.path.relpath(root / "thumbnails" / f"{name}.raw.png", features_dir.parent)
                cand = confined(features_dir.parent, rel)
            except DataError:
                continue
            if cand.is_file():
                return cand
    return None


def read_slide_labels(
    path: str | Path, slide_column: str = "slide_id", label_column: str = "label"
):
    """Read ``slides.csv``: slide id, label and an optional ``split`` column."""
    import polars as pl

    path = Path(path)
    try:
        table = pl.read_csv(path, infer_schema_length=0)
    except Exception as exc:
        raise DataError(f"cannot read the slide labels: {exc}", file=path) from exc
    for col in (slide_column, label_column):
        if col not in table.columns:
            raise DataError(
                f"slide label file lacks column {col!r} (has {table.columns})",
                file=path,
                column=col,
            )
    ids = table[slide_column].to_numpy().astype(str)
    labels = table[label_column].to_numpy()
    missing = np.array([v is None or str(v).strip() == "" for v in labels])
    if missing.any():
        raise DataError(
            "empty label", file=path, column=label_column, row=int(np.flatnonzero(missing)[0])
        )
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(
            f"slide {uniq[counts > 1][0]!r} is listed twice", file=path, column=slide_column
        )
    splits = None
    if "split" in table.columns:
        splits = np.char.lower(table["split"].to_numpy().astype(str))
        bad = ~np.isin(splits, ["train", "val", "test"])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"split must be train, val or test, not {splits[row]!r}",
                file=path,
                column="split",
                row=row,
            )
    return ids, labels.astype(str), splits


def evaluate_slides(
    model_dir: str | Path | None,
    features_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    seeds=(0, 1, 2, 3, 4),
    n_boot: int = 1000,
    slide_column: str = "slide_id",
    label_column: str = "label",
    epochs: int = 40,
    echo: bool = True,
) -> list[ResultRow]:
    """Gated ABMIL vs mean-pooling + logistic regression on slide labels, with CIs.

    Parameters
    ----------
    model_dir
        The model that produced the features (for provenance; may be None).
    features_dir
        Folder of Trident-layout ``<slide_id>.h5`` files with ``features``.
    labels_csv
        ``slide_id,label[,split]``; without ``split`` slides are split by a stratified
        hash (70 / 10 / 20).
    out_dir
        ``results.json``, ``attention/<slide>.h5`` (coords + attention of the seed-0
        model, every slide) and ``heatmaps/<slide>.png`` when a thumbnail is found.
    """
    from healthfm.fsutil import owned_outputs

    t0 = time.perf_counter()
    features_dir, out_dir, labels_csv = Path(features_dir), Path(out_dir), Path(labels_csv)
    # Only files healthfm wrote into --out (listed in its marker) are ever replaced.
    with owned_outputs(out_dir, "the evaluate-slides --out folder") as outputs:
        outputs.claim(out_dir / "results.json")
        return _evaluate_slides(
            model_dir, features_dir, labels_csv, out_dir, seeds, n_boot, slide_column,
            label_column, epochs, echo, t0,
        )  # fmt: skip


def _evaluate_slides(
    model_dir, features_dir, labels_csv, out_dir, seeds, n_boot, slide_column, label_column,
    epochs, echo, t0,
) -> list[ResultRow]:  # fmt: skip
    from healthfm.fsutil import sha256_file
    from healthfm.pathology.split import stratified_split

    _check_model(model_dir)
    ids, labels, splits = read_slide_labels(labels_csv, slide_column, label_column)
    bags, grids = _read_bags(ids, features_dir, labels_csv, slide_column)
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise DataError("slide labels hold a single class", file=labels_csv, column=label_column)
    if splits is None:
        splits = stratified_split(y, ids, DEFAULT_FRACTIONS, salt=DEFAULT_SALT)
    test_idx = np.flatnonzero(splits == "test")
    pool_idx = np.flatnonzero(splits != "test")
    if len(test_idx) == 0 or len(pool_idx) < 2:
        raise DataError("too few slides for a train / test split", file=labels_csv)
    model_hash = sha256_file(Path(model_dir) / "model.safetensors") if model_dir else None
    data_hash = sha256_file(labels_csv)
    mean_feats = np.stack([b.mean(0) for b in bags])
    task = f"{labels_csv.stem}:{label_column}"
    rows: list[ResultRow] = []
    predictions: list = []
    for seed in seeds:
        mil, seed_rows, seed_predictions = _score_seed(
            bags, mean_feats, y, len(classes), pool_idx, test_idx, seed, epochs, n_boot,
            task, model_hash, data_hash,
        )  # fmt: skip
        rows += seed_rows
        predictions += seed_predictions
        if seed == seeds[0]:
            # Attention of the first seed's model over every slide, saved and drawn.
            _save_attention(mil, bags, ids, grids, features_dir, out_dir, labels_csv)
    names = ["balanced_accuracy", "macro_f1", "auroc", "accuracy"]
    comparison = compare(
        predictions,
        y[test_idx],
        ids[test_idx],
        task=task,
        metrics=names,
        primary="balanced_accuracy",
        n_boot=n_boot,
        data_hash=data_hash,
        model_hash=model_hash,
        extra={"level": "slide", "modality": "pathology"},
        unit=f"{len(test_idx)} test slides",
    )
    write_results(out_dir / "results.json", rows + comparison.rows)
    save_inputs(
        out_dir,
        task=task,
        task_type="binary" if len(classes) == 2 else "multiclass",
        classes=[str(c) for c in classes],
        y_test=y[test_idx],
        scores={p.method: p.scores for p in predictions if p.seed == seeds[0]},
        maps={},
        primary="balanced_accuracy",
        reference="mean-pool+logreg",
        info={"provenance": provenance(model_dir, list(seeds), n_boot, data_hash=data_hash)},
    )
    render_report([out_dir], out_dir / "report.html")
    if echo:
        print(format_table([r.to_dict() for r in rows], ["balanced_accuracy", "macro_f1", "auroc"]))
        print(comparison.text())
        print(
            f"results: {out_dir / 'results.json'}, {out_dir / 'report.html'}  ({time.perf_counter() - t0:.1f} s)"
        )
    return rows


def _check_model(model_dir: str | Path | None) -> None:
    # The model is the features' provenance: one of another modality cannot be it.
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return
    from healthfm.model.pretrained import read_config

    found = read_config(model_dir).modality
    if found != "pathology":
        raise ModelError(
            f"this is a {found} model; evaluate-slides needs the pathology model whose "
            "tile features it scores (the one given to healthfm embed)",
            file=Path(model_dir) / "config.json",
            column="modality",
        )


def _read_bags(
    ids: np.ndarray, features_dir: Path, labels_csv: Path, slide_column: str
) -> tuple[list[np.ndarray], list[Any]]:
    # Every slide's tile features (its bag) and tile grid, checked: present, of one width,
    # not empty.
    from healthfm.pathology.tiling import read_tiles_h5

    bags, grids = [], []
    for row, sid in enumerate(ids):
        h5 = _find_h5(features_dir, sid, {"file": labels_csv, "column": slide_column, "row": row})
        if h5 is None:
            raise DataError(
                f"no features file {sid}.h5 for slide {str(sid)!r}",
                file=features_dir,
                column=slide_column,
                row=row,
            )
        grid, feats = read_tiles_h5(h5)
        if feats is None:
            raise DataError(
                "tile file has no 'features' (run healthfm embed first)", file=h5, column="features"
            )
        if bags and feats.shape[1] != bags[0].shape[1]:
            raise DataError(
                f"features have {feats.shape[1]} dims, other slides {bags[0].shape[1]}",
                file=h5,
                column="features",
            )
        if len(feats) == 0:
            raise DataError("slide has no tiles", file=h5, column="features")
        bags.append(feats)
        grids.append(grid)
    return bags, grids


def _score_seed(
    bags: list[np.ndarray],
    mean_feats: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    pool_idx: np.ndarray,
    test_idx: np.ndarray,
    seed: int,
    epochs: int,
    n_boot: int,
    task: str,
    model_hash: str | None,
    data_hash: str,
) -> tuple[GatedABMIL, list[ResultRow], list]:
    # One seed: gated ABMIL on the pool and mean pooling + logistic regression (probe-val
    # cut per class), both scored on the test slides.
    from healthfm.evaluate.metrics import classification_metrics
    from healthfm.evaluate.probe import align_proba, fit_linear_probe
    from healthfm.pathology.split import stratified_pool_split

    tr, va = stratified_pool_split(y, pool_idx, seed)
    t = time.perf_counter()
    mil = fit_abmil([bags[i] for i in pool_idx], y[pool_idx], n_classes, seed=seed, epochs=epochs)
    proba, _ = predict_abmil(mil, [bags[i] for i in test_idx])
    methods = {"gated-abmil": (proba, False, time.perf_counter() - t)}
    t = time.perf_counter()
    probe = fit_linear_probe(
        mean_feats[tr], y[tr], mean_feats[va], y[va], mean_feats[test_idx], seed=seed
    )
    methods["mean-pool+logreg"] = (
        align_proba(probe.proba, probe.classes, np.arange(n_classes)),
        True,
        time.perf_counter() - t,
    )
    rows: list[ResultRow] = []
    predictions: list = []
    for method, (scores, is_baseline, wall) in methods.items():
        # ABMIL has no validation cut (it trains on the whole pool): NaN, and with one
        # baseline there is nothing to choose between.
        val = probe.val_metrics.get("balanced_accuracy", np.nan) if is_baseline else np.nan
        predictions.append(Prediction(method, is_baseline, seed, scores, val))
        metrics = classification_metrics(y[test_idx], scores, seed=seed, n_boot=n_boot)
        rows += rows_from_metrics(
            metrics,
            names=["balanced_accuracy", "macro_f1", "auroc", "accuracy"],
            task=task,
            method=method,
            is_baseline=is_baseline,
            n_test=len(test_idx),
            seed=seed,
            model_hash=model_hash,
            data_hash=data_hash,
            wall_seconds=wall,
            extra={"level": "slide", "n_train": len(pool_idx), "modality": "pathology"},
        )
    return mil, rows, predictions


def _save_attention(
    mil: GatedABMIL,
    bags: list[np.ndarray],
    ids: np.ndarray,
    grids: list[Any],
    features_dir: Path,
    out_dir: Path,
    labels_csv: Path,
) -> None:
    # The model's attention over every slide's tiles (attention/<slide>.h5), drawn over
    # the slide's thumbnail when one is found (heatmaps/<slide>.png).
    from healthfm.fsutil import confined
    from healthfm.pathology.tiling import draw_grid, write_png, write_tiles_h5

    _, attns = predict_abmil(mil, bags)
    for sid, grid, attn in zip(ids, grids, attns, strict=True):
        write_tiles_h5(
            confined(out_dir / "attention", f"{sid}.h5", "slide id", file=labels_csv),
            grid,
            datasets={"attention": attn.astype(np.float32)},
        )
        thumb = _find_thumbnail(features_dir, sid, grid.attrs)
        if thumb is not None:
            from PIL import Image

            with Image.open(thumb) as im:
                low = np.asarray(im.convert("RGB"))
            ds = float(
                grid.attrs.get(
                    "thumbnail_downsample",
                    grid.attrs.get("level0_width", low.shape[1]) / low.shape[1],
                )
            )
            write_png(
                confined(out_dir / "heatmaps", f"{sid}.png", "slide id", file=labels_csv),
                draw_grid(low, ds, grid.coords, int(grid.attrs["patch_size_level0"]), attn),
            )
