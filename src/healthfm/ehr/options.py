"""The EHR modality's options (MEDS reader, tokenizer, label rows, EHRSHOT); CLI flags come
from here."""

from __future__ import annotations

from dataclasses import dataclass

from healthfm.options import Options, option


@dataclass
class EhrOptions(Options):
    """MEDS reader, tokenizer and evaluation options."""

    title = "ehr input options"

    labels: str | None = option(None, "MEDS label parquet file (or folder) for embed / evaluate")
    label_column: str | None = option(
        None,
        "label column (default: the one of boolean_value/integer_value/... holding values)",
    )
    task_type: str = option(
        "auto",
        "auto: a label file with boolean_value and float_value is a time-to-event task "
        "(event observed, days to the event or censoring); survival: require it; "
        "classification / regression: use boolean_value / float_value of such a file",
        choices=("auto", "classification", "regression", "survival"),
    )
    few_shot: list | None = option(
        None,
        "few-shot k values, integers and/or 'all' (default: 1 2 4 8 16 32 64 128 all)",
        nargs="+",
    )
    min_count: int = option(5, "minimum train count of a code to get a token", minimum=1)
    max_codes: int | None = option(None, "keep only the N most frequent codes", minimum=1)
    n_bins: int = option(10, "quantile bins per numeric code (10 = deciles)", minimum=1)
    min_text_count: int = option(20, "minimum train count of a text value token", minimum=1)
    no_gap_tokens: bool = option(False, "no [GAP] interval tokens")
    max_len: int | None = option(None, "context length (default: from the data)", minimum=2)
    strict_codes: bool = option(
        False, "error if the data use codes missing from metadata/codes.parquet"
    )
