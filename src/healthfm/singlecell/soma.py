"""Read a TileDB-SOMA experiment (the CELLxGENE Census format) as single-cell samples.

A SOMA experiment is a folder (or a URI) holding ``obs`` (one row per cell) and
measurements (``ms/RNA``) with ``var`` (one row per gene) and X layers (sparse cells × genes
arrays; Census keeps raw counts in ``raw``). :func:`read_soma` presents one as the same
:class:`~healthfm.singlecell.reader.CountMatrix` an ``.h5ad`` gives — gene identifiers,
library sizes, ``n_expressed``, ``blocks()`` of CSR rows — so tokenizer fitting,
tokenization and embedding run unchanged. The X layer is never loaded whole: rows are read
block by block (:class:`SomaRows`) by their ``soma_joinid`` coordinates.

* Cells: all of ``obs``, or those an ``obs_filter`` keeps (SOMA's ``value_filter``
  syntax, e.g. ``"tissue_general == 'blood' and is_primary_data == True"``), in
  ``soma_joinid`` order; keys are ``obs_id`` when ``obs`` has it, else the joinids.
* Genes: the ``var`` column ``gene_column``; by default ``feature_id`` (Census: Ensembl
  ids), else ``var_id`` (where ``tiledbsoma.io.from_h5ad`` keeps an AnnData's
  ``var_names``).
* Labels, groups, library sizes: ``obs`` columns, as for an ``.h5ad``.

The values are validated block by block as for an ``.h5ad`` (finite, non-negative,
integer unless ``normalized``, no empty cell). Needs ``pip install 'healthfm[soma]'``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from healthfm.errors import ConfigError, DataError
from healthfm.modality import Samples
from healthfm.singlecell.reader import CountMatrix, validate_matrix

log = logging.getLogger("healthfm")

DEFAULT_MEASUREMENT = "RNA"
DEFAULT_X_LAYER = "raw"
#: ``var`` columns tried, in order, when no gene column is named.
DEFAULT_GENE_COLUMNS = ("feature_id", "var_id")
#: ``obs`` column of cell identifiers (``tiledbsoma.io.from_h5ad`` writes obs_names there).
OBS_ID_COLUMN = "obs_id"


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as exc:
        raise ConfigError(
            "reading a TileDB-SOMA experiment needs tiledbsoma: pip install 'healthfm[soma]'"
        ) from exc
    return tiledbsoma


def _is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def looks_like_soma(path: str | Path) -> bool:
    """Cheap sniff (no import, no read): a local folder laid out as a TileDB group with
    ``obs`` and ``ms`` members (a SOMA experiment)."""
    if _is_uri(path):
        return False
    path = Path(path)
    group = (path / "__tiledb_group.tdb").exists() or (path / "__group").is_dir()
    return path.is_dir() and group and (path / "obs").exists() and (path / "ms").exists()


def is_soma_experiment(path: str | Path) -> bool:
    """Whether ``path`` is a SOMA experiment (``tiledbsoma.Experiment.exists``; a local
    folder must pass :func:`looks_like_soma` first, so no import for other inputs)."""
    if not _is_uri(path) and not looks_like_soma(path):
        return False
    return bool(_tiledbsoma().Experiment.exists(str(path)))


class SomaRows:
    """Rows of a SOMA X layer by position among the selected cells: the ``backed`` matrix
    of a :class:`CountMatrix` (``rows[slice]`` or ``rows[sorted unique positions]`` → CSR).

    Parameters
    ----------
    array
        The open ``SparseNDArray`` (cells × genes, by ``soma_joinid``).
    obs_joinids
        ``soma_joinid`` of each selected cell, increasing.
    var_joinids
        ``soma_joinid`` of each gene column.
    """

    def __init__(self, array: Any, obs_joinids: np.ndarray, var_joinids: np.ndarray) -> None:
        self.array = array
        self.obs_joinids = np.asarray(obs_joinids, dtype=np.int64)
        var_joinids = np.asarray(var_joinids, dtype=np.int64)
        self.n_genes = len(var_joinids)
        self._column = np.full(int(var_joinids.max(initial=-1)) + 1, -1, dtype=np.int64)
        self._column[var_joinids] = np.arange(len(var_joinids))

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes)."""
        return (len(self.obs_joinids), self.n_genes)

    def __getitem__(self, index: slice | np.ndarray) -> sp.csr_matrix:
        joinids = self.obs_joinids[index]
        n = len(joinids)
        if n == 0:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        if int(joinids[-1]) - int(joinids[0]) + 1 == n:
            coords: Any = slice(int(joinids[0]), int(joinids[-1]))  # SOMA slices are closed
        else:
            coords = joinids
        table = self.array.read(coords=(coords,)).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy().astype(np.float32, copy=False)
        rows = np.searchsorted(joinids, dim0)
        cols = self._column[np.minimum(dim1, len(self._column) - 1)]
        inside = (dim1 < len(self._column)) & (cols >= 0)
        if not inside.all():  # entries of genes var does not list
            rows, cols, data = rows[inside], cols[inside], data[inside]
        out = sp.csr_matrix((data, (rows, cols)), shape=(n, self.n_genes), dtype=np.float32)
        out.sum_duplicates()
        return out


