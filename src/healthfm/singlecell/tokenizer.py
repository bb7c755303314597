"""Cell tokenizers: Geneformer rank-value encoding and scGPT-style value binning.

Both turn a cell (a row of counts) into ``[CLS]`` followed by its expressed genes, most
expressed first, at most ``max_length`` tokens in all; gene ``g`` of the vocabulary has id
``N_SPECIAL + g``. Genes of the data that are not in the vocabulary are ignored (the
coverage report says how much of the data that drops).

* :class:`RankValueTokenizer` (Geneformer, Theodoris et al. 2023): counts are divided by
  the cell's total and multiplied by ``target_sum`` (10,000), then divided by the gene's
  median over the non-zero values of the training cells (fitted, stored in
  ``tokenizer.json``), so ubiquitous high-expression genes (housekeeping, mitochondrial)
  drop down and genes that are unusually high *for that gene* move up. Genes are ordered
  by that value, descending; ties keep the data's gene order (as a stable sort would).
  The token's position is its rank; there is no value input.
* :class:`BinnedTokenizer` (scGPT, Cui et al. 2024): the same gene tokens, ordered by
  normalized expression, plus a value per token: the cell's quantile bin of
  ``log1p(count / total * target_sum)`` over its expressed genes (``n_bins - 1`` edges at
  ``np.quantile(values, linspace(0, 1, n_bins - 1))``, bin = ``np.digitize`` of the value,
  1 … n_bins - 1), scaled to (0, 1] and fed to the backbone's value input. scGPT breaks
  ties between equal edges at random; here they break to the left (deterministic). scGPT
  samples genes at random beyond its context; here the most expressed are kept.

Vectorization. A block of cells is processed with numpy on the CSR arrays: each expressed
gene becomes one 64-bit key ``row | descending float32 bits of the score | column``; one
``np.sort`` of the keys orders every cell's genes at once (the column bits make keys
unique, so the order is fully determined), then top-N selection, ``[CLS]`` insertion and
(for binning) per-cell quantile edges are computed with cumulative counts and
``searchsorted``. There is no Python loop per cell or per gene.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from healthfm.errors import ConfigError
from healthfm.tokenizer import CLS_ID, N_SPECIAL, Tokenizer, register_tokenizer
from healthfm.tokens import TokenChunk

#: Normalization target (counts per cell) used by Geneformer and scGPT.
TARGET_SUM = 10_000.0
#: Longest context proposed by default (Geneformer's 30M models use 2,048).
DEFAULT_MAX_LENGTH = 2048
DEFAULT_N_BINS = 51
#: Share of a data set's counts that must fall on vocabulary genes (as the published
#: Geneformer / scGPT encoders require): below it the data set is refused.
MIN_COUNT_FRACTION = 0.02
#: Gene-panel column maps a tokenizer keeps cached.
MAP_CACHE_SIZE = 8
#: Corpus medians (:class:`CorpusGeneStats`) are histograms of float32 values: buckets of
#: the exponent and this many leading mantissa bits (32 per octave, each at most 1/32 =
#: 3.1% wide), from ``target_sum * 2**MEDIAN_LOW_OCTAVES`` to ``2 * target_sum``.
MEDIAN_MANTISSA_BITS = 5
MEDIAN_LOW_OCTAVES = -24


#: A versioned Ensembl gene id (GENCODE: ``ENSG00000141510.16``); group 1 is the stable id.
ENSEMBL_VERSIONED = r"^(ENS[A-Z]{0,6}G\d{6,})\.\d+$"


def strip_ensembl_versions(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """The identifiers with Ensembl version suffixes dropped (``ENSG….16`` → ``ENSG…``);
    other identifiers unchanged (object array)."""
    series = pd.Series(np.asarray(ids, dtype=object), dtype=object).astype(str)
    return series.str.replace(ENSEMBL_VERSIONED, r"\1", regex=True).to_numpy(dtype=object)


def gene_index(
    data_genes: Sequence[str] | np.ndarray, vocab: Sequence[str] | np.ndarray
) -> np.ndarray:
    """Vocabulary position of each data gene, -1 for genes outside the vocabulary.

    Identifiers match exactly; a data gene left unmatched then matches on its Ensembl id
    without version suffix (one source's ``ENSG00000141510.16`` is another's
    ``ENSG00000141510``) where that is unambiguous in the vocabulary.
    """
    vocab = np.asarray(vocab, dtype=object)
    data = np.asarray(data_genes, dtype=object)
    out = pd.Index(vocab).get_indexer(data)
    missing = np.flatnonzero(out < 0)
    if missing.size:
        stable_vocab = pd.Index(strip_ensembl_versions(vocab))
        if stable_vocab.is_unique:
            out[missing] = stable_vocab.get_indexer(strip_ensembl_versions(data[missing]))
    return out


def _float_bits_desc(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort non-negative float32 values in descending order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return np.uint64(0xFFFFFFFF) - bits


def sort_rows_desc(
    rows: np.ndarray, scores: np.ndarray, n_rows: int, exact: bool = True, packed: bool = True
) -> np.ndarray:
    """Permutation ordering entries by row, then score descending, then input order.

    Entries must be row-major (as in a CSR matrix), so "input order" within a row is
    column order: ties keep the data's gene order, as a stable sort would.

    One ``np.sort`` of packed 64-bit keys ``row | float32 score bits | position in row``
    orders everything at once. With ``exact`` (float64 scores), entries whose float32
    scores tie but whose float64 scores differ are re-ordered by the float64 scores, so the
    result equals ``np.lexsort((index, -scores, rows))``.

    Parameters
    ----------
    rows
        Row (cell) of each entry, 0..n_rows-1, non-decreasing.
    scores
        Score (>= 0) of each entry.
    n_rows
        Bound of ``rows``.
    exact
        Refine float32 ties with the float64 scores.
    packed
        False forces the (slower) lexsort path, which gives the same order.

    Returns
    -------
    numpy.ndarray
        int64 permutation.
    """
    n = len(rows)
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    pos_bits = max(1, int(max(int(counts.max(initial=1)) - 1, 0)).bit_length())
    row_bits = max(1, int(n_rows - 1).bit_length())
    if not packed or pos_bits + row_bits + 32 > 64:
        # Too wide for one packed key: lexsort (slower, same order).
        return np.lexsort((np.arange(n), -np.asarray(scores, dtype=np.float64), rows))
    s32 = np.asarray(scores, dtype=np.float32)
    # Build the key in place (few temporaries): row | descending score bits | position.
    key = rows.astype(np.uint64)
    key <<= np.uint64(32)
    bits = s32.view(np.uint32).astype(np.uint64)
    np.subtract(np.uint64(0xFFFFFFFF), bits, out=bits)
    key |= bits
    del bits
    key <<= np.uint64(pos_bits)
    pos = np.arange(n, dtype=np.int64)
    pos -= starts[rows]
    key |= pos.view(np.uint64)
    del pos
    key.sort()
    # Rows are the primary key and were already grouped, so entry p stays in row rows[p].
    key &= np.uint64((1 << pos_bits) - 1)
    order = key.view(np.int64)
    order += starts[rows]
    if exact and n > 1:
        s = s32[order]
        same_row = rows[1:] == rows[:-1]
        tie = same_row & (s[1:] == s[:-1])
        if tie.any():
            s64 = np.asarray(scores, dtype=np.float64)[order]
            # Only runs of float32 ties whose float64 scores differ need re-ordering.
            differs = tie & (s64[1:] != s64[:-1])
            if differs.any():
                run = np.cumsum(np.concatenate([[True], ~tie]))  # run id of every position
                bad = np.zeros(int(run[-1]) + 1, dtype=bool)
                bad[run[1:][differs]] = True
                idx = np.flatnonzero(bad[run])
                sub = order[idx]
                order[idx] = sub[np.lexsort((sub, -s64[idx], run[idx]))]
    return order


def expressed_entries(
    block: sp.csr_matrix, col_map: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows, data columns, vocabulary indices and counts of the expressed vocabulary genes."""
    block = block.tocsr()
    rows = np.repeat(np.arange(block.shape[0], dtype=np.int64), np.diff(block.indptr))
    cols = block.indices.astype(np.int64)
    vocab = col_map[cols]
    keep = (vocab >= 0) & (block.data > 0)
    return rows[keep], cols[keep], vocab[keep], block.data[keep].astype(np.float64)


