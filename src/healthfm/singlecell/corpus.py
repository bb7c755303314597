"""One gene vocabulary over several single-cell sources (a pretraining corpus).

Atlas-scale pretraining (Geneformer: 30M cells from 561 data sets; scGPT: 33M cells from
CELLxGENE) reads many data sets whose gene panels differ. :func:`fit_corpus` fits one cell
tokenizer over all of them:

* **Gene identifiers per source.** A source read without ``gene_column`` takes the
  ``var`` column (or ``var_names``) holding Ensembl ids (``ENSG…``, ``ENSMUSG…``) when one
  does, else ``var_names``; each choice is logged. Sources whose identifiers are of
  different kinds (Ensembl ids in one, symbols in another) would give two tokens to one
  gene and are refused.
* **Vocabulary.** Genes measured in at least ``min_sources`` sources (1: the union of the
  panels; the number of sources, or ``gene_set="intersection"``: their intersection) and
  expressed in at least ``min_cells`` training cells, fitted in one streaming pass over
  every source's training cells, block by block (:class:`CorpusGeneStats`: memory grows
  with the genes, never with the cells). Rank tokens get per-gene non-zero medians from
  histograms (within 3.1%); binned tokens need the vocabulary only.
* **Coverage.** Per source: its genes in the vocabulary (of its genes), the vocabulary's
  genes it measures, and the share of its training counts on vocabulary genes, logged; a
  source with less than :data:`MIN_COUNT_FRACTION` of its counts on vocabulary genes (the
  published models' threshold) is refused.

Tokenizing a source afterwards maps its columns to the vocabulary by gene identifier
(:meth:`CellTokenizer.column_map`): the same gene gets the same token in every source,
whatever its column, and genes outside the vocabulary are dropped.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.modality import Samples, next_power_of_two
from healthfm.singlecell.reader import CountMatrix
from healthfm.singlecell.tokenizer import (
    DEFAULT_MAX_LENGTH,
    MIN_COUNT_FRACTION,
    CellTokenizer,
    CorpusGeneStats,
    RankValueTokenizer,
    strip_ensembl_versions,
)

log = logging.getLogger("healthfm")

#: Ensembl gene ids of any species (``ENSG00000141510``, ``ENSMUSG00000059552``), with an
#: optional version suffix.
ENSEMBL_ID = re.compile(r"^ENS[A-Z]{0,6}G\d{6,}(\.\d+)?$")
#: A column is taken as Ensembl ids when at least this share of its values are.
ENSEMBL_SHARE = 0.5


def ensembl_share(ids: np.ndarray) -> float:
    """Share of identifiers that are Ensembl gene ids (vectorised regular expression)."""
    ids = np.asarray(ids, dtype=object)
    if len(ids) == 0:
        return 0.0
    import pandas as pd

    return float(pd.Series(ids, dtype=object).astype(str).str.match(ENSEMBL_ID).mean())


def _matrix(samples: Samples) -> CountMatrix:
    if not isinstance(samples.payload, CountMatrix):
        raise ConfigError("single-cell samples must hold a CountMatrix (read them with read_h5ad)")
    return samples.payload


def choose_gene_ids(samples: Samples) -> str:
    """Use the Ensembl-id column of a source read without ``gene_column``; return the kind.

    Among ``var_names`` and the text columns of ``var`` (the candidates the reader keeps
    when no gene column was named), the one with the largest share of Ensembl ids is
    taken when that share reaches :data:`ENSEMBL_SHARE` (``var_names`` first on a tie);
    otherwise ``var_names``. The source's gene identifiers (``payload.genes``) and
    ``info["gene_column"]`` are set accordingly and the choice is logged.

    Returns
    -------
    str
        ``"ensembl"`` or ``"other"``: the kind of the identifiers in use.
    """
    matrix = _matrix(samples)
    candidates = matrix.extra.get("var_columns")
    if samples.info.get("gene_column") is not None or not candidates:
        # Named by the user (or a reader without candidates): kept as given.
        kind = "ensembl" if ensembl_share(matrix.genes) >= ENSEMBL_SHARE else "other"
        where = samples.info.get("gene_column") or "var_names"
        log.info("%s: gene identifiers from %s (%s)", samples.source, where, kind)
        if kind == "ensembl":
            _drop_versions(samples, matrix)
        return kind
    shares = {name: ensembl_share(ids) for name, ids in candidates.items()}
    best = max(shares, key=lambda name: (shares[name], name == "var_names"))
    if shares[best] >= ENSEMBL_SHARE and _unique(candidates[best]):
        chosen, kind = best, "ensembl"
    else:
        chosen, kind = "var_names", "other"
    matrix.genes = candidates[chosen]
    samples.info["gene_column"] = None if chosen == "var_names" else chosen
    samples.info.pop("gene_column_auto", None)
    log.info(
        "%s: gene identifiers from %s (%s; Ensembl-id share per column: %s; "
        "--gene-column overrides)",
        samples.source,
        "var_names" if chosen == "var_names" else f"var/{chosen}",
        "Ensembl ids" if kind == "ensembl" else "no column of Ensembl ids",
        ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()),
    )
    if kind == "ensembl":
        _drop_versions(samples, matrix)
    return kind


def _drop_versions(samples: Samples, matrix: CountMatrix) -> None:
    """Use stable Ensembl ids (``ENSG….16`` → ``ENSG…``) so that sources annotated with
    different GENCODE releases share genes; kept as they are if that would merge genes."""
    stable = strip_ensembl_versions(matrix.genes)
    changed = int(np.sum(stable != np.asarray(matrix.genes, dtype=object)))
    if changed == 0:
        return
    if not _unique(stable):
        log.warning(
            "%s: Ensembl version suffixes kept (dropping them would merge genes)",
            samples.source,
        )
        return
    matrix.genes = stable
    log.info("%s: Ensembl version suffixes dropped from %s gene id(s)", samples.source, changed)


def _unique(ids: np.ndarray) -> bool:
    ids = np.asarray(ids).astype(str)
    return len(np.unique(ids)) == len(ids) and not np.any(np.char.str_len(ids) == 0)


def resolve_min_sources(min_sources: int | None, gene_set: str | None, n_sources: int) -> int:
    """The number of sources a vocabulary gene must be measured in.

    Raises
    ------
    ConfigError
        For an unknown ``gene_set``, ``min_sources`` above the number of sources, or an
        ``intersection`` contradicted by ``min_sources``.
    """
    if gene_set not in (None, "union", "intersection"):
        raise ConfigError(f"gene_set must be union or intersection, got {gene_set!r}")
    if min_sources is not None and not 1 <= int(min_sources) <= n_sources:
        raise ConfigError(
            f"min_sources must be between 1 and the number of sources ({n_sources}), got "
            f"{min_sources}",
            column="min_sources",
        )
    if gene_set == "intersection":
        if min_sources is not None and int(min_sources) != n_sources:
            raise ConfigError(
                f"gene_set=intersection keeps the genes of all {n_sources} sources; "
                f"min_sources={min_sources} contradicts it (give one or the other)",
                column="min_sources",
            )
        return n_sources
    return int(min_sources or 1)


def _check_one_gene_id_kind(parts: list[tuple[Samples, np.ndarray]]) -> None:
    """Choose each source's gene identifiers; all Ensembl ids or none (one vocabulary)."""
    kinds = {str(samples.source): choose_gene_ids(samples) for samples, _ in parts}
    if len(set(kinds.values())) > 1:
        ens = [k for k, v in kinds.items() if v == "ensembl"]
        other = [k for k, v in kinds.items() if v != "ensembl"]
        raise DataError(
            f"the sources name genes differently: Ensembl ids in {', '.join(ens)}; other "
            f"identifiers (symbols?) in {', '.join(other)}. One vocabulary needs one kind: "
            "give each source the gene column of Ensembl ids (gene_column), or map them first",
            file=other[0],
            column="var_names",
        )


