"""Read single-cell count matrices from AnnData (``.h5ad``), validating them.

The matrix is taken from ``X`` or a named layer, in CSR, CSC or dense form; gene
identifiers from ``var_names`` or a named ``var`` column. With ``backed=True`` the file is
opened with ``anndata.read_h5ad(backed="r")`` and rows are read block by block, so a
matrix larger than memory is validated and tokenized without ever being loaded whole.

Validation (each failure a :class:`~healthfm.errors.DataError` naming the file, the field
— ``X``, ``layers/<name>``, ``var/<column>``, ``obs/<column>`` — and an example cell or
gene):

* the file is not HDF5, or is truncated / corrupt;
* a missing layer, gene column, label column, group column or total column;
* duplicate or missing gene identifiers;
* NaN / infinite or negative values;
* non-integer values, unless the data are declared normalized (``normalized=True``);
* cells with no expressed gene.

All checks run per block of rows with numpy on the CSR arrays (no loop per cell or gene).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from healthfm.errors import DataError
from healthfm.fsutil import sha256_file
from healthfm.modality import Samples

log = logging.getLogger("healthfm")

#: Rows validated / tokenized at once.
BLOCK_ROWS = 8192
#: Backed rows covering at least 1/SPAN_READ of their span are read as the whole span.
SPAN_READ = 4


def _field_name(layer: str | None) -> str:
    return "X" if layer is None else f"layers/{layer}"


@dataclass
class CountMatrix:
    """The payload of single-cell :class:`~healthfm.modality.Samples`: cells × genes.

    Attributes
    ----------
    genes
        Gene identifier of each column (``str``).
    totals
        Library size of each cell (row sums, or an ``obs`` column such as ``n_counts``).
    field
        Where the values come from (``"X"`` or ``"layers/<name>"``), for messages.
    normalized
        Whether the values were declared normalized (non-integer values allowed).
    matrix
        In-memory CSR matrix (float32), or None when reading backed.
    backed
        The matrix on disk, or None: anything whose ``[slice]`` and ``[increasing
        positions]`` give rows (:class:`H5Rows` for an ``.h5ad``, an anndata sparse
        dataset or h5py dataset, :class:`healthfm.singlecell.soma.SomaRows`); a ``close()``
        of it is called once :meth:`blocks` are read.
    """

    genes: np.ndarray
    totals: np.ndarray
    field: str = "X"
    normalized: bool = False
    matrix: sp.csr_matrix | None = None
    backed: Any = None
    extra: dict[str, Any] = dataclass_field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes)."""
        return (len(self.totals), len(self.genes))

    def __len__(self) -> int:
        return len(self.totals)

    def rows(self, indices: np.ndarray | slice) -> sp.csr_matrix:
        """The chosen cells as a float32 CSR matrix, in the order given."""
        if self.matrix is not None:
            return self.matrix[indices]
        if isinstance(indices, slice):
            return _to_csr(self.backed[indices])
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return sp.csr_matrix((0, len(self.genes)), dtype=np.float32)
        # Backed datasets read sorted, unique rows best; put the rows back in order after.
        # Rows that fill at least 1/SPAN_READ of their span (a split's training cells) are
        # read as the one contiguous span and picked in memory: one sequential read instead
        # of a fancy-indexed one.
        uniq, inverse = np.unique(idx, return_inverse=True)
        span = int(uniq[-1] - uniq[0]) + 1
        if span == len(uniq):
            block = _to_csr(self.backed[int(uniq[0]) : int(uniq[-1]) + 1])
        elif span <= SPAN_READ * len(uniq):
            block = _to_csr(self.backed[int(uniq[0]) : int(uniq[-1]) + 1])[uniq - uniq[0]]
        else:
            block = _to_csr(self.backed[uniq])
        return block[inverse.reshape(-1)]

    def blocks(self, indices: np.ndarray | None = None, size: int = BLOCK_ROWS):
        """Yield ``(positions, csr)`` blocks of at most ``size`` cells, in order.

        A matrix on disk that can release its file (:class:`H5Rows`) does so once the
        blocks are read, so many sources of a corpus hold no open file (nor its caches).
        """
        n = len(self) if indices is None else len(indices)
        try:
            for lo in range(0, n, size):
                hi = min(n, lo + size)
                if indices is None:
                    yield np.arange(lo, hi), self.rows(slice(lo, hi))
                else:
                    yield indices[lo:hi], self.rows(indices[lo:hi])
        finally:
            release = getattr(self.backed, "close", None)
            if release is not None:
                release()

    def to_csr(self, indices: np.ndarray | None = None) -> sp.csr_matrix:
        """All (or the chosen) cells in one CSR matrix."""
        if self.matrix is not None:
            return self.matrix if indices is None else self.matrix[indices]
        parts = [block for _, block in self.blocks(indices)]
        return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(self.genes)))