def row_segments(rows: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row counts, starts, and each entry's position within its row (rows sorted)."""
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    pos = np.arange(len(rows)) - starts[rows]
    return counts, starts, pos


def _assemble(
    rows: np.ndarray,
    vocab: np.ndarray,
    pos: np.ndarray,
    counts: np.ndarray,
    max_genes: int,
    values: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[CLS] + the first ``max_genes`` genes of each row: flat ids, offsets, values."""
    kept = np.minimum(counts, max_genes)
    lengths = kept + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    ids[offsets[:-1]] = CLS_ID
    sel = pos < max_genes
    target = offsets[rows[sel]] + 1 + pos[sel]
    ids[target] = (N_SPECIAL + vocab[sel]).astype(np.int32)
    out_values = None
    if values is not None:
        out_values = np.full(len(ids), np.nan, dtype=np.float32)
        out_values[target] = values[sel]
    return ids, offsets, out_values


class CellTokenizer(Tokenizer):
    """Shared part of the cell tokenizers: gene vocabulary, context length, normalization.

    Parameters
    ----------
    genes
        The gene vocabulary (identifiers as in the training data).
    max_length
        Tokens per cell, ``[CLS]`` included.
    target_sum
        Counts per cell after normalization.
    total_column
        The ``obs`` column of library sizes the tokenizer was fitted with (None: row sums);
        a record for users, the reader option decides.
    """

    modality: ClassVar[str] = "singlecell"
    #: The singlecell modality picks the ``var`` column (or ``var_names``) whose
    #: identifiers match most of the vocabulary when the user names none (a model fitted
    #: on Ensembl ids then reads a data set whose ``var_names`` are symbols).
    auto_gene_column: ClassVar[bool] = True
    #: Data carrying less than this share of their counts on vocabulary genes are refused
    #: (the threshold of the published models' coverage check).
    min_count_fraction: ClassVar[float] = MIN_COUNT_FRACTION

    def __init__(
        self,
        genes: Sequence[str],
        max_length: int = DEFAULT_MAX_LENGTH,
        target_sum: float = TARGET_SUM,
        total_column: str | None = None,
    ) -> None:
        self.genes = np.asarray(list(genes), dtype=object)
        if len(self.genes) == 0:
            raise ConfigError("a cell tokenizer needs at least one gene")
        if int(max_length) < 2:
            raise ConfigError(f"max_length must be at least 2 ([CLS] + one gene), got {max_length}")
        self.max_length = int(max_length)
        self.target_sum = float(target_sum)
        self.total_column = total_column
        # id(data genes) -> (those genes, their column map). The genes are held so that
        # their id cannot be reused by another array while the entry lives.
        self._map_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def vocab_size(self) -> int:
        """Specials plus one token per gene."""
        return N_SPECIAL + len(self.genes)

    def column_map(self, data_genes: np.ndarray) -> np.ndarray:
        """Vocabulary index of each data column (-1 outside the vocabulary), cached.

        Columns map by gene identifier, never by position: sources with different gene
        panels (or the same genes in another order) give the same token to the same gene,
        and genes outside the vocabulary are dropped. The maps of the last few gene arrays
        are cached (several sources are tokenized in turn).
        """
        key = id(data_genes)
        hit = self._map_cache.get(key)
        if hit is not None and hit[0] is data_genes:
            return hit[1]
        col_map = self._map_genes(data_genes)
        if len(self._map_cache) >= MAP_CACHE_SIZE:
            self._map_cache.pop(next(iter(self._map_cache)))
        self._map_cache[key] = (data_genes, col_map)
        return col_map

    def _map_genes(self, data_genes: np.ndarray) -> np.ndarray:
        """Vocabulary index of each data gene (-1 outside), uncached: by exact identifier
        (a published model's tokenizer maps symbols and aliases its own way)."""
        return gene_index(data_genes, self.genes)

    def token_names(self, ids: np.ndarray) -> np.ndarray:
        """Gene identifier (or special token) of each id."""
        from healthfm.tokenizer import SPECIAL_TOKENS

        names = np.concatenate([np.asarray(SPECIAL_TOKENS, dtype=object), self.genes])
        return names[np.asarray(ids)]

    def _base_config(self) -> dict[str, Any]:
        return {
            "genes": [str(g) for g in self.genes],
            "max_length": self.max_length,
            "target_sum": self.target_sum,
            "total_column": self.total_column,
        }

    def encode_block(
        self, block: sp.csr_matrix, totals: np.ndarray, data_genes: np.ndarray, keys: Sequence[Any]
    ) -> TokenChunk:
        """Tokenize a CSR block of cells (rows) with library sizes ``totals``."""
        raise NotImplementedError


@register_tokenizer
class RankValueTokenizer(CellTokenizer):
    """Geneformer rank-value encoding (see the module docstring).

    Parameters
    ----------
    genes
        Gene vocabulary.
    medians
        Each gene's median of ``count / total * target_sum`` over the training cells
        where it is expressed.
    """

    type: ClassVar[str] = "singlecell.rank"
    fields: tuple[str, ...] = ()

    def __init__(self, genes: Sequence[str], medians: Sequence[float], **kwargs: Any) -> None:
        super().__init__(genes, **kwargs)
        self.medians = np.asarray(medians, dtype=np.float64)
        if self.medians.shape != (len(self.genes),) or not np.all(self.medians > 0):
            raise ConfigError("medians must be one positive number per gene")

    def config(self) -> dict[str, Any]:
        """Vocabulary, medians and settings."""
        return {**self._base_config(), "medians": [float(m) for m in self.medians]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RankValueTokenizer:
        """Rebuild from :meth:`config`."""
        c = dict(config)
        return cls(c.pop("genes"), c.pop("medians"), **c)

    @classmethod
    def fit(
        cls,
        blocks,
        data_genes: np.ndarray,
        min_cells: int = 1,
        target_sum: float = TARGET_SUM,
        **kwargs: Any,
    ) -> RankValueTokenizer:
        """Fit the vocabulary and per-gene non-zero medians on training cells.

        Parameters
        ----------
        blocks
            Iterable of ``(csr_block, totals)`` of the training cells.
        data_genes
            Gene identifier of each column.
        min_cells
            Keep genes expressed in at least this many training cells.
        """
        genes, medians = nonzero_medians(blocks, data_genes, min_cells, target_sum)
        return cls(genes, medians, target_sum=target_sum, **kwargs)

    @classmethod
    def from_statistics(
        cls, stats: CorpusGeneStats, min_cells: int = 1, min_sources: int = 1, **kwargs: Any
    ) -> RankValueTokenizer:
        """The vocabulary and medians of a corpus (several sources, their own gene panels).

        Parameters
        ----------
        stats
            Streaming statistics of the training cells of every source
            (:meth:`CorpusGeneStats.add`), fitted with medians.
        min_cells
            Keep genes expressed in at least this many training cells (all sources).
        min_sources
            Keep genes measured in at least this many sources (1: union; the number of
            sources: intersection).
        """
        kept = stats.vocabulary(min_cells, min_sources)
        return cls(stats.genes[kept], stats.medians(kept), target_sum=stats.target_sum, **kwargs)

    def encode_block(
        self, block: sp.csr_matrix, totals: np.ndarray, data_genes: np.ndarray, keys: Sequence[Any]
    ) -> TokenChunk:
        """Rank-value tokens of a block of cells."""
        col_map = self.column_map(data_genes)
        n = block.shape[0]
        rows, _, vocab, counts = expressed_entries(block, col_map)
        scores = (
            counts
            / np.asarray(totals, dtype=np.float64)[rows]
            * self.target_sum
            / self.medians[vocab]
        )
        order = sort_rows_desc(rows, scores, n)
        vocab = vocab[order]  # rows stay grouped: rows[order] == rows
        seg_counts, _, pos = row_segments(rows, n)
        ids, offsets, _ = _assemble(rows, vocab, pos, seg_counts, self.max_length - 1, None)
        return TokenChunk(ids=ids, offsets=offsets, keys=list(keys))


@register_tokenizer
class BinnedTokenizer(CellTokenizer):
    """scGPT-style value binning (see the module docstring).

    Parameters
    ----------
    genes
        Gene vocabulary.
    n_bins
        Number of bins including the zero bin (scGPT: 51), so expressed genes get bins
        1 … n_bins - 1; the value input is ``bin / (n_bins - 1)``.
    """

    type: ClassVar[str] = "singlecell.binned"
    fields: tuple[str, ...] = ("values",)

    def __init__(self, genes: Sequence[str], n_bins: int = DEFAULT_N_BINS, **kwargs: Any) -> None:
        super().__init__(genes, **kwargs)
        if int(n_bins) < 3:
            raise ConfigError(f"n_bins must be at least 3, got {n_bins}")
        self.n_bins = int(n_bins)

    def config(self) -> dict[str, Any]:
        """Vocabulary and settings."""
        return {**self._base_config(), "n_bins": self.n_bins}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BinnedTokenizer:
        """Rebuild from :meth:`config`."""
        c = dict(config)
        return cls(c.pop("genes"), **c)

    @classmethod
    def fit(
        cls,
        blocks,
        data_genes: np.ndarray,
        min_cells: int = 1,
        target_sum: float = TARGET_SUM,
        **kwargs: Any,
    ) -> BinnedTokenizer:
        """Fit the vocabulary (genes expressed in at least ``min_cells`` training cells)."""
        genes, _ = nonzero_medians(blocks, data_genes, min_cells, target_sum, medians=False)
        return cls(genes, target_sum=target_sum, **kwargs)

    @classmethod
    def from_statistics(
        cls, stats: CorpusGeneStats, min_cells: int = 1, min_sources: int = 1, **kwargs: Any
    ) -> BinnedTokenizer:
        """The vocabulary of a corpus (see :meth:`RankValueTokenizer.from_statistics`)."""
        kept = stats.vocabulary(min_cells, min_sources)
        return cls(stats.genes[kept], target_sum=stats.target_sum, **kwargs)

    def encode_block(
        self, block: sp.csr_matrix, totals: np.ndarray, data_genes: np.ndarray, keys: Sequence[Any]
    ) -> TokenChunk:
        """Gene tokens with per-cell quantile bins of log1p expression as values."""
        col_map = self.column_map(data_genes)
        n = block.shape[0]
        rows, _, vocab, counts = expressed_entries(block, col_map)
        # float32 values: within a cell equal float32 values mean equal counts, so the
        # float32 order is exact and the bins match np.quantile on these values.
        logs = np.log1p(
            counts / np.asarray(totals, dtype=np.float64)[rows] * self.target_sum
        ).astype(np.float32)
        order = sort_rows_desc(rows, logs, n, exact=False)
        vocab, svals = vocab[order], logs[order]  # rows stay grouped: rows[order] == rows
        seg_counts, starts, pos = row_segments(rows, n)
        bins = quantile_bins(svals, rows, seg_counts, starts, self.n_bins)
        values = (bins / (self.n_bins - 1)).astype(np.float32)
        ids, offsets, out_values = _assemble(
            rows, vocab, pos, seg_counts, self.max_length - 1, values
        )
        return TokenChunk(ids=ids, offsets=offsets, keys=list(keys), values=out_values)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    # numpy's own interpolation formula (np.quantile, method="linear"), for identical edges.
    diff = b - a
    out = a + diff * t
    return np.where(t >= 0.5, b - diff * (1 - t), out)


def sum_duplicates(
    rows: np.ndarray, vocab: np.ndarray, counts: np.ndarray, n_vocab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum the counts of entries that share a row and a vocabulary gene.

    Several data columns can map to one gene of a model (two symbols of one Ensembl id,
    an alias collapsed by a model's mapping dictionary); their counts are added, as
    Geneformer's tokenizer does (``sum_ensembl_ids``). The result is ordered by row, then
    by vocabulary index.

    Parameters
    ----------
    rows, vocab, counts
        Row, vocabulary index and count of each entry (rows non-decreasing).
    n_vocab
        Bound of ``vocab``.
    """
    key = rows.astype(np.int64) * np.int64(n_vocab) + vocab.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(uniq))
    return uniq // n_vocab, uniq % n_vocab, summed


def quantile_bins(
    values_desc: np.ndarray,
    rows: np.ndarray,
    counts: np.ndarray,
    starts: np.ndarray,
    n_bins: int,
    side: str = "right",
) -> np.ndarray:
    """Per-row ``np.digitize(x, np.quantile(row, np.linspace(0, 1, n_bins - 1)))``.

    ``side="left"`` counts the edges strictly below each value instead
    (``np.digitize(..., right=True)``), the other end of scGPT's random tie-breaking.

    Parameters
    ----------
    values_desc
        Values sorted by row, descending within each row (float32).
    rows, counts, starts
        Row of each value; per-row counts and start positions.
    n_bins
        Number of bins including the zero bin.

    Returns
    -------
    numpy.ndarray
        int64 bin of each value, 1 … n_bins - 1.
    """
    n_rows = len(counts)
    if len(values_desc) == 0:
        return np.zeros(0, dtype=np.int64)
    v = values_desc.astype(np.float64)
    q = np.linspace(0, 1, n_bins - 1)
    virtual = q[None, :] * (counts[:, None] - 1).astype(np.float64)  # (rows, edges)
    lo = np.floor(virtual)
    t = virtual - lo
    lo = lo.astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(counts[:, None] - 1, 0))
    # Ascending index k of a row is its descending position counts - 1 - k.
    end = (starts + counts - 1)[:, None]
    safe = counts[:, None] > 0
    a = np.where(safe, v[np.clip(end - lo, 0, len(v) - 1)], 0.0)
    b = np.where(safe, v[np.clip(end - hi, 0, len(v) - 1)], 0.0)
    edges = _lerp(a, b, t)
    # Count each row's edges <= x (or < x) with one exact sort of values and edges together
    # (keyed by row, then value; at equal values the edge sorts first for "right", last for
    # "left"). Shifting rows apart by offsets and one searchsorted would round an edge
    # within 1e-15 of a value onto it, and numpy's edges do fall that close (the virtual
    # index q * (n - 1) is inexact).
    n_edges = n_bins - 1
    all_rows = np.concatenate([rows, np.repeat(np.arange(n_rows), n_edges)])
    all_vals = np.concatenate([v, edges.reshape(-1)])
    is_edge = np.concatenate([np.zeros(len(v), dtype=np.int8), np.ones(edges.size, dtype=np.int8)])
    tiebreak = is_edge if side == "left" else 1 - is_edge
    order = np.lexsort((tiebreak, all_vals, all_rows))
    edge_sorted = is_edge[order]
    before = np.cumsum(edge_sorted) - edge_sorted  # edges sorted before each position
    values_at = edge_sorted == 0
    out = np.empty(len(v), dtype=np.int64)
    out[order[values_at]] = before[values_at] - n_edges * all_rows[order[values_at]]
    return out


def nonzero_medians(
    blocks,
    data_genes: np.ndarray,
    min_cells: int = 1,
    target_sum: float = TARGET_SUM,
    medians: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Genes expressed in at least ``min_cells`` cells and their non-zero medians.

    The median of gene ``g`` is taken over ``count / total * target_sum`` of the cells
    that express it (Geneformer's normalization factor; Geneformer approximates it with
    t-digests, here it is exact up to float32 rounding).

    Parameters
    ----------
    blocks
        Iterable of ``(csr_block, totals)``.
    data_genes
        Gene identifier of each column.

    Returns
    -------
    genes, medians
        Kept genes in data order, and their medians (None when ``medians=False``).
    """
    n_genes = len(data_genes)
    cells = np.zeros(n_genes, dtype=np.int64)
    keys = []
    for block, totals in blocks:
        block = block.tocsr()
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        keep = block.data > 0
        cols = block.indices[keep].astype(np.int64)
        cells += np.bincount(cols, minlength=n_genes)
        if medians:
            vals = block.data[keep] / np.asarray(totals, dtype=np.float64)[rows[keep]] * target_sum
            bits = np.asarray(vals, dtype=np.float32).view(np.uint32).astype(np.uint64)
            keys.append((cols.astype(np.uint64) << np.uint64(32)) | bits)
    kept = np.flatnonzero(cells >= max(1, int(min_cells)))
    genes = np.asarray(data_genes, dtype=object)[kept]
    if not medians:
        return genes, None
    allkeys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
    allkeys.sort()
    sorted_vals = (
        (allkeys & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32).astype(np.float64)
    )
    starts = np.cumsum(cells) - cells
    c = cells[kept]
    s = starts[kept]
    lo = sorted_vals[s + (c - 1) // 2]
    hi = sorted_vals[s + c // 2]
    return genes, (lo + hi) / 2.0


def _bucket_codes(values: np.ndarray) -> np.ndarray:
    """Histogram code of positive float32 values: exponent and leading mantissa bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (bits >> np.uint32(23 - MEDIAN_MANTISSA_BITS)).astype(np.int64)


def _code_floor(codes: np.ndarray) -> np.ndarray:
    """The smallest float32 value of each histogram code (float64)."""
    bits = (np.asarray(codes, dtype=np.int64) << (23 - MEDIAN_MANTISSA_BITS)).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


class CorpusGeneStats:
    """Streaming per-gene statistics of the training cells of several sources.

    Each source has its own gene panel (identifiers in its column order); genes are matched
    across sources by identifier. Blocks of training cells are added one at a time and
    only per-gene (and per source column) sums are kept, so memory depends on the number
    of genes, never on the number of cells:

    * ``genes``: the union of the panels, in order of first appearance (source order, then
      column order);
    * ``n_sources``: how many panels measure each gene; ``cells``: how many training cells
      express it (all sources);
    * ``source_counts[s]``: the counts of source ``s``'s training cells per column (its
      coverage by a vocabulary);
    * with ``medians``, a histogram per gene of ``count / total * target_sum`` over the
      cells expressing it (float32 buckets of the exponent and :data:`MEDIAN_MANTISSA_BITS`
      leading mantissa bits, at most 3.1% wide); :meth:`medians` interpolates within the
      median's bucket. Geneformer approximates its corpus medians too (t-digests).

    Parameters
    ----------
    panels
        Gene identifiers of each source's columns (unique within a source).
    target_sum
        Counts per cell after normalization.
    medians
        Keep the histograms (the rank tokenizer needs them; the binned one does not).
    """

    def __init__(
        self,
        panels: Sequence[Sequence[str] | np.ndarray],
        target_sum: float = TARGET_SUM,
        medians: bool = True,
    ) -> None:
        if not panels:
            raise ConfigError("a corpus needs at least one source")
        arrays = [np.asarray(p, dtype=object) for p in panels]
        self.genes: np.ndarray = np.asarray(pd.unique(np.concatenate(arrays)), dtype=object)
        index = pd.Index(self.genes)
        #: Union position of each source column.
        self.maps = [index.get_indexer(a) for a in arrays]
        n = len(self.genes)
        self.target_sum = float(target_sum)
        self.n_sources = np.zeros(n, dtype=np.int64)
        for m in self.maps:
            self.n_sources += np.bincount(m, minlength=n)
        self.cells = np.zeros(n, dtype=np.int64)
        self.source_counts = [np.zeros(len(a), dtype=np.float64) for a in arrays]
        self.source_cells = np.zeros(len(arrays), dtype=np.int64)
        self.with_medians = bool(medians)
        self._lo = int(_bucket_codes(np.array([self.target_sum * 2.0**MEDIAN_LOW_OCTAVES]))[0])
        self._hi = int(_bucket_codes(np.array([self.target_sum * 2.0]))[0])
        self.n_buckets = self._hi - self._lo + 1
        self.hist = np.zeros((n, self.n_buckets) if medians else (0, 0), dtype=np.uint32)

    def add(self, source: int, block: sp.csr_matrix, totals: np.ndarray) -> None:
        """Add a CSR block of training cells of source ``source`` (its columns, its order)
        with their library sizes."""
        block = block.tocsr()
        self.source_cells[source] += block.shape[0]
        keep = block.data > 0
        cols = block.indices[keep].astype(np.int64)
        data = block.data[keep]
        self.source_counts[source] += np.bincount(
            cols, weights=data, minlength=len(self.source_counts[source])
        )
        genes = self.maps[source][cols]
        n = len(self.genes)
        self.cells += np.bincount(genes, minlength=n)
        if not self.with_medians or genes.size == 0:
            return
        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))[keep]
        values = data / np.asarray(totals, dtype=np.float64)[rows] * self.target_sum
        code = np.clip(_bucket_codes(values) - self._lo, 0, self.n_buckets - 1)
        key = genes * self.n_buckets + code
        flat = self.hist.reshape(-1)
        if flat.size <= max(1 << 22, 4 * key.size):
            flat += np.bincount(key, minlength=flat.size).astype(np.uint32)
        else:  # a large vocabulary: no dense temporary of every (gene, bucket)
            np.add.at(flat, key, np.uint32(1))

    def vocabulary(self, min_cells: int = 1, min_sources: int = 1) -> np.ndarray:
        """Union positions of the genes measured in at least ``min_sources`` sources and
        expressed in at least ``min_cells`` training cells, in union order."""
        return np.flatnonzero(
            (self.n_sources >= max(1, int(min_sources))) & (self.cells >= max(1, int(min_cells)))
        )

    def medians(self, kept: np.ndarray) -> np.ndarray:
        """Non-zero median of ``count / total * target_sum`` of the genes ``kept`` (union
        positions of expressed genes), from the histograms (within one bucket, 3.1%)."""
        if not self.with_medians:
            raise ConfigError("these corpus statistics were collected without medians")
        kept = np.asarray(kept, dtype=np.int64)
        out = np.empty(len(kept), dtype=np.float64)
        for lo in range(0, len(kept), 4096):  # bounded temporaries for large vocabularies
            hist = self.hist[kept[lo : lo + 4096]].astype(np.int64)
            cum = np.cumsum(hist, axis=1)
            total = cum[:, -1]
            if np.any(total == 0):
                raise ConfigError("a gene without expressed cells has no median")
            rows = np.arange(len(hist))

            def value_at(rank: np.ndarray, hist=hist, cum=cum, rows=rows) -> np.ndarray:
                # Bucket of the rank-th value (0-based), then linear within the bucket.
                bucket = np.sum(cum <= rank[:, None], axis=1)
                before = np.where(bucket > 0, cum[rows, np.maximum(bucket - 1, 0)], 0)
                inside = hist[rows, bucket]
                floor = _code_floor(bucket + self._lo)
                width = _code_floor(bucket + self._lo + 1) - floor
                return floor + (rank - before + 0.5) / inside * width

            out[lo : lo + 4096] = (value_at((total - 1) // 2) + value_at(total // 2)) / 2.0
        return out

    def coverage(self, source: int, vocab_map: np.ndarray) -> dict[str, float]:
        """How the vocabulary (``vocab_map``: vocabulary index of each of the source's
        columns, -1 outside) covers source ``source``: its genes in the vocabulary, the
        vocabulary's genes it measures, the share of its training counts they carry."""
        inside = vocab_map >= 0
        counts = self.source_counts[source]
        total = float(counts.sum())
        return {
            "n_genes": len(vocab_map),
            "n_genes_in_vocabulary": int(inside.sum()),
            "n_vocabulary_measured": len(np.unique(vocab_map[inside])),
            "count_fraction": float(counts[inside].sum() / total) if total > 0 else float("nan"),
            "n_train_cells": int(self.source_cells[source]),
        }
