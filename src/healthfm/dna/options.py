"""The DNA modality's options (reader and k-mer tokenizer); CLI flags come from here."""

from __future__ import annotations

from dataclasses import dataclass

from healthfm.options import Options, option


@dataclass
class DnaOptions(Options):
    """Reader and tokenizer options of DNA tables and FASTA files."""

    title = "DNA"

    sequence_column: str = option("sequence", "table column of the sequences")
    label_column: str | None = option(
        None,
        "column of the labels (in the table, or in --labels for FASTA); default 'label' when "
        "there is one (pretraining also reads unlabelled tables); 'none' for unlabelled data",
    )
    task_type: str = option(
        "auto",
        "auto / survival: --time-column and --event-column make a time-to-event task; "
        "classification / regression refuse them",
        choices=("auto", "classification", "regression", "survival"),
    )
    time_column: str | None = option(
        None, "table column of follow-up times (days to the event or censoring) for a survival task"
    )
    event_column: str | None = option(
        None, "table column of event indicators (true/1: observed, false/0: censored)"
    )
    key_column: str | None = option(None, "table column of unique sample ids")
    labels: str | None = option(None, "TSV/CSV of FASTA record ids and labels (FASTA input)")
    id_column: str = option("id", "id column of the --labels file")
    k: int = option(1, "k-mer size (1 = single nucleotides; 6 = DNABERT)", minimum=1)
    stride: int = option(1, "k-mer step: 1 overlapping, k non-overlapping", minimum=1)
    ambiguity: str = option(
        "token", "k=1: a token per IUPAC code, or all as N", choices=("token", "n")
    )
    reverse_complement: bool = option(True, "reverse-complement augmentation during pretraining")
    window: int = option(
        1024,
        "genome input (.2bit, or FASTA whose first record is longer than 4,096 bases): "
        "bases per training window (windows never cross a record or an N gap)",
        minimum=1,
    )
    window_stride: int | None = option(
        None, "genome embedding: step between windows in bases (default: --window)", minimum=1
    )
    regions: str | None = option(
        None,
        "genome embedding: BED file (chrom, start, end[, name]; 0-based, half-open) of the "
        "regions to embed, each cut to --window bases",
    )