def _signature(path: str | Path, parts: list[str]) -> str:
    """Provenance of an experiment: SHA-256 of its files' relative paths and sizes (TileDB
    fragments are immutable and named by timestamp and uuid, so an edit adds files) and of
    the read's options; for a remote URI, of the URI and the options."""
    digest = hashlib.sha256()
    digest.update("\x00".join(parts).encode())
    if not _is_uri(path):
        root = Path(path)
        entries = []
        for folder, _dirs, files in os.walk(root):
            for name in files:
                full = Path(folder) / name
                entries.append(f"{full.relative_to(root)}\x00{full.stat().st_size}")
        digest.update("\x00".join(sorted(entries)).encode())
    else:
        digest.update(str(path).encode())
    return digest.hexdigest()


def _text(values: Any) -> np.ndarray:
    col = pd.Series(values)
    return col.astype(object).where(col.notna(), "").astype(str).to_numpy()


def read_soma(
    path: str | Path,
    *,
    measurement: str | None = None,
    x_layer: str | None = None,
    obs_filter: str | None = None,
    gene_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    total_column: str | None = None,
    normalized: bool = False,
) -> Samples:
    """Read and validate a TileDB-SOMA experiment into :class:`Samples` (see the module
    docstring); the X layer stays on disk and is read in blocks of cells.

    Parameters
    ----------
    path
        The experiment folder (or URI).
    measurement
        Measurement name (default ``RNA``).
    x_layer
        X layer of counts (default ``raw``).
    obs_filter
        SOMA ``value_filter`` on ``obs`` choosing the cells (all when None).
    gene_column
        ``var`` column of gene identifiers (default ``feature_id``, else ``var_id``).
    label_column, group_column, total_column
        ``obs`` columns of labels, split units and library sizes.
    normalized
        Allow non-integer values.
    """
    soma = _tiledbsoma()
    source = str(path) if _is_uri(path) else Path(path)
    if not _is_uri(path) and not Path(path).exists():
        raise DataError("file not found", file=source)
    if not is_soma_experiment(path):
        raise DataError(
            "not a TileDB-SOMA experiment (a folder with obs and ms, as written by "
            "tiledbsoma.io.from_h5ad or the CELLxGENE Census)",
            file=source,
        )
    measurement = measurement or DEFAULT_MEASUREMENT
    x_layer = x_layer or DEFAULT_X_LAYER
    exp = soma.Experiment.open(str(path))
    try:
        return _read(
            exp,
            source,
            measurement=measurement,
            x_layer=x_layer,
            obs_filter=obs_filter,
            gene_column=gene_column,
            label_column=label_column,
            group_column=group_column,
            total_column=total_column,
            normalized=normalized,
        )
    except BaseException:
        exp.close()
        raise


