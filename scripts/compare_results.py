"""Compare two healthfm ``results.json`` files row by row (for refactors: same numbers?).

    python scripts/compare_results.py BEFORE/results.json AFTER/results.json [--ignore model_hash]

Rows are matched by (task, method, metric, seed, k); for each pair the value, the CI bounds,
n_test and the model hash are compared exactly. Prints every difference and a summary line;
exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys

FIELDS = ("value", "ci_low", "ci_high", "n_test", "model_hash")


def _key(row: dict) -> tuple:
    return (row["task"], row["method"], row["metric"], row.get("seed"), str(row.get("k")))


def compare(before: str, after: str, ignore: set[str]) -> int:
    """Print the differences between two result files; return their number."""
    a = {_key(r): r for r in json.load(open(before))}
    b = {_key(r): r for r in json.load(open(after))}
    n = 0
    for key in sorted(set(a) | set(b), key=str):
        if key not in a or key not in b:
            print(f"only in {'before' if key in a else 'after'}: {key}")
            n += 1
            continue
        for field in FIELDS:
            if field not in ignore and a[key].get(field) != b[key].get(field):
                print(f"{key} {field}: {a[key].get(field)} -> {b[key].get(field)}")
                n += 1
    print(f"{len(a)} rows before, {len(b)} after, {n} differences")
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--ignore", nargs="*", default=[], choices=FIELDS)
    args = parser.parse_args()
    return 1 if compare(args.before, args.after, set(args.ignore)) else 0


if __name__ == "__main__":
    sys.exit(main())
