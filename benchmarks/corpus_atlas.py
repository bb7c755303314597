"""Atlas-scale corpus: one gene vocabulary over 100 ``.h5ad`` files with different panels.

Run (from the repository root)::

    PYTHONPATH=src python benchmarks/corpus_atlas.py --out /tmp/atlas            # 1M cells
    PYTHONPATH=src python benchmarks/corpus_atlas.py --out /tmp/atlas --scale 0.1
    PYTHONPATH=src python benchmarks/corpus_atlas.py --out /tmp/atlas --no-tokenize

1. Generate (once; reused while the parameters match) an atlas of 100 backed sparse
   ``.h5ad`` files of ``10,000 × scale`` cells each over a universe of 2,000 genes. Each
   file measures its own random panel of 50-95% of the genes, in its own column order,
   named by Ensembl-like ids; counts are multinomial draws (about 250 per cell, gene
   weights log-normal), so a cell expresses about 150 genes.
2. In a fresh subprocess per size, as the corpus pretraining stage does: read every file
   backed (validated block by block), split each by cell, fit one rank-value vocabulary
   over all training cells (:meth:`SingleCellModality.fit_corpus_tokenizer`: streaming
   per-gene histograms), then tokenize every file's training cells into a token store
   (``--no-tokenize`` stops after the fit). Peak resident memory is the child's
   ``ru_maxrss`` (``os.wait4``), timed phases are reported by the child.
3. The same at 10% of the files (10) and at 100% (100): cells/s of each phase and the ratio
   of the peaks (target: the 100% peak within 1.25× of the 10% peak).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_FILES = 100
CELLS_PER_FILE = 10_000
N_GENES = 2_000
DRAWS_PER_CELL = 250


def make_atlas(root: Path, scale: float = 1.0, seed: int = 0) -> list[Path]:
    """Write (or reuse) the atlas under ``root``; return its files in order."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    cells = max(10, round(CELLS_PER_FILE * scale))
    params = {"files": N_FILES, "cells": cells, "genes": N_GENES, "draws": DRAWS_PER_CELL}
    params["seed"] = seed
    manifest = root / "manifest.json"
    paths = [root / f"part-{i:03d}.h5ad" for i in range(N_FILES)]
    if manifest.exists() and json.loads(manifest.read_text()) == params:
        return paths
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weight = rng.lognormal(0.0, 1.5, N_GENES)
    ids = np.array([f"ENSG{i:011d}" for i in range(N_GENES)], dtype=object)
    letters = np.array(list("ACGT"))
    t = time.perf_counter()
    for i, path in enumerate(paths):
        size = int(rng.integers(N_GENES // 2, int(0.95 * N_GENES) + 1))
        panel = rng.permutation(rng.choice(N_GENES, size, replace=False))
        p = weight[panel] / weight[panel].sum()
        draws = np.maximum(rng.poisson(DRAWS_PER_CELL, cells), 1)
        rows = np.repeat(np.arange(cells), draws)
        cols = rng.choice(size, size=int(draws.sum()), p=p)
        x = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(cells, size))
        x.sum_duplicates()
        barcodes = letters[rng.integers(0, 4, (cells, 16))].view("<U16").reshape(-1)
        barcodes = np.char.add(barcodes, f"-{i}")
        ad.AnnData(
            X=x, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=ids[panel])
        ).write_h5ad(path)
    manifest.write_text(json.dumps(params))
    print(f"atlas: {N_FILES} files x {cells:,} cells written in {time.perf_counter() - t:.0f}s")
    return paths


