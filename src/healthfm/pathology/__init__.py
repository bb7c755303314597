"""The pathology modality: whole-slide images and tiles → ViT embeddings, probes and MIL.

* ``healthfm tile SLIDE_OR_DIR --mpp 0.5 --size 224 --out DIR`` — tissue detection and
  tiling into Trident-layout HDF5 files (see :mod:`healthfm.pathology.tiling`) with a
  thumbnail per slide.
* ``healthfm pretrain pathology TILES_OR_SLIDES --out MODEL`` — MAE pretraining of a ViT
  (the core backbone with a patch embedder) on tiles, with H&E augmentations.
* ``healthfm embed MODEL SLIDE_OR_TILES --out DIR`` — Trident HDF5 with ``features`` per
  slide, or ``embeddings.parquet`` + ``manifest.csv`` for a tile set.
* ``healthfm evaluate MODEL TILE_DIR --out DIR`` — eva-style linear probe over repeated
  runs next to colour-histogram and raw-pixel baselines.
* ``healthfm evaluate-slides MODEL FEATURES_DIR --labels slides.csv --out DIR`` — gated
  ABMIL vs mean pooling, with attention heat maps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.modality import BaselineFn, Modality, Samples, assign_splits, register_modality
from healthfm.pathology import mae as _mae  # noqa: F401  (registers the "mae" objective)
from healthfm.pathology.baselines import BASELINES
from healthfm.pathology.reader import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, open_slide, read_image
from healthfm.pathology.source import TileSource, embed_tiles
from healthfm.pathology.split import stratified_pool_split, stratified_split
from healthfm.pathology.tilesets import PCAM_RE, TileSet, read_tile_set, slide_tile_set
from healthfm.pathology.tiling import find_slides, read_tiles_h5, tile_slide, write_tiles_h5
from healthfm.pathology.tokenizer import PatchTokenizer
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

__all__ = [
    "PatchTokenizer",
    "PathologyModality",
    "TileSet",
    "TileSource",
    "embed_tiles",
    "open_slide",
    "pretrain_tiles",
    "read_image",
    "read_tile_set",
    "tile_slide",
]

SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES
CLASSIFICATION_METRICS = ["balanced_accuracy", "macro_f1", "auroc", "accuracy"]

_DEFAULTS = {
    "mpp": 0.5,
    "size": 224,
    "overlap": 0,
    "min_tissue": 0.5,
    "image_size": 224,
    "patch_size": 16,
    "mask_ratio": 0.75,
}


def _opt(options: dict[str, Any], name: str) -> Any:
    value = options.get(name)
    return _DEFAULTS.get(name) if value is None else value


def _tile_one(slide: Path, tile_dir: str | Path, options: dict[str, Any]) -> Path:
    """Tile one slide with the CLI's tiling options; the tile HDF5 path."""
    return tile_slide(
        slide,
        tile_dir,
        _opt(options, "mpp"),
        _opt(options, "size"),
        _opt(options, "overlap"),
        _opt(options, "min_tissue"),
        options.get("slide_mpp"),
    )[0]


