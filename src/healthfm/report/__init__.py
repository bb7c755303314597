"""Reports a person can read: one self-contained HTML page per run (``healthfm report``).

:func:`write_run_report` is what ``evaluate`` (and slide-level MIL) call at the end of a
run: it keeps the pictures' inputs beside ``results.json`` and writes ``report.html``;
:func:`render_report` builds the page of any run folders (:mod:`healthfm.report.build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from healthfm.report.build import render_report

__all__ = ["render_report", "write_run_report"]


def write_run_report(
    out_dir: str | Path,
    features: dict[str, Any],
    rows: Any,
    result: Any,
    comparison: Any,
    model_dir: Any,
    seeds: list[int],
    n_boot: int,
) -> Path:
    """Save an evaluation's report inputs and write ``out_dir/report.html``."""
    from healthfm.report.inputs import run_inputs

    out_dir = Path(out_dir)
    run_inputs(out_dir, features, rows, result, comparison, model_dir, seeds, n_boot)
    return render_report([out_dir], out_dir / "report.html")