def _training_sources(parts: list[tuple[Samples, np.ndarray]], min_sources: int) -> list[int]:
    """Positions of the sources with training cells (at least ``min_sources`` of them).

    Sources without training cells (held out whole: split "val" / "test") are tokenized
    later but take no part in the vocabulary (neither their panels nor their counts).
    """
    training = [k for k, (_, idx) in enumerate(parts) if len(idx) > 0]
    if not training:
        raise DataError("no source has training cells", file=parts[0][0].source)
    if min_sources > len(training):
        raise ConfigError(
            f"min_sources={min_sources} but only {len(training)} source(s) have training cells",
            column="min_sources",
        )
    return training


def _gene_stats(
    parts: list[tuple[Samples, np.ndarray]],
    matrices: list[CountMatrix],
    training: list[int],
    target_sum: float,
    medians: bool,
) -> CorpusGeneStats:
    """Per-gene statistics over the training cells of the training sources, block by block."""
    stats = CorpusGeneStats(
        [matrices[k].genes for k in training], target_sum=target_sum, medians=medians
    )
    for s, k in enumerate(training):
        idx = np.asarray(parts[k][1], dtype=np.int64)
        for positions, block in matrices[k].blocks(idx):
            stats.add(s, block, matrices[k].totals[positions])
    return stats