#: No cell holds this many molecules; totals (and squares of values) beyond it overflow
#: the float32 arithmetic downstream (normalisation, baselines) to inf.
MAX_TOTAL = 1e15


class H5Rows:
    """The count matrix of an ``.h5ad`` on disk, opened on demand: rows by slice or by
    increasing positions (anndata's backed sparse dataset, or the h5py dataset of a dense
    ``X``), :meth:`close` to release the file and HDF5's caches until the next read.

    An AnnData opened backed keeps its file, and the HDF5 caches filled while reading it,
    for as long as it lives (about 20 MB per 10,000-cell file read once); a corpus of
    hundreds of files then grows with its files. This reader holds only the path.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    key
        The matrix element (``X``).
    shape
        (cells, genes), known from the first opening.
    """

    def __init__(self, path: str | Path, key: str, shape: tuple[int, int]) -> None:
        self.path = Path(path)
        self.key = key
        self.shape = tuple(int(v) for v in shape)
        self._file: Any = None
        self._x: Any = None

    def __getitem__(self, index: slice | np.ndarray) -> Any:
        if self._x is None:
            import h5py

            self._file = h5py.File(self.path, "r")
            element = self._file[self.key]
            self._x = _sparse_dataset(element) if isinstance(element, h5py.Group) else element
        return self._x[index]

    def close(self) -> None:
        """Close the file (a later read opens it again)."""
        if self._file is not None:
            self._x = None
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_x": None}


def validate_matrix(
    matrix: CountMatrix, keys: np.ndarray, source: Any, total_column: str | None, totals: Any
) -> None:
    """Validate every block of ``matrix`` (:func:`validate_block`, streamed), then set its
    library sizes (the ``total_column`` values given as ``totals``, each positive and finite,
    else the cells' sums) and ``extra["n_expressed"]``: shared by the ``.h5ad`` and
    TileDB-SOMA readers."""
    sums = np.empty(len(keys), dtype=np.float64)
    expressed = np.empty(len(keys), dtype=np.int64)
    for positions, block in matrix.blocks():
        sums[positions], expressed[positions] = validate_block(
            block,
            positions,
            keys,
            matrix.genes,
            normalized=matrix.normalized,
            source=source,
            field_name=matrix.field,
        )
    if totals is not None:
        totals = np.asarray(totals, dtype=np.float64)
        bad = np.flatnonzero(~(totals > 0) | ~np.isfinite(totals))
        if bad.size:
            raise DataError(
                f"library size must be positive, got {totals[bad[0]]!r}",
                file=source,
                column=f"obs/{total_column}",
                row=str(keys[bad[0]]),
            )
    else:
        totals = sums
    matrix.totals = totals
    matrix.extra["n_expressed"] = expressed


def _sparse_dataset(group: Any) -> Any:
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset
    return sparse_dataset(group)


def _to_csr(x: Any) -> sp.csr_matrix:
    if sp.issparse(x):
        out = x.tocsr()
    else:
        dense = np.asarray(x)
        if dense.dtype == np.float16:  # scipy.sparse has no float16: widen (exact)
            dense = dense.astype(np.float32)
        out = sp.csr_matrix(dense)
    if out.dtype != np.float32:
        out = out.astype(np.float32)
    out.sum_duplicates()
    return out


def check_h5ad_file(path: Path) -> None:
    """Raise a :class:`DataError` unless ``path`` is an existing HDF5 file."""
    import h5py

    if not path.is_file():
        raise DataError("file not found", file=path)
    try:
        ok = h5py.is_hdf5(path)
    except OSError as exc:  # pragma: no cover - unreadable file
        raise DataError(f"cannot read the file: {exc}", file=path) from exc
    if not ok:
        raise DataError(
            "not an HDF5 file (an .h5ad must be HDF5; is it a .loom, .csv or .zarr?)", file=path
        )


