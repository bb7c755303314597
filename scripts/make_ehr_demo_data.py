"""Write the bundled EHR demo data: a synthetic MEDS 0.4 population.

Usage::

    .venv/bin/python scripts/make_ehr_demo_data.py [--out src/healthfm/data/ehr/synthetic_meds]
        [--subjects 1500] [--seed 0]

The population comes from :mod:`healthfm.ehr.synthetic` (our own clinically structured
generator; see src/healthfm/data/ehr/README.md for why). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from healthfm.ehr.synthetic import write_meds

DEFAULT_OUT = (
    Path(__file__).resolve().parent.parent / "src" / "healthfm" / "data" / "ehr" / "synthetic_meds"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--subjects", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args()
    out = write_meds(args.out, args.subjects, args.seed, args.shards)
    n_events = sum(
        pl.scan_parquet(f).select(pl.len()).collect().item() for f in out.glob("data/*.parquet")
    )
    print(f"wrote {out}: {args.subjects} subjects, {n_events} events")
    for task in sorted(p.name for p in (out / "task_labels").iterdir()):
        labels = pl.read_parquet(out / "task_labels" / task / "labels.parquet")
        print(
            f"  {task}: {len(labels)} label rows, {labels['boolean_value'].mean():.1%} positive, "
            f"{labels['subject_id'].n_unique()} subjects"
        )


if __name__ == "__main__":
    main()
