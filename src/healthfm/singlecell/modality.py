"""The single-cell modality: AnnData counts, Geneformer / scGPT tokens, HVG+PCA baselines.

* Reading: ``.h5ad`` (optionally backed), counts in ``X`` or ``--layer``, genes in
  ``var_names`` or ``--gene-column``, validated (:mod:`healthfm.singlecell.reader`); a
  TileDB-SOMA experiment (CELLxGENE Census format), read in blocks of cells, optionally
  filtered (``--obs-filter``) (:mod:`healthfm.singlecell.soma`).
* Corpora: several sources with different gene panels share one vocabulary
  (:meth:`SingleCellModality.fit_corpus_tokenizer`, :mod:`healthfm.singlecell.corpus`).
* Tokens: rank-value encoding (``--tokenizer rank``, default, Geneformer) or value
  binning (``--tokenizer binned``, scGPT), fitted on the training cells only
  (:mod:`healthfm.singlecell.tokenizer`). Pretraining is masked gene modelling through the
  shared masked objective (for binned tokens it also hides the masked tokens' values).
* Splits: by ``--group-column`` (donor, sample) when given; otherwise, with a label column,
  stratified by label (each class cut 70/10/20 by a hash of the barcode); otherwise by a
  hash of the barcode. Give pretraining the same ``--label-column`` as evaluation so both
  hold out the same test cells.
* Evaluation: linear probe next to ``hvg-pca+logreg`` and ``lognorm+logreg``
  (:mod:`healthfm.singlecell.baselines`), plus k-NN probes and zero-shot k-means
  clustering (ARI, NMI) of the embedding next to the same on HVG+PCA.
* scverse API: :mod:`healthfm.scverse` (``fit`` and ``tl.embed``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.modality import (
    BaselineFn,
    DemoSpec,
    Embedding,
    EmbeddingInput,
    Modality,
    Samples,
    _unit_interval,
    assign_splits,
    next_power_of_two,
    register_modality,
    survival_options,
)
from healthfm.singlecell.baselines import BASELINES
from healthfm.singlecell.corpus import fit_corpus, resolve_min_sources
from healthfm.singlecell.options import SingleCellOptions
from healthfm.singlecell.reader import (
    CountMatrix,
    Coverage,
    read_h5ad,
    samples_from_anndata,
)
from healthfm.singlecell.soma import is_soma_experiment, looks_like_soma, read_soma
from healthfm.singlecell.tokenizer import (
    DEFAULT_MAX_LENGTH,
    BinnedTokenizer,
    CellTokenizer,
    RankValueTokenizer,
)
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

log = logging.getLogger("healthfm")

#: Cells per TokenChunk yielded by :meth:`SingleCellModality.encode` (small blocks keep the
#: per-entry temporaries in cache and peak memory low; larger ones were not faster).
CHUNK_CELLS = 512
TOKENIZERS = {"rank": RankValueTokenizer, "binned": BinnedTokenizer}
#: ``obsm`` key of ``healthfm embed ... --out OUT.h5ad``.
EMBEDDING_KEY = "X_healthfm"


def _no_value(value: Any) -> bool:
    return value is None or str(value).strip().lower() in ("", "none")


def stratified_splits(
    labels: np.ndarray, keys: np.ndarray, fractions: tuple[float, float, float], salt: str
) -> np.ndarray:
    """Split each class separately: cells ordered by a hash of their key, cut by fractions.

    Cell ``r`` (0-based, in hash order) of a class of ``n`` cells goes to train when
    ``(r + 0.5) / n < fractions[0]``, to val below ``fractions[0] + fractions[1]``, else to
    test; so every class of three or more cells has test cells, and the assignment does not
    depend on row order.
    """
    labels = np.asarray(labels).astype(str)
    u = np.fromiter((_unit_interval(str(k), salt) for k in keys), dtype=np.float64, count=len(keys))
    order = np.lexsort((u, labels))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    sorted_cls = inverse[order]
    rank = np.arange(len(order)) - starts[sorted_cls]
    frac = (rank + 0.5) / counts[sorted_cls]
    cut1, cut2 = fractions[0], fractions[0] + fractions[1]
    names = np.where(frac < cut1, "train", np.where(frac < cut2, "val", "test"))
    out = np.empty(len(labels), dtype=names.dtype)
    out[order] = names
    return out


class SingleCellEmbedding(Embedding):
    """Single-cell embedding: the input is read backed (an atlas larger than memory embeds in blocks), and an ``.h5ad`` output is the input with ``obsm["X_healthfm"]`` added."""

    modality: SingleCellModality

    def inputs(
        self, path: str | Path, options: SingleCellOptions, out: Path, encoder: Any
    ) -> list[EmbeddingInput]:
        """The input, read *backed* (the matrix stays on disk and is read in blocks, so an
        atlas larger than memory embeds); an ``.h5ad`` output is the input file with the
        embedding added to ``obsm['X_healthfm']``."""
        options = self.modality.options(options).replace(backed=True)
        return [EmbeddingInput(str(path), Path(out), lambda: self.modality.read(path, options))]

    def write(
        self,
        out: Path,
        samples: Samples,
        embeddings: np.ndarray,
        attrs: dict[str, Any],
        options: SingleCellOptions,
    ) -> Path:
        """``.h5ad``: a copy of the input file with ``obsm['X_healthfm']`` and the run's
        parameters in ``uns['healthfm']['X_healthfm']`` (streamed, atomic); otherwise
        parquet / ``.npy``."""
        if Path(out).suffix != ".h5ad":
            return super().write(out, samples, embeddings, attrs, options)
        if samples.info.get("soma"):
            raise ConfigError(
                f"an .h5ad output is a copy of the input .h5ad with the embedding added; "
                f"{samples.source} is a TileDB-SOMA experiment: write .parquet or .npy",
                file=out,
            )
        from healthfm.singlecell.reader import add_obsm

        options = self.modality.options(options)
        seconds = float(attrs.get("seconds") or 0.0)
        info = {
            "model_hash": str(attrs.get("model_hash") or ""),
            "tokenizer": str(attrs.get("preprocessing") or ""),
            "tokenizer_hash": str(attrs.get("preprocessing_hash") or ""),
            "pooling": str(attrs.get("pooling") or ""),
            "preset": str(attrs.get("name") or ""),
            "d_model": int(embeddings.shape[1]),
            "max_length": int(attrs.get("max_len") or 0),
            "layer": options.layer or "X",
            "gene_column": samples.info.get("gene_column") or "var_names",
            "total_column": samples.info.get("total_column") or "row sums",
            **dict(samples.info.get("coverage", {})),
            "seconds": seconds,
            "cells_per_second": float(len(embeddings) / seconds) if seconds > 0 else float("nan"),
        }
        return add_obsm(
            samples.source, out, EMBEDDING_KEY, embeddings, {"healthfm": {EMBEDDING_KEY: info}}
        )


class SingleCellModality(Modality):
    """Single-cell RNA-seq counts from AnnData ``.h5ad`` files."""

    name = "singlecell"
    embedding_class = SingleCellEmbedding
    options_class = SingleCellOptions
    input_kind = "an AnnData .h5ad file"

    def looks_like(self, path: Path) -> bool | None:
        """An ``.h5ad`` file (HDF5 with AnnData's layout) or a TileDB-SOMA experiment
        folder; not a text file or another folder."""
        path = Path(path)
        if path.is_dir():
            return looks_like_soma(path)
        try:
            with open(path, "rb") as handle:
                hdf5 = handle.read(8) == b"\x89HDF\r\n\x1a\n"
        except OSError:
            return None
        return hdf5 and path.suffix.lower() == ".h5ad"

    objective = "masked"
    default_pooling = "mean"

    def read(self, path: Any, options: SingleCellOptions) -> Samples:
        """Read an ``.h5ad`` path, a TileDB-SOMA experiment (folder or URI; read in blocks,
        :mod:`healthfm.singlecell.soma`) or an in-memory AnnData into validated samples."""
        options = self.options(options)
        kwargs = {
            "gene_column": options.gene_column,
            "label_column": None if _no_value(options.label_column) else options.label_column,
            "group_column": options.group_column,
            "total_column": options.total_column,
            "normalized": options.normalized,
        }
        soma_options = {
            "measurement": options.measurement,
            "x_layer": options.x_layer,
            "obs_filter": options.obs_filter,
        }
        if isinstance(path, str | Path) and is_soma_experiment(path):
            if options.layer is not None:
                raise ConfigError(
                    f"--layer names an .h5ad layer; {path} is a TileDB-SOMA experiment: "
                    "give --x-layer (and --measurement)",
                    column="layer",
                )
            return read_soma(path, **soma_options, **kwargs)
        given = [name for name, value in soma_options.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join('--' + g.replace('_', '-') for g in given)} appl"
                f"{'ies' if len(given) == 1 else 'y'} to a TileDB-SOMA experiment; "
                f"{path if isinstance(path, str | Path) else 'the input'} is not one",
                column=given[0],
            )
        kwargs["layer"] = options.layer
        survival = survival_options(options)
        if not isinstance(path, str | Path):
            samples = samples_from_anndata(path, options.source, **kwargs)
        else:
            samples = read_h5ad(path, backed=options.backed, **kwargs)
        if survival is not None:  # obs time and event columns: a time-to-event task
            from healthfm.evaluate.survival import attach_survival

            samples = attach_survival(
                samples, *_obs_columns(path, survival, samples), *survival, options.task_type
            )
        return samples

    def fit_tokenizer(
        self, samples: Samples, train_idx: np.ndarray, options: SingleCellOptions
    ) -> CellTokenizer:
        """Fit the chosen tokenizer's vocabulary (and medians) on the training cells."""
        options = self.options(options)
        kind = options.tokenizer or "rank"
        if kind not in TOKENIZERS:
            raise ConfigError(
                f"unknown single-cell tokenizer {kind!r}; choose from {sorted(TOKENIZERS)}"
            )
        train_idx = np.asarray(train_idx, dtype=np.int64)
        if len(train_idx) == 0:
            raise DataError("no training cells to fit the tokenizer on", file=samples.source)
        matrix = self._matrix(samples)
        max_length = options.max_length
        if max_length is None:
            longest = int(np.max(matrix.extra["n_expressed"][train_idx]))
            max_length = min(next_power_of_two(longest + 1), DEFAULT_MAX_LENGTH)
        kwargs: dict[str, Any] = {
            "max_length": int(max_length),
            "total_column": options.total_column,
        }
        if kind == "binned" and options.n_bins is not None:
            kwargs["n_bins"] = int(options.n_bins)
        blocks = ((block, matrix.totals[pos]) for pos, block in matrix.blocks(train_idx))
        tokenizer = TOKENIZERS[kind].fit(
            blocks, matrix.genes, min_cells=int(options.min_cells or 1), **kwargs
        )
        return tokenizer

    def fit_corpus_tokenizer(
        self, parts: list[tuple[Samples, np.ndarray]], options: SingleCellOptions
    ) -> CellTokenizer:
        """One tokenizer over several sources with their own gene panels
        (:func:`healthfm.singlecell.corpus.fit_corpus`).

        Parameters
        ----------
        parts
            ``(samples, train_indices)`` per source, each read with its own options
            (``.h5ad`` files, SOMA experiments). The sources' gene identifiers are chosen
            here (Ensembl ids where a column holds them) and set on the samples, which the
            batch sources then tokenize: columns map to the vocabulary by identifier.
        options
            Tokenizer options: ``tokenizer``, ``max_length``, ``n_bins``, ``min_cells``,
            ``min_sources`` / ``gene_set`` (union by default), ``total_column``.

        One source is :meth:`fit_tokenizer` (exact medians, as a single-input run).
        """
        options = self.options(options)
        if not parts:
            raise ConfigError("a corpus needs at least one source")
        # Sources held out whole (no training cells) take no part in the vocabulary.
        n_training = sum(1 for _, idx in parts if len(idx) > 0)
        min_sources = resolve_min_sources(options.min_sources, options.gene_set, max(n_training, 1))
        if len(parts) == 1:
            return self.fit_tokenizer(parts[0][0], parts[0][1], options)
        kind = options.tokenizer or "rank"
        if kind not in TOKENIZERS:
            raise ConfigError(
                f"unknown single-cell tokenizer {kind!r}; choose from {sorted(TOKENIZERS)}"
            )
        kwargs: dict[str, Any] = {"total_column": options.total_column}
        if kind == "binned" and options.n_bins is not None:
            kwargs["n_bins"] = int(options.n_bins)
        return fit_corpus(
            [(self._matrix_samples(s), np.asarray(i, dtype=np.int64)) for s, i in parts],
            TOKENIZERS[kind],
            min_cells=int(options.min_cells or 1),
            min_sources=min_sources,
            max_length=options.max_length,
            **kwargs,
        )

    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tokenize cells in chunks of 512, in order."""
        tokenizer = self._tokenizer(tokenizer)
        matrix = self._matrix(samples)
        idx = None if indices is None else np.asarray(indices, dtype=np.int64)
        for positions, block in matrix.blocks(idx, CHUNK_CELLS):
            yield tokenizer.encode_block(
                block, matrix.totals[positions], matrix.genes, samples.keys[positions].tolist()
            )

    def coverage(self, samples: Samples, tokenizer: Tokenizer) -> Coverage:
        """How well the tokenizer's genes cover the data (genes and counts)."""
        tokenizer = self._tokenizer(tokenizer)
        matrix = self._matrix(samples)
        return self._coverage(matrix, matrix.genes, tokenizer)

    @staticmethod
    def _coverage(matrix: CountMatrix, genes: np.ndarray, tokenizer: CellTokenizer) -> Coverage:
        col_map = tokenizer.column_map(genes)
        shared = col_map >= 0
        col_sums = np.zeros(len(genes))
        no_gene = 0
        for _, block in matrix.blocks():
            col_sums += np.asarray(block.sum(axis=0), dtype=np.float64).reshape(-1)
            no_gene += int(
                np.sum(np.asarray(block[:, np.flatnonzero(shared)].sum(axis=1)).reshape(-1) <= 0)
            )
        total = col_sums.sum()
        missing = genes[~shared]
        top_missing = missing[np.argsort(-col_sums[~shared], kind="stable")[:5]].tolist()
        return Coverage(
            n_model_genes=len(tokenizer.genes),
            n_data_genes=len(genes),
            # Model genes present (several data identifiers may map to one model gene).
            n_shared=len(np.unique(col_map[shared])),
            count_fraction=float(col_sums[shared].sum() / total) if total > 0 else 0.0,
            cells_without_model_gene=no_gene,
            example_missing=[str(g) for g in top_missing],
            n_data_shared=int(shared.sum()),
        )

    def _choose_gene_column(self, samples: Samples, tokenizer: CellTokenizer) -> None:
        """For a tokenizer that maps its own identifiers (a published model's), take the
        ``var`` column (or ``var_names``) that covers most of the model's genes, unless the
        user named one; say which was taken."""
        matrix = self._matrix(samples)
        candidates = matrix.extra.get("var_columns")
        if not candidates:
            return
        if samples.info.pop("gene_column_auto", False):  # an earlier model's choice
            matrix.genes, samples.info["gene_column"] = candidates["var_names"], None
        if not getattr(tokenizer, "auto_gene_column", False):
            return
        scores = {
            name: len(np.unique(m[m >= 0]))
            for name, genes in candidates.items()
            for m in [tokenizer.column_map(genes)]
        }
        best = max(scores, key=lambda name: (scores[name], name == "var_names"))
        samples.info["gene_column_scores"] = scores
        # Chosen per tokenizer: the same samples may be checked against another model next.
        samples.info["gene_column_auto"] = True
        if best != "var_names" and scores[best] > scores["var_names"]:
            matrix.genes = candidates[best]
            samples.info["gene_column"] = best
        else:
            matrix.genes = candidates["var_names"]
            samples.info["gene_column"] = None
        chosen = samples.info.get("gene_column") or "var_names"
        log.log(
            logging.WARNING if chosen != "var_names" else logging.INFO,
            "%s: gene identifiers taken from %s (model genes matched: %s; --gene-column overrides)",
            samples.source,
            f"var/{chosen}" if chosen != "var_names" else "var_names",
            ", ".join(f"{k} {v:,}" for k, v in scores.items()),
        )

    def check_input(self, samples: Samples, tokenizer: Tokenizer) -> None:
        """Report vocabulary coverage; raise if the data share no gene with the model
        (or, for a published model, carry under its ``min_count_fraction`` of the counts)."""
        tok = self._tokenizer(tokenizer)
        if samples.info.get("gene_column") is None or samples.info.get("gene_column_auto"):
            self._choose_gene_column(samples, tok)
        cov = self.coverage(samples, tokenizer)
        samples.info["coverage"] = {
            "n_model_genes": cov.n_model_genes,
            "n_shared_genes": cov.n_shared,
            "model_gene_fraction": cov.model_fraction,
            "count_fraction": cov.count_fraction,
            "cells_without_model_gene": cov.cells_without_model_gene,
        }
        field = samples.info.get("gene_column")
        column = f"var/{field}" if field else "var_names"
        min_fraction = float(getattr(tok, "min_count_fraction", 0.0))
        if cov.n_shared == 0 or cov.count_fraction < min_fraction:
            example = self._matrix(samples).genes[0]
            scores = samples.info.get("gene_column_scores") or {}
            tried = (
                " (model genes matched per column: "
                + ", ".join(f"{k}: {v:,}" for k, v in scores.items())
                + ")"
                if scores
                else ""
            )
            what = (
                "none of the data's"
                if cov.n_shared == 0
                else f"only {cov.n_shared:,} ({100 * cov.count_fraction:.2f}% of the counts) of the data's"
            )
            raise DataError(
                f"{what} {cov.n_data_genes:,} genes are in the model's vocabulary of "
                f"{cov.n_model_genes:,} (e.g. data gene {example!r}, model gene "
                f"{tok.genes[0]!r}){tried}; use --gene-column to pick the var column with the "
                "identifiers the model was trained with (symbols vs Ensembl ids)",
                file=samples.source,
                column=column,
                row=str(example),
            )
        wanted = getattr(tok, "total_column", None)
        if wanted and samples.info.get("total_column") is None and min_fraction > 0:
            log.warning(
                "%s: the model normalises by obs[%r] (total counts over all genes); this run "
                "uses the row sums of the matrix (pass --total-column %s if obs has it)",
                samples.source,
                wanted,
                wanted,
            )
        # Shown by default (warning) whenever the vocabulary and the data differ.
        incomplete = cov.n_shared < cov.n_model_genes or cov.n_shared < cov.n_data_genes
        log.log(
            logging.WARNING if incomplete else logging.INFO, "%s: %s", samples.source, cov.report()
        )

    def model_defaults(
        self, tokenizer: Tokenizer, samples: Samples, options: SingleCellOptions
    ) -> dict[str, Any]:
        """Context = the tokenizer's ``max_length``; the value input for binned tokens."""
        tokenizer = self._tokenizer(tokenizer)
        return {"max_len": tokenizer.max_length, "use_values": "values" in tokenizer.fields}

    def baselines(self) -> dict[str, BaselineFn]:
        """``hvg-pca+logreg`` and ``lognorm+logreg``; ``scvi+logreg`` when scvi-tools is
        installed (the ``scvi`` extra)."""
        from healthfm.singlecell.baselines import _scvi_baseline, scvi_available

        out = dict(BASELINES)
        if scvi_available():
            out["scvi+logreg"] = _scvi_baseline
        return out

    def split(
        self, samples: Samples, salt: str, fractions: tuple[float, float, float]
    ) -> np.ndarray:
        """Group split with ``--group-column``; else stratified by class label; else by barcode.

        A numeric label that is a regression target (:func:`~healthfm.evaluate.probe.infer_task`)
        has no classes to stratify by: its cells split by barcode.
        """
        from healthfm.evaluate.probe import infer_task

        if (
            samples.info.get("group_column") is None
            and samples.labels is not None
            and infer_task(samples.labels, bool(samples.info.get("categorical_labels")))
            != "regression"
        ):
            return stratified_splits(samples.labels, samples.keys, fractions, salt)
        return assign_splits(samples.groups, fractions, salt)

    def evaluation_protocol(self, options: SingleCellOptions) -> Any:
        """The shared linear probe, plus k-NN probe rows and zero-shot k-means clustering
        rows (ARI, NMI) of every method (:class:`~healthfm.singlecell.evaluation.CellProbeProtocol`)."""
        from healthfm.singlecell.evaluation import CellProbeProtocol

        return CellProbeProtocol()

    def demo_spec(self, quick: bool) -> DemoSpec:
        """Pretrain on PBMC (train + val) + CellTypist cells, evaluate on PBMC ``bulk_labels``."""
        from healthfm.singlecell.demo import demo_spec

        return demo_spec(self, quick)

    @classmethod
    def _matrix_samples(cls, samples: Samples) -> Samples:
        cls._matrix(samples)
        return samples

    @staticmethod
    def _matrix(samples: Samples) -> CountMatrix:
        if not isinstance(samples.payload, CountMatrix):
            raise ConfigError(
                "single-cell samples must hold a CountMatrix (read them with read_h5ad)"
            )
        return samples.payload

    @staticmethod
    def _tokenizer(tokenizer: Tokenizer) -> CellTokenizer:
        if not isinstance(tokenizer, CellTokenizer):
            raise ConfigError(
                f"the single-cell modality needs a singlecell tokenizer, got {type(tokenizer).__name__} "
                f"({getattr(tokenizer, 'type', '?')})"
            )
        return tokenizer


register_modality(SingleCellModality())


def _obs_columns(path: Any, columns: tuple[str, str], samples: Samples) -> list[np.ndarray]:
    """The ``obs`` columns ``columns`` of an AnnData (or of an ``.h5ad``, read backed: obs
    only), in the samples' cell order."""
    import anndata

    adata = path if not isinstance(path, str | Path) else anndata.read_h5ad(path, backed="r")
    try:
        out = []
        for column in columns:
            if column not in adata.obs.columns:
                raise DataError(
                    f"column {column!r} is not in obs (columns: {list(adata.obs.columns)})",
                    file=samples.source,
                    column=f"obs/{column}",
                )
            series = adata.obs[column]
            values = series.to_numpy(dtype=object)
            out.append(np.where(series.isna().to_numpy(), None, values))
        return out
    finally:
        if isinstance(path, str | Path) and getattr(adata, "file", None) is not None:
            adata.file.close()