def fit_corpus(
    parts: list[tuple[Samples, np.ndarray]],
    tokenizer_class: type[CellTokenizer],
    *,
    min_cells: int = 1,
    min_sources: int = 1,
    max_length: int | None = None,
    min_count_fraction: float = MIN_COUNT_FRACTION,
    **kwargs: Any,
) -> CellTokenizer:
    """Fit one cell tokenizer on the training cells of several sources.

    Parameters
    ----------
    parts
        One ``(samples, train_indices)`` per source (their gene identifiers are chosen by
        :func:`choose_gene_ids` and set on the samples).
    tokenizer_class
        :class:`RankValueTokenizer` or :class:`BinnedTokenizer` (``from_statistics``).
    min_cells, min_sources
        Keep genes expressed in at least ``min_cells`` training cells and measured in at
        least ``min_sources`` sources.
    max_length
        Tokens per cell; the longest training cell (in genes), rounded up to a power of
        two and at most :data:`DEFAULT_MAX_LENGTH`, when None.
    min_count_fraction
        Refuse a source carrying less than this share of its training counts on
        vocabulary genes.
    kwargs
        Other tokenizer settings (``n_bins``, ``total_column``, ``target_sum``).

    Returns
    -------
    CellTokenizer
        The fitted tokenizer; each source's ``info["coverage"]`` holds its coverage.

    Sources without training cells (held out whole) are not part of the vocabulary; their
    coverage (by genes) is logged and a source sharing no gene with it is refused.

    Raises
    ------
    DataError
        No source with training cells, sources with identifiers of different kinds, an
        empty vocabulary, or a source the vocabulary covers too little of.
    """
    _check_one_gene_id_kind(parts)
    target_sum = float(kwargs.pop("target_sum", 10_000.0))
    training = _training_sources(parts, min_sources)
    matrices = [_matrix(samples) for samples, _ in parts]
    stats = _gene_stats(
        parts, matrices, training, target_sum, issubclass(tokenizer_class, RankValueTokenizer)
    )
    if max_length is None:
        longest = max(
            int(np.max(matrices[k].extra["n_expressed"][np.asarray(parts[k][1], dtype=np.int64)]))
            for k in training
        )
        max_length = min(next_power_of_two(longest + 1), DEFAULT_MAX_LENGTH)
    kept = stats.vocabulary(min_cells, min_sources)
    if len(kept) == 0:
        raise DataError(
            f"the corpus vocabulary is empty: no gene is measured in {min_sources} of the "
            f"{len(training)} sources with training cells and expressed in {min_cells} "
            f"training cell(s) (genes per source: "
            f"{', '.join(str(len(matrices[k].genes)) for k in training)}); "
            "lower min_sources (or use gene_set=union)",
            file=parts[training[0]][0].source,
            column="min_sources",
        )
    tokenizer = tokenizer_class.from_statistics(
        stats, min_cells, min_sources, max_length=int(max_length), **kwargs
    )
    log.info(
        "corpus vocabulary: %s genes (measured in >= %d of %d sources, expressed in >= %d "
        "training cells) from %s distinct genes",
        f"{len(tokenizer.genes):,}",
        min_sources,
        len(parts),
        min_cells,
        f"{len(stats.genes):,}",
    )
    stat_of = {k: s for s, k in enumerate(training)}
    for k, ((samples, _), matrix) in enumerate(zip(parts, matrices, strict=True)):
        vocab_map = tokenizer.column_map(matrix.genes)
        if k in stat_of:
            cov = stats.coverage(stat_of[k], vocab_map)
            counts = f", carrying {100 * cov['count_fraction']:.1f}% of its training counts"
        else:  # held out whole: its panel only
            inside = vocab_map >= 0
            cov = {
                "n_genes": len(vocab_map),
                "n_genes_in_vocabulary": int(inside.sum()),
                "n_vocabulary_measured": len(np.unique(vocab_map[inside])),
                "count_fraction": float("nan"),
                "n_train_cells": 0,
            }
            counts = " (no training cells: not part of the vocabulary)"
        cov["n_vocabulary"] = len(tokenizer.genes)
        samples.info["coverage"] = cov
        where = samples.info.get("gene_column")
        log.info(
            "%s: %s of its %s genes (%.1f%%) are in the vocabulary%s; it measures %s of the "
            "vocabulary's %s genes (%.1f%%)",
            samples.source,
            f"{cov['n_genes_in_vocabulary']:,}",
            f"{cov['n_genes']:,}",
            100 * cov["n_genes_in_vocabulary"] / max(cov["n_genes"], 1),
            counts,
            f"{cov['n_vocabulary_measured']:,}",
            f"{len(tokenizer.genes):,}",
            100 * cov["n_vocabulary_measured"] / len(tokenizer.genes),
        )
        too_little = (
            cov["n_genes_in_vocabulary"] == 0
            if k not in stat_of
            else not cov["count_fraction"] >= min_count_fraction
        )
        if too_little:
            raise DataError(
                f"the corpus vocabulary covers too little of this source: "
                f"{cov['n_genes_in_vocabulary']:,} of its {cov['n_genes']:,} genes, "
                f"{100 * cov['count_fraction']:.2f}% of its training counts (at least "
                f"{100 * min_count_fraction:g}% needed); its panel shares too few genes with "
                "the other sources: lower min_sources, use gene_set=union, check its gene "
                "identifiers (gene_column), or leave it out",
                file=samples.source,
                column=f"var/{where}" if where else "var_names",
            )
    return tokenizer