def open_h5ad(path: str | Path, backed: bool = False):
    """Open an ``.h5ad`` with anndata, turning low-level failures into :class:`DataError`."""
    import anndata as ad

    path = Path(path)
    check_h5ad_file(path)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise DataError(
            f"cannot read the .h5ad (truncated or corrupt HDF5, or not written by anndata): "
            f"{type(exc).__name__}: {exc}",
            file=path,
        ) from exc


def _gene_ids(adata, gene_column: str | None, source: Path | str) -> np.ndarray:
    if gene_column is None:
        genes = np.asarray(adata.var_names).astype(str)
        where = "var_names"
    else:
        if gene_column not in adata.var.columns:
            raise DataError(
                f"gene column {gene_column!r} is not in var (columns: {list(adata.var.columns)})",
                file=source,
                column=f"var/{gene_column}",
            )
        col = adata.var[gene_column]
        missing = np.flatnonzero(col.isna().to_numpy())
        if missing.size:
            raise DataError(
                f"gene column has {missing.size} missing identifier(s), e.g. for var "
                f"{adata.var_names[missing[0]]!r}",
                file=source,
                column=f"var/{gene_column}",
                row=str(adata.var_names[missing[0]]),
            )
        genes = col.astype(str).to_numpy()
        where = f"var/{gene_column}"
    empty = (
        np.flatnonzero(np.char.str_len(genes.astype(str)) == 0) if len(genes) else np.zeros(0, int)
    )
    if empty.size:
        raise DataError("empty gene identifier", file=source, column=where, row=int(empty[0]))
    uniq, counts = np.unique(genes, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1]
        raise DataError(
            f"{dup.size} duplicate gene identifier(s), e.g. {dup[0]!r} (appears {counts[counts > 1][0]}×); "
            "sum or drop duplicates first (e.g. adata.var_names_make_unique() or aggregate by gene)",
            file=source,
            column=where,
            row=str(dup[0]),
        )
    return genes


def _text_columns(var: pd.DataFrame) -> dict[str, np.ndarray]:
    """The string / categorical columns of ``var`` as str arrays (missing → "")."""
    out = {}
    for name in var.columns:
        col = var[name]
        if (
            isinstance(col.dtype, pd.CategoricalDtype)
            or pd.api.types.is_string_dtype(col.dtype)
            or col.dtype == object
        ):
            out[str(name)] = col.astype(object).where(col.notna(), "").astype(str).to_numpy()
    return out


def _obs_column(adata, column: str, source: Path | str, what: str) -> Any:
    if column not in adata.obs.columns:
        raise DataError(
            f"{what} column {column!r} is not in obs (columns: {list(adata.obs.columns)})",
            file=source,
            column=f"obs/{column}",
        )
    col = adata.obs[column]
    missing = np.flatnonzero(col.isna().to_numpy())
    if missing.size:
        raise DataError(
            f"{what} column has {missing.size} missing value(s), e.g. cell {adata.obs_names[missing[0]]!r}",
            file=source,
            column=f"obs/{column}",
            row=str(adata.obs_names[missing[0]]),
        )
    return col


