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
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import healthfm.pathology.mae  # noqa: F401  (registers the "mae" objective)
from healthfm.errors import ConfigError, DataError
from healthfm.modality import (
    BaselineFn,
    Commands,
    Embedding,
    EmbeddingInput,
    EvaluationRows,
    Modality,
    Pretraining,
    Samples,
    TaskRule,
    assign_splits,
    embed_samples,
    register_modality,
    require_labels,
)
from healthfm.pathology.baselines import BASELINES
from healthfm.pathology.options import PathologyOptions
from healthfm.pathology.reader import (
    IMAGE_SUFFIXES,
    OPENSLIDE_SUFFIXES,
    TIFF_SUFFIXES,
)
from healthfm.pathology.source import TileSource, embed_tiles
from healthfm.pathology.split import stratified_split
from healthfm.pathology.tilesets import PCAM_RE, TileSet, read_tile_set, slide_tile_set
from healthfm.pathology.tiling import find_slides, read_tiles_h5, tile_slide, write_tiles_h5
from healthfm.pathology.tokenizer import PatchTokenizer
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES


def _tile_one(slide: Path, tile_dir: str | Path, options: PathologyOptions) -> Path:
    """Tile one slide with the tiling options; the tile HDF5 path."""
    return tile_slide(
        slide,
        tile_dir,
        options.mpp,
        options.size,
        options.overlap,
        options.min_tissue,
        options.slide_mpp,
    )[0]


def tile_files(path: str | Path) -> list[Path]:
    """The tile HDF5 files of ``healthfm tile``'s output (Trident layout): a ``.h5`` file,
    a folder of them, or a tile output folder with ``patches/*.h5``; [] for anything else
    (PatchCamelyon's ``.h5`` pairs are a tile set, not tile files)."""
    path = Path(path)
    if path.is_file():
        ok = path.suffix.lower() == ".h5" and not PCAM_RE.search(path.name)
        return [path] if ok else []
    if not path.is_dir():
        return []
    for folder in (path, path / "patches"):
        found = sorted(p for p in folder.glob("*.h5") if not PCAM_RE.search(p.name))
        if found:
            return found
    return []


def _tile_pairs(h5s: list[Path]) -> list[tuple[Path, Path]]:
    """(tile file, slide) of each tile file: the slide its ``source`` attribute names."""
    pairs = []
    for h5 in h5s:
        grid, _ = read_tiles_h5(h5)
        src = grid.attrs.get("source")
        src = _slide_of_source(src, h5) if src else src
        if not src or not Path(src).is_file():
            raise DataError(
                "tile file does not name an existing slide in its 'source' attribute "
                f"({src!r}); the slide must stay where healthfm tile read it",
                file=h5,
                column="source",
            )
        pairs.append((h5, Path(src)))
    return pairs


def _slide_of_source(source: Any, h5: Path) -> Path:
    """The slide a tile file's ``source`` attribute names: ``healthfm tile`` records the
    slide's absolute path; a relative one is confined to the tile file's folder. Either
    must be a slide file (by suffix), never another file a hostile tile file points at."""
    from healthfm.fsutil import confined

    text = str(source)
    path = Path(text) if os.path.isabs(text) else confined(h5.parent, text, "slide", file=h5)
    real = Path(os.path.realpath(path))
    if real.suffix.lower() not in SLIDE_SUFFIXES or path.suffix.lower() not in SLIDE_SUFFIXES:
        raise DataError(
            f"the tile file's 'source' {text!r} is not a slide file ({', '.join(SLIDE_SUFFIXES)}); "
            "healthfm reads only slides through it",
            file=h5,
            column="source",
        )
    return path


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


def _patches(tokenizer: Tokenizer) -> PatchTokenizer:
    if not isinstance(tokenizer, PatchTokenizer):
        raise ConfigError(
            f"the pathology modality needs a pathology.patches tokenizer, got "
            f"{getattr(tokenizer, 'type', type(tokenizer).__name__)}"
        )
    return tokenizer