def is_slide_input(path: str | Path) -> bool:
    """Whether ``path`` is a slide file or a folder of slide files (not a tile set)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in SLIDE_SUFFIXES
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    has_class_dirs = any(p.is_dir() and not p.name.startswith(".") for p in entries)
    has_slides = any(p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES for p in entries)
    return has_slides and not has_class_dirs


class PathologyModality(Modality):
    """H&E tiles and whole-slide images."""

    name = "pathology"
    objective = "mae"
    default_pooling = "mean"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Tiling, tile-set and patching options."""
        g = (
            parser.add_argument_group("pathology")
            if hasattr(parser, "add_argument_group")
            else parser
        )
        g.add_argument(
            "--mpp",
            type=float,
            default=None,
            help="target microns per pixel of tiles cut from slides (default 0.5)",
        )
        g.add_argument(
            "--size", type=int, default=None, help="tile side in pixels at --mpp (default 224)"
        )
        g.add_argument(
            "--overlap", type=int, default=None, help="tile overlap in pixels (default 0)"
        )
        g.add_argument(
            "--min-tissue",
            type=float,
            default=None,
            help="minimum tissue fraction of a tile (default 0.5)",
        )
        g.add_argument(
            "--slide-mpp",
            type=float,
            default=None,
            help="microns per level-0 pixel when the slide does not say",
        )
        g.add_argument(
            "--test-dir",
            default=None,
            help="tile folder used as the official test split (e.g. CRC-VAL-HE-7K)",
        )
        g.add_argument(
            "--image-size",
            type=int,
            default=None,
            help="tiles are resized to this side for the model (default 224)",
        )
        g.add_argument("--patch-size", type=int, default=None, help="ViT patch side (default 16)")
        g.add_argument(
            "--mask-ratio",
            type=float,
            default=None,
            help="MAE: fraction of patches hidden (default 0.75)",
        )
        g.add_argument(
            "--tile-dir",
            default=None,
            help="where tiles of slide inputs go (default: a run or temporary folder)",
        )

    # ------------------------------------------------------------------ reading
    def read(self, path: str | Path, options: dict[str, Any]) -> Samples:
        """Read a tile set (class folders / PCam / MHIST) or tile slides (file or folder)."""
        path = Path(path)
        if not path.exists():
            raise DataError("no such file or folder", file=path)
        if is_slide_input(path):
            tile_dir = options.get("tile_dir")
            info: dict[str, Any] = {}
            if tile_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="healthfm-tiles-")
                info["_tmp"] = tmp  # removed when the samples are garbage-collected
                tile_dir = tmp.name
            slides = find_slides(path)
            h5s = [_tile_one(s, tile_dir, options) for s in slides]
            tiles = slide_tile_set(h5s, slides, options.get("slide_mpp"))
            info.update({"h5": h5s, "slides": slides, "tile_dir": Path(tile_dir)})
        else:
            tiles = read_tile_set(path, options.get("test_dir"))
            info = {}
        return Samples(
            source=path,
            keys=tiles.keys,
            groups=tiles.groups,
            labels=tiles.labels,
            payload=tiles,
            data_hash=tiles.data_hash,
            label_column="class" if tiles.labels is not None else None,
            info=info,
        )

    def fit_tokenizer(
        self, samples: Samples, train_idx: np.ndarray, options: dict
    ) -> PatchTokenizer:
        """Patches are fixed, nothing is fitted: image and patch size from the options."""
        return PatchTokenizer(int(_opt(options, "image_size")), int(_opt(options, "patch_size")))

    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tiles are pixels, not token ids: they are never written to a token store."""
        raise ConfigError(
            "pathology tiles are not tokenized into a token store; pretrain, embed and "
            "evaluate read the tiles directly (healthfm pretrain pathology / embed / evaluate)"
        )

    def model_defaults(self, tokenizer: Tokenizer, samples: Samples) -> dict[str, Any]:
        """Patch input size and context length of the tokenizer; MAE decoder settings."""
        tok = self._patches(tokenizer)
        return {
            "input_dim": tok.input_dim,
            "max_len": tok.n_tokens,
            "extra": {"image_size": tok.image_size, "patch_size": tok.patch_size},
        }

    def baselines(self) -> dict[str, BaselineFn]:
        """Colour histogram and downsampled pixels, each + logistic regression."""
        return dict(BASELINES)

    def split(
        self, samples: Samples, salt: str, fractions: tuple[float, float, float]
    ) -> np.ndarray:
        """Official splits when the set has them (val carved from train by group hash),
        else a class-stratified group-hash split (labelled) or a group-hash split."""
        tiles: TileSet = samples.payload
        if tiles.splits is not None:
            out = tiles.splits.astype("<U5").copy()
            if not (out == "val").any():
                train = out == "train"
                val_frac = fractions[1] / max(fractions[0] + fractions[1], 1e-9)
                if samples.labels is not None:
                    sub = stratified_split(
                        samples.labels[train],
                        samples.groups[train],
                        (1 - val_frac, 0.0, val_frac),
                        salt,
                    )
                    out[np.flatnonzero(train)[sub == "test"]] = "val"
                else:
                    sub = assign_splits(samples.groups[train], (1 - val_frac, val_frac, 0.0), salt)
                    out[np.flatnonzero(train)[sub == "val"]] = "val"
            return out
        if samples.labels is not None:
            return stratified_split(samples.labels, samples.groups, fractions, salt)
        return assign_splits(samples.groups, fractions, salt)

    # ------------------------------------------------------------------ hooks
    def pretrain_command(self, input_path: Path, out: Path, options: dict, **kwargs: Any) -> Path:
        """``healthfm pretrain pathology``: MAE on tiles (see :func:`pretrain_tiles`)."""
        import inspect

        # Pass on the settings pretrain_tiles knows (the shared signature may grow).
        known = inspect.signature(pretrain_tiles).parameters
        return pretrain_tiles(
            input_path, out, options, **{k: v for k, v in kwargs.items() if k in known}
        )

    def embed_command(
        self, model: Any, input_path: Path, out: Path, options: dict, **kwargs: Any
    ) -> Path:
        """Slides → Trident HDF5 with ``features``; tile sets → parquet + manifest."""
        return embed_input(model, input_path, out, options, **kwargs)

    def evaluate_command(
        self, model_dir: Path | None, input_path: Path, out_dir: Path, options: dict, **kwargs: Any
    ) -> list:
        """eva-style tile classification: frozen embeddings + linear probe vs baselines."""
        return evaluate_tiles(model_dir, input_path, out_dir, options, **kwargs)

    def task_input(
        self,
        samples: Samples,
        options: dict,
        model: Any,
        salt: str,
        fractions: tuple[float, float, float],
    ) -> Any:
        """Fine-tuning rows are the tiles: the evaluation's split, tiles decoded (and cached
        when they fit) by a :class:`TileSource` that augments training batches only."""
        from healthfm.modality import TaskInput, require_labels

        if samples.labels is None:
            require_labels(samples)  # the shared "no label column" error
        source = TileSource(samples.payload, _model_tokenizer(model), augment=True, cache=True)
        return TaskInput(samples, self.split(samples, salt, tuple(fractions)), source)

    def run_demo(self, out: Path, quick: bool) -> Any:
        """Tile the bundled slide, MAE-pretrain, embed, probe vs baselines, MIL on bags."""
        from healthfm.pathology.demo import run_demo

        return run_demo(out, quick)

    @staticmethod
    def _patches(tokenizer: Tokenizer) -> PatchTokenizer:
        if not isinstance(tokenizer, PatchTokenizer):
            raise ConfigError(
                f"the pathology modality needs a pathology.patches tokenizer, got "
                f"{getattr(tokenizer, 'type', type(tokenizer).__name__)}"
            )
        return tokenizer

    def add_commands(self, subparsers: Any) -> None:
        """``healthfm tile`` and ``healthfm evaluate-slides``."""
        from healthfm.pathology.commands import add_commands

        add_commands(subparsers)

    def run_command(self, args: argparse.Namespace) -> bool:
        from healthfm.pathology.commands import run_command

        return run_command(args)


MODALITY = register_modality(PathologyModality())


# ---------------------------------------------------------------------- pretraining


def pretrain_tiles(
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    preset: str = "tiny",
    train_config: Any = None,
    resume: bool = False,
    run_dir: str | Path | None = None,
    salt: str = "healthfm",
    fractions=(0.7, 0.1, 0.2),
    model_overrides: dict[str, Any] | None = None,
    stop_at: int | None = None,
) -> Path:
    """MAE-pretrain a ViT on the train split of tiles (a tile set, or tiles cut from slides).

    Parameters mirror :func:`healthfm.pipeline.pretrain`. Slides are tiled into
    ``run_dir/tiles`` (Trident HDF5 + thumbnails) first. Training draws batches from a
    :class:`TileSource` (augmented, masked from the trainer's per-step generator, so
    ``--resume`` continues exactly). Writes the model folder with ``tokenizer.json``.
    """
    import torch

    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel
    from healthfm.model.pretrained import save_pretrained
    from healthfm.pipeline import json_safe
    from healthfm.train.trainer import TrainConfig, Trainer

    options = dict(options or {})
    train_config = train_config or TrainConfig()
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    options.setdefault("tile_dir", str(run_dir / "tiles"))
    t0 = time.perf_counter()
    samples = MODALITY.read(input_path, options)
    split_names = MODALITY.split(samples, salt, tuple(fractions))
    train_idx, val_idx = (
        np.flatnonzero(split_names == "train"),
        np.flatnonzero(split_names == "val"),
    )
    if len(train_idx) < train_config.batch_size:
        raise ConfigError(
            f"the train split has {len(train_idx)} tiles, fewer than one batch of "
            f"{train_config.batch_size}; lower --batch-size",
            column="batch_size",
        )
    tokenizer = MODALITY.fit_tokenizer(samples, train_idx, options)
    train_src = TileSource(samples.payload, tokenizer, train_idx, augment=True)
    val_src = (
        TileSource(samples.payload, tokenizer, val_idx, augment=False) if len(val_idx) else None
    )
    defaults = MODALITY.model_defaults(tokenizer, samples)
    overrides = dict(model_overrides or {})
    extra = {**defaults.pop("extra"), **overrides.pop("extra", {})}
    config = ModelConfig.from_preset(
        preset,
        modality="pathology",
        vocab_size=tokenizer.vocab_size,
        objective="mae",
        pooling=MODALITY.default_pooling,
        extra=extra,
        **{**defaults, **overrides},
    )
    mask_ratio = float(_opt(options, "mask_ratio"))
    if not 0.0 < mask_ratio < 1.0:
        raise ConfigError(f"--mask-ratio must be in (0, 1), not {mask_ratio}", column="mask_ratio")
    train_config = dataclasses.replace(train_config, mask_prob=mask_ratio)
    torch.manual_seed(train_config.seed)
    model = FoundationModel(config)
    trainer = Trainer(model, train_src, train_config, run_dir, val_store=val_src)
    summary = trainer.fit(resume=resume, stop_at=stop_at)
    done = summary["steps"] >= train_config.steps
    # Under FSDP every rank must take part in gathering the weights.
    export = getattr(trainer, "export_model", None)
    final = export() if export is not None and done else model
    if trainer.info.is_main and done:
        n_tokens = tokenizer.n_tokens * train_config.batch_size * train_config.steps
        save_pretrained(
            final,
            out,
            tokenizer,
            info={
                **summary,
                "tiles_per_s": summary["steps"]
                * train_config.batch_size
                / max(summary["wall_seconds"], 1e-9),
                "data_hash": samples.data_hash,
                "source": str(samples.source),
                "split_salt": salt,
                "split_fractions": list(fractions),
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "train_config": json_safe(dataclasses.asdict(train_config)),
                "parameters": model.num_parameters(),
                "objective": "mae",
                "mask_ratio": mask_ratio,
                "tokens_seen": int(n_tokens),
                "total_seconds": time.perf_counter() - t0,
            },
        )
    return out


# ---------------------------------------------------------------------- embedding


def _model_tokenizer(model: Any) -> PatchTokenizer:
    return PathologyModality._patches(model.tokenizer)


def embed_input(
    model: Any,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any],
    pooling: str | None = None,
    batch_size: int = 64,
    bf16: bool = False,
    num_workers: int = 0,
    **_: Any,
) -> Path:
    """Embed slides (→ ``out/<slide>.h5`` in Trident layout with ``features``) or a tile set
    (→ ``out/embeddings.parquet`` + ``out/manifest.csv``).

    Slide input may be a slide, a folder of slides, or a folder of ``.h5`` tile files
    written by ``healthfm tile`` (``--slides`` then says where the slides are: the
    ``source`` attribute is used otherwise).
    """
    from healthfm.evaluate.embed import save_embeddings
    from healthfm.fsutil import atomic_write_text

    tok = _model_tokenizer(model)
    input_path, out = Path(input_path), Path(out)
    feature_attrs = {
        "model_hash": getattr(model, "model_hash", "") or "",
        "pooling": pooling or model.config.pooling,
        "image_size": tok.image_size,
        "patch_size": tok.patch_size,
    }
    # A folder of tile files from `healthfm tile` (PatchCamelyon's .h5 pairs are a tile set).
    h5_inputs = (
        sorted(p for p in input_path.glob("*.h5") if not PCAM_RE.search(p.name))
        if input_path.is_dir()
        else []
    )
    if is_slide_input(input_path) or h5_inputs:
        if h5_inputs:
            pairs = []
            for h5 in h5_inputs:
                grid, _ = read_tiles_h5(h5)
                src = grid.attrs.get("source")
                if not src or not Path(src).is_file():
                    raise DataError(
                        "tile file does not name an existing slide in its 'source' attribute",
                        file=h5,
                        column="source",
                    )
                pairs.append((h5, Path(src)))
        else:
            tile_dir = Path(options.get("tile_dir") or out)
            pairs = [(_tile_one(s, tile_dir, options), s) for s in find_slides(input_path)]
        for h5, slide in pairs:
            tiles = slide_tile_set([h5], [slide], options.get("slide_mpp"))
            src = TileSource(tiles, tok, augment=False, cache=False)
            feats = embed_tiles(model, src, batch_size, pooling, bf16, num_workers)
            grid, _ = read_tiles_h5(h5)
            target = out / f"{slide.stem}.h5"
            write_tiles_h5(target, grid, feats, feature_attrs)
        return out
    samples = MODALITY.read(input_path, options)
    src = TileSource(samples.payload, tok, augment=False, cache=False)
    emb = embed_tiles(model, src, batch_size, pooling, bf16, num_workers)
    columns = {"label": samples.labels.tolist()} if samples.labels is not None else None
    save_embeddings(out / "embeddings.parquet", samples.keys.tolist(), emb, columns)
    _write_manifest(out, samples, None, feature_attrs)
    atomic_write_text(
        out / "embeddings.json",
        json.dumps(
            {**feature_attrs, "n": len(emb), "dim": emb.shape[1], "source": str(input_path)},
            indent=2,
        )
        + "\n",
    )
    return out


def _write_manifest(
    out: Path, samples: Samples, splits: np.ndarray | None, attrs: dict[str, Any]
) -> Path:
    """eva-style manifest: one row per tile — key, origin file, label, split, embedding row."""
    import polars as pl

    from healthfm.fsutil import atomic_write_bytes

    tiles: TileSet = samples.payload
    origin = tiles.paths if tiles.paths is not None else tiles.keys
    table = pl.DataFrame(
        {
            "key": samples.keys.astype(str),
            "origin": np.asarray(origin).astype(str),
            "label": samples.labels.astype(str)
            if samples.labels is not None
            else [""] * len(samples),
            "split": splits.astype(str) if splits is not None else [""] * len(samples),
            "row": np.arange(len(samples)),
        }
    )
    atomic_write_bytes(out / "manifest.csv", table.write_csv().encode())
    return out / "manifest.csv"


# ---------------------------------------------------------------------- evaluation


def evaluate_tiles(
    model_dir: str | Path | None,
    input_path: str | Path,
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    seeds=(0, 1, 2, 3, 4),
    n_boot: int = 1000,
    pooling: str | None = None,
    batch_size: int = 64,
    salt: str = "healthfm",
    fractions=(0.7, 0.1, 0.2),
    include_baselines: bool = True,
    echo: bool = True,
    model: Any = None,
    finetuned=(),
    **_: Any,
) -> list:
    """eva-style evaluation of tile classification.

    The frozen backbone embeds every tile once (``out_dir/embeddings/embeddings.parquet``
    + ``manifest.csv`` with the split of each tile); for each seed the non-test pool is
    re-split (per class) into probe-train / probe-val, a logistic regression is tuned on
    probe-val, refit and scored on the fixed test split with bootstrap CIs. The colour
    histogram and raw-pixel baselines get exactly the same splits. Rows → ``results.json``.
    """
    from healthfm.evaluate.embed import save_embeddings
    from healthfm.evaluate.results import format_table, write_results
    from healthfm.modality import require_labels
    from healthfm.pipeline import finetuned_folders, probe_rows

    t0 = time.perf_counter()
    options = dict(options or {})
    out_dir = Path(out_dir)
    if model is None and model_dir is not None:
        from healthfm.pipeline import load_for

        model, _ = load_for("pathology", model_dir)
    samples = MODALITY.read(input_path, options)
    split_names = MODALITY.split(samples, salt, tuple(fractions))
    labels = require_labels(samples, np.where(split_names == "val", "train", split_names))
    classes, y = np.unique(labels, return_inverse=True)
    test_idx = np.flatnonzero(split_names == "test")
    pool_idx = np.flatnonzero(split_names != "test")
    task = f"{Path(input_path).name}:{samples.label_column}"
    features: dict[str, tuple[np.ndarray, bool, dict]] = {}
    seconds: dict[str, float] = {}
    model_hash = getattr(model, "model_hash", None)
    if model is not None:
        t = time.perf_counter()
        tok = _model_tokenizer(model)
        emb = embed_tiles(
            model,
            TileSource(samples.payload, tok, augment=False, cache=False),
            batch_size,
            pooling,
            num_workers=int(options.get("num_workers") or 0),
        )
        pool_name = pooling or model.config.pooling
        name = f"{model.config.preset or 'vit'}-mae-{pool_name}+logreg"
        features[name] = (emb, False, {})
        seconds[name] = time.perf_counter() - t
        emb_dir = out_dir / "embeddings"
        save_embeddings(
            emb_dir / "embeddings.parquet",
            samples.keys.tolist(),
            emb,
            {"label": labels.tolist(), "split": split_names.tolist()},
        )
        _write_manifest(emb_dir, samples, split_names, {})
    if include_baselines:
        for name, featurize in BASELINES.items():
            t = time.perf_counter()
            features[name] = (np.asarray(featurize(samples, pool_idx), dtype=np.float32), True, {})
            seconds[name] = time.perf_counter() - t
    if not features:
        raise ConfigError("nothing to evaluate: no model and --no-baselines")
    rows = probe_rows(
        features,
        seconds,
        y,
        len(classes),
        test_idx,
        samples,
        seeds,
        lambda seed: stratified_pool_split(y, pool_idx, seed),
        task,
        n_boot,
        model_hash,
        {"modality": "pathology", "level": "tile"},
        metrics=CLASSIFICATION_METRICS,
    )
    ft_dirs = finetuned_folders(finetuned, model_dir, model)
    if ft_dirs:
        from healthfm.evaluate.finetune import finetuned_rows

        rows += finetuned_rows(
            ft_dirs,
            MODALITY,
            samples,
            test_idx,
            classes,
            task,
            n_boot=n_boot,
            batch_size=batch_size,
            metrics=list(CLASSIFICATION_METRICS),
            source_for=lambda m: TileSource(
                samples.payload, _model_tokenizer(m), test_idx, augment=False, cache=False
            ),
            salt=salt,
            fractions=tuple(fractions),
        )
    write_results(out_dir / "results.json", rows)
    if echo:
        print(format_table([r.to_dict() for r in rows], CLASSIFICATION_METRICS[:3]))
        print(f"results: {out_dir / 'results.json'}  ({time.perf_counter() - t0:.1f} s)")
    return rows