def _check_dtype(x: Any, source: Path | str, field_name: str) -> None:
    """Expression values must be real numbers: a complex matrix (its imaginary part would
    be dropped), byte strings or objects are refused, naming the matrix and its dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return
    kind = np.dtype(dtype).kind
    if kind == "c":
        raise DataError(
            f"the expression matrix is complex-valued ({dtype}); healthfm would drop the "
            "imaginary part: store real counts",
            file=source,
            column=field_name,
        )
    if kind not in "biuf":
        raise DataError(
            f"the expression matrix holds {dtype} values, not numbers (byte strings or "
            "objects); store numeric counts",
            file=source,
            column=field_name,
        )


def _check_structure(
    block: sp.csr_matrix, positions: np.ndarray, barcodes: np.ndarray, n_genes: int,
    source: Path | str, field_name: str,
) -> None:  # fmt: skip
    """A CSR block whose column indices or row pointers are out of range is refused
    before any value is read through them (numba / C code would read out of bounds)."""
    indptr, indices = block.indptr, block.indices
    bad_ptr = (
        len(indptr) != block.shape[0] + 1
        or indptr[0] != 0
        or indptr[-1] != len(indices)
        or (np.diff(indptr) < 0).any()
    )
    if bad_ptr:
        raise DataError(
            "the sparse matrix's row pointers (indptr) are inconsistent: a damaged file",
            file=source,
            column=f"{field_name}/indptr",
            row=int(positions[0]),
        )
    bad = (indices < 0) | (indices >= n_genes)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(indptr, k, side="right") - 1)
        raise DataError(
            f"sparse column index {int(indices[k])} is out of range for {n_genes} genes "
            f"(cell {str(barcodes[positions[row]])!r}); a damaged file",
            file=source,
            column=f"{field_name}/indices",
            row=int(positions[row]),
        )


def validate_block(
    block: sp.csr_matrix,
    positions: np.ndarray,
    barcodes: np.ndarray,
    genes: np.ndarray,
    *,
    normalized: bool,
    source: Path | str,
    field_name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Check one CSR block of cells; return its row sums (float64) and expressed-gene counts.

    Raises
    ------
    DataError
        On NaN/inf, negative or (unless ``normalized``) non-integer values, or a cell with
        no expressed gene; the message names an example cell (barcode) and gene.
    """
    _check_structure(block, positions, barcodes, len(genes), source, field_name)
    data = block.data
    row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))

    def fail(mask: np.ndarray, what: str) -> None:
        k = int(np.flatnonzero(mask)[0])
        cell = barcodes[positions[row_of[k]]]
        gene = genes[block.indices[k]]
        raise DataError(
            f"{what}: value {data[k]!r} for cell {cell!r}, gene {gene!r} "
            f"({int(mask.sum())} such value(s) in rows {positions[0]}..{positions[-1]})",
            file=source,
            column=field_name,
            row=str(cell),
        )

    bad = ~np.isfinite(data)
    if bad.any():
        fail(bad, "NaN or infinite expression value")
    bad = data < 0
    if bad.any():
        fail(bad, "negative expression value")
    if not normalized:
        bad = data != np.round(data)
        if bad.any():
            fail(
                bad,
                "non-integer value where raw counts are expected (use --layer to pick a counts "
                "layer, or --normalized if the data are normalized on purpose)",
            )
    expressed = np.bincount(row_of[data > 0], minlength=block.shape[0])
    empty = np.flatnonzero(expressed == 0)
    if empty.size:
        cell = barcodes[positions[empty[0]]]
        raise DataError(
            f"cell {cell!r} has no expressed gene ({empty.size} such cell(s) in rows "
            f"{positions[0]}..{positions[-1]}); filter empty cells first "
            "(e.g. sc.pp.filter_cells(adata, min_genes=1))",
            file=source,
            column=field_name,
            row=str(cell),
        )
    # Summed in float64 (float32 sums of huge counts overflow to inf), then bounded.
    sums = np.bincount(row_of, weights=data.astype(np.float64), minlength=block.shape[0])
    big = np.flatnonzero(~(sums < MAX_TOTAL))
    if big.size:
        cell = barcodes[positions[big[0]]]
        raise DataError(
            f"the counts of cell {str(cell)!r} sum to {sums[big[0]]:.3g}, beyond {MAX_TOTAL:.0e}: no "
            "cell holds that many molecules, and float32 arithmetic would overflow to inf",
            file=source,
            column=field_name,
            row=str(cell),
        )
    return sums, expressed


def _matrix_of(adata, layer: str | None, source: Path | str) -> Any:
    if layer is None:
        if adata.X is None:
            raise DataError("the AnnData has no X; give --layer", file=source, column="X")
        return adata.X
    if layer not in adata.layers:
        raise DataError(
            f"layer {layer!r} not found (layers: {list(adata.layers.keys())})",
            file=source,
            column=f"layers/{layer}",
        )
    return adata.layers[layer]