class PathologyPretraining(Pretraining):
    """Pathology pretraining: tiles cut from slides into the run folder, the MAE mask ratio, tiles decoded on the fly, and the mean-patch count baseline."""

    modality: PathologyModality

    def count_baseline(
        self, tokenizer: Tokenizer, train: Any, val: Any, n_val: int
    ) -> dict[str, Any] | None:
        """MAE's count baseline: every hidden patch predicted by the mean training patch at
        its position (:func:`~healthfm.pathology.mae.mean_patch_baseline`)."""
        from healthfm.pathology.mae import mean_patch_baseline

        return mean_patch_baseline(train, val, n_val)

    # ------------------------------------------------------------------ pretraining
    def prepare_options(self, options: PathologyOptions, workdir: Path) -> PathologyOptions:
        """Tiles cut from slide inputs go to ``workdir/tiles`` unless ``--tile-dir`` says."""
        return options.replace(tile_dir=options.tile_dir or str(Path(workdir) / "tiles"))

    def training_overrides(self, options: PathologyOptions) -> dict[str, Any]:
        """The MAE mask ratio (``--mask-ratio``) is the objective's mask fraction."""
        mask_ratio = float(self.modality.options(options).mask_ratio)
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(
                f"--mask-ratio must be in (0, 1), not {mask_ratio}", column="mask_ratio"
            )
        return {"mask_prob": mask_ratio}

    def batch_source(
        self,
        tokenizer: Tokenizer,
        samples: Samples,
        indices: np.ndarray,
        *,
        training: bool,
        workdir: Path,
    ) -> TileSource:
        """Tiles decoded on the fly (H&E augmentations for training batches only)."""
        return TileSource(samples.payload, _patches(tokenizer), indices, augment=training)

    def info(
        self, tokenizer: Tokenizer, train_config: Any, summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Tiles per second, the MAE settings and the patches seen."""
        n_tokens = _patches(tokenizer).n_tokens * train_config.batch_size * summary["steps"]
        return {
            "tiles_per_s": summary["steps"]
            * train_config.batch_size
            / max(summary["wall_seconds"], 1e-9),
            "objective": "mae",
            "mask_ratio": train_config.mask_prob,
            "tokens_seen": int(n_tokens),
        }


class PathologyEmbedding(Embedding):
    """Pathology embedding: one input per slide (a Trident-layout ``.h5``), or a tile set written as ``embeddings.parquet`` with an eva-style manifest."""

    modality: PathologyModality

    # ------------------------------------------------------------------ embedding
    def inputs(
        self, path: str | Path, options: PathologyOptions, out: Path, encoder: Any
    ) -> list[EmbeddingInput]:
        """Slides (a slide, a folder of slides, or a folder of ``.h5`` tile files written by
        ``healthfm tile``, whose ``source`` attribute names the slide): one input per slide,
        written to ``out/<slide>.h5`` (a slide is tiled by the process that embeds it). A
        tile set: one input, ``out/embeddings.parquet``."""
        options = self.modality.options(options)
        path, out = Path(path), Path(out)
        # Tile files from `healthfm tile` (a file, a folder of them, or its output folder).
        h5_inputs = tile_files(path)
        if not (is_slide_input(path) or h5_inputs):
            return [
                EmbeddingInput(
                    str(path), out / "embeddings.parquet", lambda: self.modality.read(path, options)
                )
            ]
        if h5_inputs:
            pairs = _tile_pairs(h5_inputs)
        else:
            pairs = [(None, s) for s in find_slides(path)]  # tiled when opened

        def opener(h5: Path | None, slide: Path) -> Callable[[], Samples]:
            def open_slide() -> Samples:
                written: list[Path] = []
                if h5 is None:
                    tile_dir = Path(options.tile_dir or out)
                    tiles_h5 = _tile_one(slide, tile_dir, options)
                    # What this run wrote for the slide: removed if embedding it fails.
                    thumbs = tile_dir / "thumbnails"
                    written = [
                        tiles_h5,
                        thumbs / f"{slide.stem}.png",
                        thumbs / f"{slide.stem}.raw.png",
                    ]
                else:
                    tiles_h5 = h5
                tiles = slide_tile_set([tiles_h5], [slide], options.slide_mpp)
                grid, _ = read_tiles_h5(tiles_h5)
                return _tile_samples(slide, tiles, {"grid": grid, "written": written})

            return open_slide

        return [
            EmbeddingInput(str(slide), out / f"{slide.stem}.h5", opener(h5, slide), whole=True)
            for h5, slide in pairs
        ]

    def prepare(self, encoder: Any, samples: Samples, options: PathologyOptions) -> None:
        """The encoder's tile and patch sizes, recorded with the features."""
        tok = _patches(encoder.tokenizer)
        samples.info["patches"] = {"image_size": tok.image_size, "patch_size": tok.patch_size}

    def tokenize_part(
        self,
        encoder: Any,
        samples: Samples,
        indices: np.ndarray,
        options: PathologyOptions,
        workdir: Path,
    ) -> TileSource:
        """The part's tiles, decoded on the fly as they are embedded (not augmented)."""
        tok = _patches(encoder.tokenizer)
        return TileSource(samples.payload, tok, indices, augment=False, cache=False)

    def embed_part(
        self,
        encoder: Any,
        samples: Samples,
        part: TileSource,
        options: PathologyOptions,
        pooling: str | None,
        batch_size: int,
        bf16: bool = False,
        compile: bool = False,
    ) -> np.ndarray:
        """Frozen-backbone embedding of every tile of the part (``--num-workers`` decode;
        ``compile`` is not applied)."""
        workers = int(self.modality.options(options).num_workers or 0)
        return embed_tiles(encoder, part, batch_size, pooling, bf16, workers)

    def write(
        self,
        out: Path,
        samples: Samples,
        embeddings: np.ndarray,
        attrs: dict[str, Any],
        options: PathologyOptions,
    ) -> Path:
        """A slide: Trident-layout HDF5 with ``features``. A tile set: ``embeddings.parquet``
        + an eva-style ``manifest.csv`` + ``embeddings.json``."""
        from healthfm.fsutil import atomic_write_text
        from healthfm.inference import save_embeddings
        from healthfm.pathology.evaluation import write_manifest

        feature_attrs = {
            "model_hash": attrs.get("model_hash") or "",
            "pooling": attrs["pooling"],
            **samples.info["patches"],
        }
        if "grid" in samples.info:
            write_tiles_h5(out, samples.info["grid"], embeddings, feature_attrs)
            return out
        folder = out.parent
        columns = {"label": samples.labels.tolist()} if samples.labels is not None else None
        save_embeddings(out, samples.keys.tolist(), embeddings, columns)
        write_manifest(folder, samples, None, feature_attrs)
        atomic_write_text(
            folder / "embeddings.json",
            json.dumps(
                {
                    **feature_attrs,
                    "n": len(embeddings),
                    "dim": embeddings.shape[1],
                    "source": str(samples.source),
                },
                indent=2,
            )
            + "\n",
        )
        return out

    def embed_rows(
        self,
        encoder: Any,
        samples: Samples,
        rows: EvaluationRows,
        pooling: str | None,
        batch_size: int,
    ) -> np.ndarray:
        """Every tile's embedding (kept for ``embeddings/`` beside the results)."""
        emb = embed_samples(self.modality, encoder, samples, rows.options, pooling, batch_size)
        from healthfm.pathology.evaluation import TileRowsInfo

        rows.info = TileRowsInfo(samples, emb)
        return emb


class PathologyCommands(Commands):
    """``healthfm tile`` and ``healthfm evaluate-slides``."""

    modality: PathologyModality

    def add(self, subparsers: Any) -> None:
        """``healthfm tile`` and ``healthfm evaluate-slides``."""
        from healthfm.pathology.commands import add_commands

        add_commands(subparsers)

    def run(self, args: argparse.Namespace) -> bool:
        from healthfm.pathology.commands import run_command

        return run_command(args)


class PathologyModality(Modality):
    """H&E tiles and whole-slide images."""

    name = "pathology"
    pretraining_class = PathologyPretraining
    embedding_class = PathologyEmbedding
    commands_class = PathologyCommands
    options_class = PathologyOptions
    input_kind = "slides, a tile folder or the output of healthfm tile"

    def looks_like(self, path: Path) -> bool | None:
        """Slides, images, tile files, folders of them; not a table, FASTA, h5ad or MEDS."""
        path = Path(path)
        if path.is_dir():
            meds = (path / "metadata" / "codes.parquet").is_file() or any(
                (path / "data").glob("*.parquet")
            )
            return False if meds else None
        suffix = path.suffix.lower()
        if suffix in SLIDE_SUFFIXES + IMAGE_SUFFIXES + (".h5",):
            return True
        return (
            False if suffix in (".tsv", ".csv", ".txt", ".fa", ".fasta", ".h5ad", ".gz") else None
        )

    objective = "mae"
    default_pooling = "mean"
    embedding_method = "{preset}-mae-{pooling}+{probe}"
    numeric_labels_regress = False  # tile classes are folders, even when named 0..N

    # ------------------------------------------------------------------ reading
    def read(self, path: str | Path, options: PathologyOptions) -> Samples:
        """Read a tile set (class folders / PCam / MHIST) or tile slides (file or folder)."""
        options = self.options(options)
        path = Path(path)
        if not path.exists():
            raise DataError("no such file or folder", file=path)
        h5s = tile_files(path)
        if h5s:  # the output of `healthfm tile`: tile → coordinates → features
            pairs = _tile_pairs(h5s)
            slides = [slide for _, slide in pairs]
            tiles = slide_tile_set(h5s, slides, options.slide_mpp)
            info = {"h5": h5s, "slides": slides}
        elif is_slide_input(path):
            tile_dir = options.tile_dir
            info: dict[str, Any] = {}
            if tile_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="healthfm-tiles-")
                info["_tmp"] = tmp  # removed when the samples are garbage-collected
                tile_dir = tmp.name
            slides = find_slides(path)
            h5s = [_tile_one(s, tile_dir, options) for s in slides]
            tiles = slide_tile_set(h5s, slides, options.slide_mpp)
            info.update({"h5": h5s, "slides": slides, "tile_dir": Path(tile_dir)})
        else:
            tiles = read_tile_set(path, options.test_dir)
            info = {}
        label_column = "class" if tiles.labels is not None else None
        return _tile_samples(path, tiles, info, label_column)

    def fit_tokenizer(
        self, samples: Samples, train_idx: np.ndarray, options: PathologyOptions
    ) -> PatchTokenizer:
        """Patches are fixed, nothing is fitted: image and patch size from the options."""
        options = self.options(options)
        return PatchTokenizer(int(options.image_size), int(options.patch_size))

    def fit_corpus_tokenizer(
        self, parts: list[tuple[Samples, np.ndarray]], options: PathologyOptions
    ) -> PatchTokenizer:
        """Patches are fixed whatever the sources: tile sets and slide folders from several
        places pretrain one model (each source split by its own slides or groups)."""
        return self.fit_tokenizer(parts[0][0], parts[0][1], options)

    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tiles are pixels, not token ids: they are never written to a token store."""
        raise ConfigError(
            "pathology tiles are not tokenized into a token store; pretrain, embed and "
            "evaluate read the tiles directly (healthfm pretrain pathology / embed / evaluate)"
        )

    def model_defaults(
        self, tokenizer: Tokenizer, samples: Samples, options: PathologyOptions
    ) -> dict[str, Any]:
        """Patch input size and context length of the tokenizer; MAE decoder settings."""
        tok = _patches(tokenizer)
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

    # ------------------------------------------------------------------ evaluation
    def evaluation_rows(
        self,
        samples: Samples,
        options: PathologyOptions,
        salt: str,
        fractions: tuple[float, float, float],
        task_rule: TaskRule,
    ) -> EvaluationRows:
        """One row per tile, classified (the set's official split when it has one); the
        task is named after the tile folder."""
        rows = super().evaluation_rows(samples, options, salt, fractions, task_rule)
        rows.task = f"{Path(samples.source).name}:{samples.label_column}"
        return rows

    def evaluation_protocol(self, options: PathologyOptions) -> Any:
        """eva's protocol: five repeated probes, probe-val drawn per class, balanced
        accuracy first; the tile embeddings are kept beside the results."""
        from healthfm.pathology.evaluation import TileProbeProtocol

        return TileProbeProtocol()

    # ------------------------------------------------------------------ fine-tuning, demo
    def task_input(
        self,
        samples: Samples,
        options: PathologyOptions,
        model: Any,
        salt: str,
        fractions: tuple[float, float, float],
    ) -> Any:
        """Fine-tuning rows are the tiles: the evaluation's split, tiles decoded (and cached
        when they fit) by a :class:`TileSource` that augments training batches only."""
        from healthfm.modality import TaskInput

        if samples.labels is None:
            require_labels(samples)  # the shared "no label column" error
        source = TileSource(samples.payload, _model_tokenizer(model), augment=True, cache=True)
        return TaskInput(samples, self.split(samples, salt, tuple(fractions)), source)

    def demo_spec(self, quick: bool) -> Any:
        """Tile the bundled slide, MAE-pretrain, probe the Kather tiles, MIL on bags."""
        from healthfm.pathology.demo import demo_spec

        return demo_spec(quick)


def _tile_samples(
    source: Path, tiles: TileSet, info: dict[str, Any], label_column: str | None = None
) -> Samples:
    """Samples of a tile set: one per tile, grouped and keyed as the tile set says."""
    return Samples(
        source=source,
        keys=tiles.keys,
        groups=tiles.groups,
        labels=tiles.labels,
        payload=tiles,
        data_hash=tiles.data_hash,
        label_column=label_column,
        info=info,
    )


MODALITY = register_modality(PathologyModality())


def _model_tokenizer(model: Any) -> PatchTokenizer:
    return _patches(model.tokenizer)