def _child(paths: list[str], workdir: str, tokenize: bool) -> dict:
    """Read, split, fit, tokenize (in this process); timings as a dict."""
    import resource

    from healthfm.modality import get_modality, split_indices

    sc = get_modality("singlecell")
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    parts = []
    for path in paths:
        samples = sc.read(path, {"backed": True})
        train = split_indices(sc.split(samples, "healthfm", (0.7, 0.1, 0.2)))["train"]
        parts.append((samples, train))
    t1 = time.perf_counter()
    tokenizer = sc.fit_corpus_tokenizer(parts, {"tokenizer": "rank", "max_length": 256})
    t2 = time.perf_counter()
    tokens = 0
    if tokenize:
        for i, (samples, train) in enumerate(parts):
            store = sc.tokenize(tokenizer, samples, Path(workdir) / f"store-{i}", train)
            tokens += int(store.offsets[-1])
            del store
            shutil.rmtree(Path(workdir) / f"store-{i}")
    t3 = time.perf_counter()
    return {
        "files": len(paths),
        "cells": int(sum(len(s) for s, _ in parts)),
        "train_cells": int(sum(len(i) for _, i in parts)),
        "vocabulary": len(tokenizer.genes),
        "tokens": tokens,
        "read_s": t1 - t0,
        "fit_s": t2 - t1,
        "tokenize_s": t3 - t2 if tokenize else None,
        "import_rss_mb": base_kb / 1024,
    }


def measure(paths: list[Path], tokenize: bool = True) -> dict:
    """Run :func:`_child` on ``paths`` in a fresh subprocess; add its peak RSS (MB)."""
    with tempfile.TemporaryDirectory(prefix="healthfm-atlas-") as tmp:
        listing = Path(tmp) / "paths.json"
        listing.write_text(json.dumps([str(p) for p in paths]))
        out = Path(tmp) / "result.json"
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--child", str(listing), str(out), tmp]
        if not tokenize:
            cmd.append("--no-tokenize")
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the measured run failed ({status})")
        result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


def run(out_dir: str | Path, scale: float = 1.0, tokenize: bool = True) -> dict:
    """Generate the atlas under ``out_dir`` and measure 10% and 100% of its files.

    Parameters
    ----------
    out_dir
        Where the atlas (and ``corpus_atlas.json``, the results) go.
    scale
        Cells per file as a fraction of 10,000 (1.0: 1M cells in all).
    tokenize
        Also tokenize every file's training cells (else: read and fit only).

    Returns
    -------
    dict
        ``{"10%": {...}, "100%": {...}, "peak_ratio": float}``.
    """
    out_dir = Path(out_dir)
    paths = make_atlas(out_dir / "atlas", scale)
    results: dict = {}
    for label, n in (("10%", N_FILES // 10), ("100%", N_FILES)):
        r = measure(paths[:n], tokenize)
        results[label] = r
        speed = (
            f"read {r['cells'] / r['read_s']:,.0f} cells/s, fit {r['train_cells'] / r['fit_s']:,.0f}"
            " train cells/s"
        )
        if r["tokenize_s"]:
            speed += f", tokenize {r['train_cells'] / r['tokenize_s']:,.0f} train cells/s"
        print(
            f"{label:>4}: {r['files']} files, {r['cells']:,} cells ({r['train_cells']:,} train), "
            f"vocabulary {r['vocabulary']:,} genes; {speed}; peak RSS {r['peak_rss_mb']:,.0f} MB "
            f"(after imports {r['import_rss_mb']:,.0f} MB)"
        )
    results["peak_ratio"] = results["100%"]["peak_rss_mb"] / results["10%"]["peak_rss_mb"]
    print(f"peak RSS 100% / 10%: {results['peak_ratio']:.2f}x (target <= 1.25x)")
    (out_dir / "corpus_atlas.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    """Command line (see the module docstring)."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        listing, out, workdir = sys.argv[2:5]
        result = _child(
            json.loads(Path(listing).read_text()), workdir, "--no-tokenize" not in sys.argv
        )
        Path(out).write_text(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "healthfm-atlas"))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--no-tokenize", action="store_true")
    args = parser.parse_args()
    run(args.out, args.scale, not args.no_tokenize)


if __name__ == "__main__":
    main()
