"""Genome corpus: encoding speed and memory of ``healthfm tokenize dna``, window speed.

1. Writes a synthetic genome FASTA of ``scale`` × 1 Gb (random bases, soft-masked lower-case
   stretches, N runs short and long, ~50 chromosome-size records plus 100 small contigs, 60
   bases a line) and one of a tenth of that.
2. Runs ``healthfm tokenize dna GENOME --out STORE`` on each in a fresh process and reads
   its peak resident memory from ``os.wait4`` (``ru_maxrss``): the genome store is written
   block by block, so the ratio of the two peaks should stay near 1 (not 10). Throughput is
   bases / wall time of the whole command (read and validate, SHA-256, encode).
3. Times :class:`~healthfm.dna.genome_store.GenomeWindows` batches (64 windows × 1,024
   bases, random offsets, k=1 tokens) against the trainer's consumption: a few
   ``Trainer.train_step`` of the ``tiny`` preset (and ``small`` with ``--small``) on the
   same batches, on this machine's device.

Run: ``python benchmarks/corpus_genome.py [--scale 0.3] [--out DIR] [--small]``
(``--scale 1`` is the 1 Gb run; it needs ~2.5 GB of disk).
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

GIGABASE = 1_000_000_000
LINE = 60
_ACGT = np.frombuffer(b"ACGT", dtype=np.uint8)


def write_genome(path: Path, n_bases: int, seed: int = 0, chunk_lines: int = 65_536) -> dict:
    """Write a synthetic genome FASTA of about ``n_bases`` bases in chunks (flat memory).

    Returns counts: records, bases, lower-case bases, N bases.
    """
    rng = np.random.default_rng(seed)
    contigs = rng.integers(1_000, 50_000, 100)  # unplaced-scaffold-like small records
    big = max(n_bases - int(contigs.sum()), LINE)
    lengths = []
    while big > 0:
        n = int(min(big, np.clip(rng.lognormal(np.log(20e6), 0.8), 10_000, 250e6)))
        lengths.append(n)
        big -= n
    lengths += contigs.tolist()
    stats = {"records": len(lengths), "bases": 0, "lower": 0, "n": 0}
    chunk = chunk_lines * LINE
    with open(path, "wb") as handle:
        for r, length in enumerate(lengths):
            handle.write(f">rec{r} synthetic length={length}\n".encode())
            for lo in range(0, length, chunk):
                n = min(chunk, length - lo)
                seq = _ACGT[rng.integers(0, 4, n)]
                for _ in range(max(1, n // 200_000)):  # soft-masked repeats
                    a = int(rng.integers(0, n))
                    seq[a : a + int(rng.integers(100, 20_000))] |= 32
                for size in (10, 100, 5_000):  # N runs: short (kept) and gaps (skipped)
                    if rng.random() < min(1.0, n / 2e6):
                        a = int(rng.integers(0, n))
                        seq[a : a + size] = ord("N")
                stats["lower"] += int((seq >= 97).sum())
                stats["n"] += int((seq == ord("N")).sum())
                full = n // LINE * LINE
                lines = seq[:full].reshape(-1, LINE)
                newline = np.full((len(lines), 1), 10, dtype=np.uint8)
                handle.write(np.concatenate([lines, newline], axis=1).tobytes())
                if full < n:
                    handle.write(seq[full:].tobytes() + b"\n")
            stats["bases"] += length
    return stats


def tokenize_peak(fasta: Path, store: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``healthfm tokenize dna`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "healthfm", "tokenize", "dna", str(fasta), "--out", str(store)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"tokenize failed ({proc.returncode}): {err or out}")
    return wall, usage.ru_maxrss / 1024  # kilobytes on Linux


def window_speed(store_path: Path, batches: int = 30, batch: int = 64, window: int = 1024):
    """Windows/s of GenomeWindows (training: random offsets), and the source itself."""
    import torch

    from healthfm.dna.genome_store import GenomeStore, GenomeWindows
    from healthfm.dna.tokenizer import KmerTokenizer

    tok = KmerTokenizer(max_length=window + 1)
    source = GenomeWindows(GenomeStore(store_path), tok, window, training=True)
    rng = np.random.default_rng(0)
    plan = [rng.choice(len(source), batch, replace=False) for _ in range(batches)]
    source.batch(plan[0], torch.Generator().manual_seed(0))  # warm the page cache path
    t = time.perf_counter()
    for i, idx in enumerate(plan):
        source.batch(idx, torch.Generator().manual_seed(i))
    return batches * batch / (time.perf_counter() - t), source


def trainer_speed(source, preset: str, steps: int = 3, batch: int = 64) -> tuple[float, str]:
    """Windows/s the trainer consumes (train_step, masked objective, augmentation off)."""
    import torch

    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel
    from healthfm.train.trainer import TrainConfig, Trainer

    tok = source.tokenizer
    config = ModelConfig.from_preset(
        preset, modality="dna", vocab_size=tok.vocab_size, max_len=tok.max_length
    )
    torch.manual_seed(0)
    model = FoundationModel(config)
    train = TrainConfig(steps=steps + 1, batch_size=batch, warmup_steps=1, report=False)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, source, train, run_dir)
        trainer.train_step()  # first step: allocations, autotuning
        t = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        seconds = (time.perf_counter() - t) / steps
    return batch / seconds, str(trainer.info.device)


def run(out_dir: str | Path, scale: float = 0.3, small: bool = False) -> dict:
    """The whole benchmark at ``scale`` × 1 Gb (and a tenth of it); prints and returns
    the numbers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"scale": scale}
    peaks = {}
    for name, fraction in (("10%", scale / 10), ("100%", scale)):
        fasta = out_dir / f"genome-{name.rstrip('%')}.fa"
        t = time.perf_counter()
        stats = write_genome(fasta, int(fraction * GIGABASE))
        made = time.perf_counter() - t
        store = out_dir / f"store-{name.rstrip('%')}"
        wall, peak = tokenize_peak(fasta, store)
        mb = stats["bases"] / 1e6
        peaks[name] = peak
        print(
            f"{name} ({mb:,.0f} Mb, {stats['records']} records, "
            f"{stats['lower'] / stats['bases']:.1%} lower case, {stats['n']:,} N; written in "
            f"{made:.0f} s): healthfm tokenize dna {wall:.1f} s = {mb / wall:.1f} Mb/s, "
            f"peak RSS {peak:,.0f} MB",
            flush=True,
        )
        results[name] = {**stats, "tokenize_s": wall, "mb_per_s": mb / wall, "peak_rss_mb": peak}
        fasta.unlink()
    results["rss_ratio"] = peaks["100%"] / peaks["10%"]
    print(f"peak RSS ratio 100% / 10% (10x the bases): {results['rss_ratio']:.2f}x", flush=True)

    rate, source = window_speed(out_dir / "store-100")
    results["windows_per_s"] = rate
    print(f"GenomeWindows: {rate:,.0f} windows/s (batches of 64 x 1,024 bases, k=1)", flush=True)
    for preset in ("tiny", "small") if small else ("tiny",):
        consumed, device = trainer_speed(source, preset)
        results[f"trainer_{preset}_windows_per_s"] = consumed
        print(
            f"trainer {preset} on {device}: {consumed:,.1f} windows/s consumed "
            f"(source / trainer = {rate / consumed:,.1f}x)",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.3, help="fraction of 1 Gb (default 0.3)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="also time the small preset")
    args = parser.parse_args()
    if args.out:
        run(args.out, args.scale, args.small)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(tmp, args.scale, args.small)


if __name__ == "__main__":
    main()