def anndata_hash(adata, matrix: Any) -> str:
    """SHA-256 of an in-memory AnnData's matrix, cell barcodes and gene names."""
    digest = hashlib.sha256()
    digest.update("\x00".join(map(str, adata.obs_names)).encode())
    digest.update("\x00".join(map(str, adata.var_names)).encode())
    csr = _to_csr(matrix)
    for arr in (csr.indptr, csr.indices, csr.data):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def samples_from_anndata(
    adata,
    source: str | Path = "<AnnData>",
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    total_column: str | None = None,
    normalized: bool = False,
    data_hash: str | None = None,
) -> Samples:
    """Validate an AnnData (in memory or backed) and wrap it as :class:`Samples`.

    Parameters
    ----------
    adata
        The AnnData.
    source
        Its file (for messages and provenance).
    layer
        Counts layer; ``X`` when None.
    gene_column
        ``var`` column of gene identifiers (symbols or Ensembl ids); ``var_names`` when None.
    label_column
        ``obs`` column of cell labels (cell type), or None.
    group_column
        ``obs`` column of the split unit (donor, sample, batch); each cell is its own group
        (its barcode) when None.
    total_column
        ``obs`` column of library sizes (Geneformer reads ``n_counts``); row sums when None.
    normalized
        Allow non-integer values (normalized data).
    data_hash
        Provenance hash; computed from the matrix when None.
    """
    field_name = _field_name(layer)
    genes = _gene_ids(adata, gene_column, source)
    barcodes = np.asarray(adata.obs_names).astype(str)
    if len(barcodes) == 0:
        raise DataError("the AnnData has no cells", file=source, column="obs")
    # Barcodes are the keys of the output: duplicates would give rows nobody can tell apart.
    unique, counts = np.unique(barcodes, return_counts=True)
    if len(unique) < len(barcodes):
        dup = np.flatnonzero(counts > 1)
        name = unique[dup[0]]
        row = int(np.flatnonzero(barcodes == name)[1])
        raise DataError(
            f"{len(barcodes) - len(unique)} duplicate cell barcode(s) in obs_names, e.g. "
            f"{name!r} ({counts[dup[0]]}×); make them unique first (adata.obs_names_make_unique())",
            file=source,
            column="obs_names",
            row=row,
        )
    x = _matrix_of(adata, layer, source)
    _check_dtype(x, source, field_name)
    backed = bool(getattr(adata, "isbacked", False)) and layer is None
    if backed:
        matrix = CountMatrix(
            genes=genes,
            totals=np.zeros(len(barcodes)),
            field=field_name,
            normalized=normalized,
            backed=x,
        )
    else:
        matrix = CountMatrix(
            genes=genes,
            totals=np.zeros(len(barcodes)),
            field=field_name,
            normalized=normalized,
            matrix=_to_csr(x),
        )
    if matrix.shape[1] != x.shape[1] or x.shape[0] != len(barcodes):
        raise DataError(
            f"matrix shape {x.shape} does not match obs × var", file=source, column=field_name
        )
    validate_matrix(
        matrix,
        barcodes,
        source,
        total_column,
        _obs_column(adata, total_column, source, "total") if total_column is not None else None,
    )
    if gene_column is None:
        # Candidate gene identifiers for a tokenizer that picks its own column (published
        # models: symbols or Ensembl ids); the chosen one is reported.
        matrix.extra["var_columns"] = {"var_names": genes, **_text_columns(adata.var)}
    labels = None
    categorical_labels = False
    if label_column is not None:
        label_obs = _obs_column(adata, label_column, source, "label")
        # A categorical / string obs column is classes even when its values look like
        # numbers (Leiden cluster ids "0".."30"): never a regression target.
        categorical_labels = not pd.api.types.is_numeric_dtype(label_obs.dtype)
        labels = label_obs.astype(str).to_numpy()
    groups = barcodes
    if group_column is not None:
        groups = _obs_column(adata, group_column, source, "group").astype(str).to_numpy()
    if data_hash is None:
        data_hash = sha256_file(source) if Path(str(source)).is_file() else anndata_hash(adata, x)
    return Samples(
        source=Path(str(source)),
        keys=barcodes,
        groups=np.asarray(groups),
        labels=labels,
        payload=matrix,
        data_hash=data_hash,
        label_column=label_column,
        info={
            "layer": layer,
            "gene_column": gene_column,
            "total_column": total_column,
            "group_column": group_column,
            "normalized": normalized,
            "n_genes": len(genes),
            "categorical_labels": categorical_labels,
        },
    )


