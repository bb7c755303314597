"""Issue 21's DNA promise, end to end: two genome files (one multi-contig, one gzipped and
soft-masked with N runs) pretrain one model at the default batch size, and that model is
evaluated on a task table it never saw."""

from __future__ import annotations

import gzip
import json

import numpy as np

from healthfm.cli import main
from healthfm.datasets import promoters


def _contig(rng, n: int) -> str:
    return "".join(rng.choice(list("ACGT"), n))


def test_two_genomes_pretrain_at_the_default_batch_and_transfer_to_promoters(tmp_path):
    rng = np.random.default_rng(0)
    multi = tmp_path / "multi.fa"
    multi.write_text(
        "".join(f">contig{i} plasmid\n{_contig(rng, 6000 + 1500 * i)}\n" for i in range(4))
    )
    soft = _contig(rng, 9000)
    soft = soft[:3000].lower() + "N" * 400 + soft[3000:6000] + "n" * 120 + soft[6000:]
    with gzip.open(tmp_path / "soft.fa.gz", "wt") as handle:
        handle.write(f">chrA\n{soft[:5000]}\n{soft[5000:]}\n>chrB\n{_contig(rng, 5000)}\n")
    out = tmp_path / "model"
    argv = ["pretrain", "dna", str(multi), str(tmp_path / "soft.fa.gz"), "--out", str(out)]
    argv += ["--window", "64", "--steps", "2", "--eval-every", "2"]  # default batch size 64
    assert main(argv) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["train_config"]["batch_size"] == 64
    rows = {r["name"]: r for r in info["corpus"]["sources"]}
    assert set(rows) == {"multi", "soft"}
    assert sum(r["samples_seen"] for r in rows.values()) == 2 * 64
    assert all(r["tokens_seen"] <= r["samples_seen"] * 65 for r in rows.values())
    results = tmp_path / "ev"
    argv = ["evaluate", str(out), str(promoters()), "--out", str(results)]
    assert main([*argv, "--seeds", "0", "--n-boot", "20", "--no-controls"]) == 0
    saved = json.loads((results / "results.json").read_text())
    model_rows = [r for r in saved if not r["is_baseline"] and r.get("row_type") != "delta"]
    assert model_rows and all("corpus multi, soft" in r["pretrained_on"] for r in model_rows)
    assert any(r["is_baseline"] for r in saved)
