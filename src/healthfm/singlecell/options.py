"""The single-cell modality's options (AnnData reader, cell tokenizer); CLI flags come from
here."""

from __future__ import annotations

from dataclasses import dataclass

from healthfm.options import Options, option
from healthfm.singlecell.tokenizer import DEFAULT_MAX_LENGTH


@dataclass
class SingleCellOptions(Options):
    """Reader and tokenizer options of ``.h5ad`` files and TileDB-SOMA experiments."""

    title = "singlecell input options"

    layer: str | None = option(None, "layer holding the counts (default: X)")
    gene_column: str | None = option(
        None,
        "var column of gene ids (default: var_names; a SOMA experiment: feature_id; several "
        "sources: the var column or var_names holding Ensembl ids where there is one)",
    )
    label_column: str | None = option(None, "obs column of cell labels (e.g. cell_type)")
    task_type: str = option(
        "auto",
        "auto / survival: --time-column and --event-column make a time-to-event task; "
        "classification / regression refuse them",
        choices=("auto", "classification", "regression", "survival"),
    )
    time_column: str | None = option(
        None, "obs column of follow-up times (days to the event or censoring) for a survival task"
    )
    event_column: str | None = option(
        None, "obs column of event indicators (true/1: observed, false/0: censored)"
    )
    group_column: str | None = option(
        None, "obs column of the split unit (donor, sample); default: each cell"
    )
    total_column: str | None = option(
        None, "obs column of library sizes, e.g. n_counts (default: the row sums)"
    )
    normalized: bool = option(False, "allow non-integer (normalized) values")
    backed: bool = option(False, "read the matrix from disk in blocks")
    tokenizer: str | None = option(
        None,
        "rank (Geneformer rank-value, default) or binned (scGPT value bins)",
        choices=("binned", "rank"),
    )
    max_length: int | None = option(
        None,
        "tokens per cell incl. [CLS] (default: the longest training cell, at most "
        f"{DEFAULT_MAX_LENGTH})",
        minimum=2,
    )
    n_bins: int | None = option(None, "value bins incl. zero (binned; default 51)", minimum=2)
    min_cells: int | None = option(
        None, "keep genes expressed in at least this many training cells (default 1)", minimum=0
    )
    min_sources: int | None = option(
        None,
        "several sources: keep genes measured in at least this many of them (default 1: "
        "the union of their panels)",
        minimum=1,
    )
    gene_set: str | None = option(
        None,
        "several sources: union (default) or intersection of their gene panels",
        choices=("intersection", "union"),
    )
    measurement: str | None = option(
        None, "TileDB-SOMA experiment: the measurement to read (default RNA)"
    )
    x_layer: str | None = option(
        None, "TileDB-SOMA experiment: the X layer of raw counts (default raw, as in Census)"
    )
    obs_filter: str | None = option(
        None,
        "TileDB-SOMA experiment: the cells to read, a SOMA value_filter on obs "
        "(e.g. \"tissue_general == 'blood'\")",
    )
    source: str = option("<AnnData>", "name of an in-memory AnnData in messages", cli=False)
