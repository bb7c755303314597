"""The linear probe (``fit_linear_probe``) against the probe as it was, on the demos' features.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_probe.py            # 3 seeds, ~minutes
    PYTHONPATH=src .venv/bin/python benchmarks/bench_probe.py --seeds 0  # quicker

A. ``solver="lbfgs-reference"``: scikit-learn's lbfgs ``LogisticRegression`` along the
   ``C`` path with warm starts, then the refit, on BLAS as configured (the probe before
   issue 25).
B. ``solver="lbfgs"`` (the default now): the same fits on one BLAS thread for small
   problems (``healthfm.evaluate.probe``'s docstring says why).

Feature sets, on the rows and splits ``healthfm evaluate`` uses (the modality's
evaluation rows, its protocol's probe-train / probe-val cut per seed, the fixed test
split):

* splice (``src/healthfm/data/dna/splice.tsv``, 3 classes): a tiny DNA model's mean
  embedding, k-mer counts, one-hot, model ⊕ one-hot (each block standardised on the
  non-test rows, as the evaluation's control).
* PBMC (``src/healthfm/data/singlecell/pbmc68k_counts.h5ad``, 10 cell types): a tiny
  single-cell model's embedding, HVG+PCA, log-normalised counts, model ⊕ HVG+PCA.

The tiny models are pretrained here first (30 steps; ``--dna-model`` / ``--sc-model``
take existing folders). A and B alternate, and alternate which goes first, so a change
in the machine's load hits both; only the ratio of one run means anything. For every fit
the chosen ``C`` and the largest difference of a test probability are compared; the
last line reads ``probe speedup: N.Nx (same C in A/B fits, max |dproba| = E)``.

Measured (2026-12-07, 2 shared CPUs, load average 12 from other jobs; seeds 0 1 2):
``probe speedup: 20.3x (same C in A/B fits, max |dproba| = 6.5e-03)`` -- A 897 s, B 44 s
over 24 fits each; per feature set 7x (PBMC HVG+PCA, 50 features) to 52x (splice
model ⊕ one-hot). The gain is the threads' waiting, so it is smallest on an idle machine
(not measured there). B is A's own code on one BLAS thread, so A and B differ only in
rounding; 21 of 24 fits agree within 1e-4, and the largest |dproba| (splice model ⊕ one-hot,
seed 0) is a fit whose L-BFGS stopping point moves with rounding: in an earlier run the
same scikit-learn probe gave 1.3e-2 between 2 and 1 BLAS threads on it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLICE = ROOT / "src/healthfm/data/dna/splice.tsv"
PBMC = ROOT / "src/healthfm/data/singlecell/pbmc68k_counts.h5ad"
SC_OPTIONS = {"label_column": "bulk_labels", "total_column": "n_counts", "max_length": 128}


def pretrain_tiny(modality: str, data: Path, out: Path, extra: list[str]) -> Path:
    """A tiny model pretrained for 30 steps (the features only need to be a model's)."""
    cmd = [sys.executable, "-m", "healthfm", "pretrain", modality, str(data), "--out", str(out)]
    cmd += ["--preset", "tiny", "--steps", "30", "--batch-size", "32", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def feature_sets(model: Path, data: Path, options: dict, combine_with: str):
    """``(rows, splitter, {name: X})`` for one data set, as ``healthfm evaluate`` builds them."""
    from healthfm.evaluate.controls import combined_features
    from healthfm.evaluate.protocol import ProbeProtocol
    from healthfm.loader import load_encoder
    from healthfm.modality import Features, Modality, get_modality
    from healthfm.stages.common import split_of_models
    from healthfm.stages.evaluate import task_rule

    encoder = load_encoder(str(model), None)
    modality = get_modality(encoder.modality)
    opts = modality.options(options)
    salt, fractions = split_of_models([encoder], None, None)
    samples = modality.read(str(data), opts)
    rows = modality.evaluation_rows(samples, opts, salt, fractions, task_rule([]))
    emb = modality.embedding.embed_rows(encoder, samples, rows, None, 128)
    feats = {"model": Features(emb, False)}
    # The featurizers' baselines (not the DNA CNN, whose features are probed like any other).
    feats.update(Modality.baseline_features(modality, samples, rows))
    feats[f"model+{combine_with}"] = combined_features(feats["model"], feats[combine_with], rows)
    splitter = (modality.evaluation_protocol(opts) or ProbeProtocol()).splitter(rows)
    return rows, splitter, {name: np.asarray(f.X) for name, f in feats.items()}


def main() -> None:
    """Run the comparison and print one line per fit and the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dna-model", type=Path, default=None)
    parser.add_argument("--sc-model", type=Path, default=None)
    args = parser.parse_args()

    from healthfm.evaluate.probe import fit_linear_probe

    tmp = Path(tempfile.mkdtemp(prefix="bench_probe_"))
    dna = args.dna_model or pretrain_tiny("dna", SPLICE, tmp / "dna", [])
    sc = args.sc_model or pretrain_tiny(
        "singlecell", PBMC, tmp / "sc", ["--max-length", "128", "--total-column", "n_counts"]
    )
    sets = {
        "splice": feature_sets(dna, SPLICE, {"label_column": "label"}, "one-hot+logreg"),
        "pbmc": feature_sets(sc, PBMC, SC_OPTIONS, "hvg-pca+logreg"),
    }
    for data, (rows, _, feats) in sets.items():
        shapes = ", ".join(f"{k} {v.shape[1]}" for k, v in feats.items())
        print(f"{data}: {len(rows.y)} rows, {len(rows.classes)} classes; features: {shapes}")

    totals = {"lbfgs-reference": 0.0, "lbfgs": 0.0}
    per_set: dict[str, list[float]] = {}
    same_c, worst, n_fits, flip = True, 0.0, 0, False
    print(
        f"{'data':7s} {'features':26s} {'seed':>4s} {'A s':>8s} {'B s':>8s} {'A/B':>6s}  C (A/B)  max|dp|"
    )
    for data, (rows, splitter, feats) in sets.items():
        test = rows.indices("test")
        for seed in args.seeds:
            tr, va = splitter(seed)
            for name, X in feats.items():
                order = ("lbfgs-reference", "lbfgs") if not flip else ("lbfgs", "lbfgs-reference")
                flip = not flip
                out, secs = {}, {}
                for solver in order:
                    t = time.perf_counter()
                    out[solver] = fit_linear_probe(
                        X[tr], rows.y[tr], X[va], rows.y[va], X[test], seed=seed, solver=solver
                    )
                    secs[solver] = time.perf_counter() - t
                    totals[solver] += secs[solver]
                a, b = out["lbfgs-reference"], out["lbfgs"]
                dp = float(np.abs(a.proba - b.proba).max())
                same_c &= a.best_C == b.best_C
                worst = max(worst, dp)
                n_fits += 1
                ta, tb = secs["lbfgs-reference"], secs["lbfgs"]
                per_set.setdefault(f"{data} {name}", [0.0, 0.0])
                per_set[f"{data} {name}"][0] += ta
                per_set[f"{data} {name}"][1] += tb
                print(
                    f"{data:7s} {name:26s} {seed:4d} {ta:8.2f} {tb:8.2f} {ta / tb:6.1f}"
                    f"  {a.best_C:g}/{b.best_C:g}  {dp:.1e}"
                    + ("" if a.converged else "  (A hit max_iter)"),
                    flush=True,
                )
    print("\nper feature set, all seeds (A s, B s, A/B):")
    for key, (ta, tb) in per_set.items():
        print(f"  {key:34s} {ta:8.2f} {tb:8.2f} {ta / tb:6.1f}x")
    ratio = totals["lbfgs-reference"] / totals["lbfgs"]
    print(
        f"total: A {totals['lbfgs-reference']:.1f} s, B {totals['lbfgs']:.1f} s over {n_fits} "
        f"fits of each; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    same = "same C in A/B fits" if same_c else "C DIFFERS in some A/B fits"
    print(f"probe speedup: {ratio:.1f}x ({same}, max |dproba| = {worst:.1e})")


if __name__ == "__main__":
    main()
