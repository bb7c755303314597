"""Corpus pretraining at scale: encoding throughput and memory, and the loader vs the trainer.

    python benchmarks/bench_corpus.py [genome] [atlas] [loader] [--scale 1.0] [--tmp DIR]

* ``genome``: a generated 1 Gb genome (10% and 100%) encoded by ``healthfm tokenize dna``:
  Mb/s and peak RSS, and their ratio (``benchmarks/corpus_genome.py``);
* ``atlas``: a generated 1M-cell, 100-file atlas (10% and 100%): cells/s and peak RSS, and
  their ratio (``benchmarks/corpus_atlas.py``);
* ``loader``: the corpus data pipeline (weighted plan → mixed batch → masking) in samples/s
  against what the trainer consumes (``Trainer.train_step`` samples/s) at ``tiny`` and
  ``small``, on the same mixed batches: the loader must never be the bottleneck.

Every ratio is measured in one run on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _stores(tmp: Path, n_sources: int = 4, per_source: int = 4000, seq: int = 256):
    from healthfm.tokens import TokenChunk, write_store

    rng = np.random.default_rng(0)
    stores = []
    for s in range(n_sources):
        lengths = rng.integers(seq // 2, seq + 1, per_source)
        ids = rng.integers(5, 4100, int(lengths.sum())).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        chunk = TokenChunk(ids=ids, offsets=offsets, keys=list(range(per_source)))
        stores.append(write_store(tmp / f"s{s}", [chunk], "bench"))
    return stores


def loader(tmp: Path, presets: list[str], steps: int, seq: int) -> list[str]:
    """Samples/s of the corpus pipeline vs the trainer's consumption, per preset."""
    from healthfm.corpus import sampling_probabilities
    from healthfm.model import FoundationModel, ModelConfig
    from healthfm.train.data import StoreSource
    from healthfm.train.mixture import MixtureBatches, MixtureSource
    from healthfm.train.objectives import masked_tokens
    from healthfm.train.trainer import TrainConfig, Trainer

    stores = _stores(tmp, seq=seq)
    sources = [StoreSource(s, seq) for s in stores]
    mix = MixtureSource(sources, [f"s{i}" for i in range(len(sources))])
    probs = sampling_probabilities(mix.sizes, [1.0, 2.0, 1.0, 0.5], temperature=2.0)
    lines = []
    for preset in presets:
        batch_size = {"tiny": 32, "small": 16, "base": 8}.get(preset, 8)
        plan = MixtureBatches(mix.sizes, probs, batch_size, seed=0)
        # The loader alone: plan, gather, pad, mask (what a step waits for without workers).
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        n_loader = max(steps * 20, 200)
        for p in range(n_loader):
            masked_tokens(mix.batch(plan.batch(p)), gen, 4102)
        loader_rate = n_loader * batch_size / (time.perf_counter() - t)
        # The trainer on the same plan: full steps (forward, backward, AdamW).
        config = ModelConfig.from_preset(preset, modality="dna", vocab_size=4102, max_len=seq)
        torch.manual_seed(0)
        model = FoundationModel(config)
        trainer = Trainer(
            model,
            mix,
            TrainConfig(steps=steps + 2, batch_size=batch_size, warmup_steps=1, report=False),
            None,
            batches=plan,
        )
        trainer.train_step()  # warm-up
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t)
        train_rate = batch_size / statistics.median(times)
        lines.append(
            f"loader {preset}: corpus pipeline {loader_rate:,.0f} samples/s vs trainer "
            f"{train_rate:,.1f} samples/s ({seq} tokens, batch {batch_size}): loader "
            f"{loader_rate / train_rate:,.0f}x faster than consumption"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["genome", "atlas", "loader"])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of 1 Gb / 1M cells")
    parser.add_argument("--tmp", default=None, help="where generated data go (large)")
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        if "genome" in args.parts:
            import corpus_genome

            corpus_genome.run(tmp / "genome", args.scale)
        if "atlas" in args.parts:
            import corpus_atlas

            corpus_atlas.run(tmp / "atlas", args.scale)
        if "loader" in args.parts:
            loader(tmp / "loader", args.presets, args.steps, args.seq)


if __name__ == "__main__":
    main()