def read_h5ad(
    path: str | Path,
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    total_column: str | None = None,
    normalized: bool = False,
    backed: bool = False,
) -> Samples:
    """Read and validate an ``.h5ad`` file into :class:`Samples` (see :func:`samples_from_anndata`).

    With ``backed=True`` the count matrix stays on disk (``X`` only; layers are loaded by
    anndata) and is read in blocks of :data:`BLOCK_ROWS` cells.
    """
    path = Path(path)
    adata = open_h5ad(path, backed=backed)
    try:
        samples = samples_from_anndata(
            adata,
            path,
            layer=layer,
            gene_column=gene_column,
            label_column=label_column,
            group_column=group_column,
            total_column=total_column,
            normalized=normalized,
        )
    except (OSError, RuntimeError) as exc:
        # Reading blocks of a damaged file can fail after the header opened fine.
        raise DataError(
            f"cannot read the matrix (truncated or corrupt file?): {exc}",
            file=path,
            column=_field_name(layer),
        ) from exc
    finally:
        if backed:
            adata.file.close()
    matrix = samples.payload
    if matrix.backed is not None:
        # Read on demand from here on; the AnnData's file (and its caches) is closed.
        matrix.backed = H5Rows(path, "X", matrix.shape)
    return samples


@dataclass
class Coverage:
    """How well a model's gene vocabulary covers a data set."""

    n_model_genes: int
    n_data_genes: int
    n_shared: int
    count_fraction: float
    cells_without_model_gene: int
    example_missing: list[str]
    #: Data genes mapped onto a model gene (more than ``n_shared`` when several data
    #: identifiers map to one model gene); None: ``n_shared``.
    n_data_shared: int | None = None

    @property
    def model_fraction(self) -> float:
        """Fraction of the model's genes present in the data."""
        return self.n_shared / max(self.n_model_genes, 1)

    def report(self) -> str:
        """A one-paragraph, human-readable coverage report."""
        text = (
            f"gene vocabulary coverage: {self.n_shared:,} of the model's {self.n_model_genes:,} genes "
            f"({100 * self.model_fraction:.1f}%) are in the data; they carry "
            f"{100 * self.count_fraction:.1f}% of the data's counts; "
            f"{self.n_data_genes - (self.n_shared if self.n_data_shared is None else self.n_data_shared):,}"
            f" of the data's {self.n_data_genes:,} genes are not "
            "in the model's vocabulary and are ignored"
        )
        if self.example_missing:
            text += f" (e.g. {', '.join(self.example_missing)})"
        if self.cells_without_model_gene:
            text += f"; {self.cells_without_model_gene:,} cell(s) express no model gene"
        return text


def add_obsm(
    source: str | Path,
    out: str | Path,
    key: str,
    embeddings: np.ndarray,
    uns: dict[str, dict[str, Any]] | None = None,
    block_rows: int = 65536,
) -> Path:
    """Write ``out``: a copy of the ``.h5ad`` ``source`` with ``obsm[key] = embeddings``.

    The copy is made file to file and the array written in row blocks with h5py in
    anndata's on-disk encoding (an ``array`` element), so neither the input nor the
    embeddings (which may be a memory map) are ever held in memory: an atlas of millions
    of cells is written in constant memory. ``uns`` entries are merged into the file's
    ``uns`` one level deep (``{"healthfm": {key: info}}`` adds ``uns/healthfm/<key>``).
    The file appears at ``out`` only once complete (fsync, rename).
    """
    import shutil

    import h5py
    from anndata.io import write_elem

    from healthfm.fsutil import atomic_file

    n, d = embeddings.shape
    with atomic_file(out) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as handle:
            obsm = _dict_group(handle, "obsm")
            if key in obsm:
                del obsm[key]
            data = obsm.create_dataset(
                key, shape=(n, d), dtype="float32", chunks=(max(1, min(n, 4096)), d)
            )
            data.attrs["encoding-type"] = "array"
            data.attrs["encoding-version"] = "0.2.0"
            for start in range(0, n, block_rows):
                data[start : start + block_rows] = np.asarray(
                    embeddings[start : start + block_rows], dtype=np.float32
                )
            root = _dict_group(handle, "uns")
            for name, entries in (uns or {}).items():
                group = _dict_group(root, name)
                for entry, value in entries.items():
                    if entry in group:
                        del group[entry]
                    write_elem(group, entry, value)
    return Path(out)


def _dict_group(parent: Any, name: str) -> Any:
    # An anndata "dict" element (a group), created when absent or when something else
    # (an old scalar entry) holds the name.
    import h5py

    if name in parent and not isinstance(parent[name], h5py.Group):
        del parent[name]
    if name not in parent:
        group = parent.create_group(name)
        group.attrs["encoding-type"] = "dict"
        group.attrs["encoding-version"] = "0.1.0"
    return parent[name]