def _x_array(
    exp: Any, source: str | Path, measurement: str, x_layer: str, soma: Any
) -> tuple[Any, str]:
    """The measurement's sparse X layer and its name (``ms/<measurement>/X/<layer>``)."""
    if measurement not in exp.ms:
        raise DataError(
            f"measurement {measurement!r} not found (measurements: {sorted(exp.ms.keys())})",
            file=source,
            column=f"ms/{measurement}",
        )
    ms = exp.ms[measurement]
    layers = sorted(ms.X.keys()) if "X" in ms else []
    if x_layer not in layers:
        raise DataError(
            f"X layer {x_layer!r} not found in measurement {measurement!r} (layers: {layers})",
            file=source,
            column=f"ms/{measurement}/X/{x_layer}",
        )
    array = ms.X[x_layer]
    field_name = f"ms/{measurement}/X/{x_layer}"
    if not isinstance(array, soma.SparseNDArray):
        raise DataError(
            "the X layer is not a sparse array (SparseNDArray)", file=source, column=field_name
        )
    return array, field_name


def _genes(
    ms: Any,
    source: str | Path,
    measurement: str,
    gene_column: str | None,
    array: Any,
    field_name: str,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Genes: one var column, unique and non-empty, in joinid order.

    Returns the gene identifiers, their var joinids and the var column they come from.
    """
    var_columns = [f.name for f in ms.var.schema]
    if gene_column is None:
        found = [c for c in DEFAULT_GENE_COLUMNS if c in var_columns]
        if not found:
            raise DataError(
                f"no gene column given and var has none of {list(DEFAULT_GENE_COLUMNS)} "
                f"(columns: {var_columns}); give gene_column",
                file=source,
                column=f"ms/{measurement}/var",
            )
        gene_column = found[0]
    elif gene_column not in var_columns:
        raise DataError(
            f"gene column {gene_column!r} is not in var (columns: {var_columns})",
            file=source,
            column=f"ms/{measurement}/var/{gene_column}",
        )
    var = ms.var.read(column_names=["soma_joinid", gene_column]).concat().to_pandas()
    var = var.sort_values("soma_joinid", kind="stable")
    genes = _text(var[gene_column])
    where = f"ms/{measurement}/var/{gene_column}"
    empty = np.flatnonzero(np.char.str_len(genes.astype(str)) == 0)
    if empty.size:
        raise DataError(
            f"{empty.size} missing or empty gene identifier(s)",
            file=source,
            column=where,
            row=int(var["soma_joinid"].iloc[empty[0]]),
        )
    uniq, counts = np.unique(genes, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1]
        raise DataError(
            f"{dup.size} duplicate gene identifier(s), e.g. {dup[0]!r}; give another "
            "gene_column (feature_id holds unique Ensembl ids in Census)",
            file=source,
            column=where,
            row=str(dup[0]),
        )
    if len(genes) != array.shape[1] and int(var["soma_joinid"].max()) >= array.shape[1]:
        raise DataError(
            f"var has joinids beyond the X layer's {array.shape[1]} columns",
            file=source,
            column=field_name,
        )
    return genes, var["soma_joinid"].to_numpy(), gene_column


def _cells(
    exp: Any,
    source: str | Path,
    obs_filter: str | None,
    wanted: dict[str, str | None],
    array: Any,
    field_name: str,
    soma: Any,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Cells: obs (filtered), the columns asked for, in joinid order; unique cell ids.

    Returns obs, the cells' X rows (joinids) and their ids.
    """
    obs_columns = [f.name for f in exp.obs.schema]
    for what, column in wanted.items():
        if column is not None and column not in obs_columns:
            raise DataError(
                f"{what} column {column!r} is not in obs (columns: {obs_columns})",
                file=source,
                column=f"obs/{column}",
            )
    names = ["soma_joinid"]
    if OBS_ID_COLUMN in obs_columns:
        names.append(OBS_ID_COLUMN)
    names += [c for c in dict.fromkeys(v for v in wanted.values() if v) if c not in names]
    try:
        obs = exp.obs.read(value_filter=obs_filter, column_names=names).concat().to_pandas()
    except (soma.SOMAError, ValueError, TypeError) as exc:
        raise DataError(
            f"cannot apply obs_filter {obs_filter!r}: {str(exc).splitlines()[0]} "
            f"(obs columns: {obs_columns})",
            file=source,
            column="obs",
        ) from exc
    if len(obs) == 0:
        raise DataError(
            "no cell to read"
            + (f": obs_filter {obs_filter!r} keeps none" if obs_filter else ": obs is empty"),
            file=source,
            column="obs",
        )
    obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    joinids = obs["soma_joinid"].to_numpy(dtype=np.int64)
    if int(joinids.max()) >= array.shape[0]:
        raise DataError(
            f"obs has joinids beyond the X layer's {array.shape[0]} rows",
            file=source,
            column=field_name,
            row=int(joinids.max()),
        )
    keys = _text(obs[OBS_ID_COLUMN]) if OBS_ID_COLUMN in obs else joinids.astype(str)
    unique, key_counts = np.unique(keys, return_counts=True)
    if len(unique) < len(keys):
        name = unique[np.flatnonzero(key_counts > 1)[0]]
        raise DataError(
            f"{len(keys) - len(unique)} duplicate cell id(s), e.g. {name!r}",
            file=source,
            column=f"obs/{OBS_ID_COLUMN}",
            row=str(name),
        )
    return obs, joinids, keys


def _read(
    exp: Any,
    source: str | Path,
    *,
    measurement: str,
    x_layer: str,
    obs_filter: str | None,
    gene_column: str | None,
    label_column: str | None,
    group_column: str | None,
    total_column: str | None,
    normalized: bool,
) -> Samples:
    soma = _tiledbsoma()
    array, field_name = _x_array(exp, source, measurement, x_layer, soma)
    genes, var_joinids, gene_column = _genes(
        exp.ms[measurement], source, measurement, gene_column, array, field_name
    )
    wanted = {"label": label_column, "group": group_column, "total": total_column}
    obs, joinids, keys = _cells(exp, source, obs_filter, wanted, array, field_name, soma)

    def obs_values(column: str, what: str) -> pd.Series:
        col = obs[column]
        missing = np.flatnonzero(col.isna().to_numpy())
        if missing.size:
            raise DataError(
                f"{what} column has {missing.size} missing value(s), e.g. cell "
                f"{keys[missing[0]]!r}",
                file=source,
                column=f"obs/{column}",
                row=str(keys[missing[0]]),
            )
        return col

    rows = SomaRows(array, joinids, var_joinids)
    matrix = CountMatrix(
        genes=genes,
        totals=np.zeros(len(keys)),
        field=field_name,
        normalized=normalized,
        backed=rows,
    )
    validate_matrix(
        matrix,
        keys,
        source,
        total_column,
        obs_values(total_column, "total") if total_column is not None else None,
    )
    matrix.extra["experiment"] = exp  # held open while the samples live
    labels = None
    categorical = False
    if label_column is not None:
        col = obs_values(label_column, "label")
        categorical = not pd.api.types.is_numeric_dtype(col.dtype)
        labels = col.astype(str).to_numpy()
    groups = keys
    if group_column is not None:
        groups = obs_values(group_column, "group").astype(str).to_numpy()
    log.info(
        "%s: %s cells%s × %s genes (var/%s) from %s",
        source,
        f"{len(keys):,}",
        f" (obs_filter {obs_filter!r})" if obs_filter else "",
        f"{len(genes):,}",
        gene_column,
        field_name,
    )
    return Samples(
        source=Path(str(source)),
        keys=np.asarray(keys),
        groups=np.asarray(groups),
        labels=labels,
        payload=matrix,
        data_hash=_signature(
            source,
            [measurement, x_layer, obs_filter or "", gene_column, str(total_column)],
        ),
        label_column=label_column,
        info={
            "layer": None,
            "gene_column": gene_column,
            "total_column": total_column,
            "group_column": group_column,
            "normalized": normalized,
            "n_genes": len(genes),
            "categorical_labels": categorical,
            "soma": {
                "measurement": measurement,
                "x_layer": x_layer,
                "obs_filter": obs_filter,
            },
        },
    )
