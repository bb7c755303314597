"""Benchmark the DNA k-mer tokenizer: speed and peak memory against simple alternatives.

Input: ``--n`` sequences (default 1,000,000) resampled with replacement from the bundled
real splice-junction data (60 nt, with its N/D/S/R ambiguity codes), seed 0.

Variants, each run in a fresh subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the whole process: interpreter, numpy,
input strings and the tokenizer's own arrays) is its own:

* ``healthfm k=1`` / ``healthfm k=6``: :class:`healthfm.dna.KmerTokenizer` (vectorized).
* ``python k=1`` / ``python k=6``: a straightforward per-sequence, per-k-mer dict lookup,
  timed on ``--reference-n`` sequences (default 100,000) and extrapolated linearly to ``n``.
* ``hf-tokenizers k=6``: a Hugging Face fast tokenizer (``tokenizers`` WordLevel over
  space-separated overlapping 6-mers, DNABERT style, built in memory from our vocabulary),
  if ``tokenizers`` (the library behind ``transformers``' fast tokenizers) is importable;
  timed on ``--reference-n`` sequences and extrapolated too. Splitting sequences into
  space-separated k-mers is Python work DNABERT users do first; it is timed separately
  ("prep") and included in the total. ``encode_batch_fast`` (``encode_batch`` on older
  versions) uses all cores (Rayon); ours and the Python reference use one.

"Δ RSS" is the peak minus the resident memory just before encoding (data loaded).

Usage: ``python benchmarks/bench_tokenizer.py [--n 1000000] [--reference-n 100000]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.resources import files

import numpy as np

VARIANTS = ("healthfm k=1", "healthfm k=6", "python k=1", "python k=6", "hf-tokenizers k=6")


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_mb()


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def load_sequences(n: int) -> np.ndarray:
    """``n`` sequences resampled (seed 0) from the bundled splice data."""
    from healthfm.dna import read_table

    samples = read_table(files("healthfm") / "data" / "dna" / "splice.tsv")
    rng = np.random.default_rng(0)
    return samples.payload[rng.integers(0, len(samples), n)]


def python_encode(sequences, k: int, vocab: dict[str, int], unknown: int):
    """The straightforward tokenizer: one dict lookup per k-mer, one list per sequence."""
    ids: list[int] = []
    offsets = [0]
    for seq in sequences:
        ids.append(2)  # [CLS]
        ids.extend([vocab.get(seq[i : i + k], unknown) for i in range(len(seq) - k + 1)])
        offsets.append(len(ids))
    return np.asarray(ids, dtype=np.int32), np.asarray(offsets, dtype=np.int64)


def build_hf_tokenizer(strings: list[str]):
    """DNABERT-style WordLevel tokenizer over whitespace-separated k-mers, with [CLS]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing

    vocab = {s: i for i, s in enumerate(strings)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    return tok


def run_variant(name: str, n: int, reference_n: int) -> dict:
    """Time one variant in this process and report its memory."""
    from healthfm.dna import KmerTokenizer

    k = int(name.rsplit("k=", 1)[1])
    tokenizer = KmerTokenizer(k=k)
    timed_n = n if name.startswith("healthfm") else min(n, reference_n)
    sequences = load_sequences(timed_n)
    rss_before = _rss_mb()
    result: dict = {"variant": name, "n_timed": timed_n}
    cpu0 = time.process_time()
    if name.startswith("healthfm"):
        t0 = time.perf_counter()
        chunk = tokenizer.encode(sequences)
        result["seconds"] = time.perf_counter() - t0
        result["tokens"] = len(chunk.ids)
    elif name.startswith("python"):
        strings = tokenizer.token_strings()
        vocab = {s: i for i, s in enumerate(strings) if i >= 5}
        seqs = sequences.tolist()
        t0 = time.perf_counter()
        ids, _ = python_encode(seqs, k, vocab, unknown=tokenizer.vocab_size - 1)
        result["seconds"] = time.perf_counter() - t0
        result["tokens"] = len(ids)
        ours = tokenizer.encode(seqs[:1000]).ids
        result["matches_healthfm"] = bool(
            np.array_equal(python_encode(seqs[:1000], k, vocab, tokenizer.vocab_size - 1)[0], ours)
        )
    else:
        hf = build_hf_tokenizer(tokenizer.token_strings())
        seqs = sequences.tolist()
        t0 = time.perf_counter()
        split = [" ".join([s[i : i + k] for i in range(len(s) - k + 1)]) for s in seqs]
        result["prep_seconds"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        encode_batch = getattr(hf, "encode_batch_fast", hf.encode_batch)
        encodings = encode_batch(split, add_special_tokens=True)
        result["encode_seconds"] = time.perf_counter() - t1
        result["seconds"] = result["prep_seconds"] + result["encode_seconds"]
        result["tokens"] = sum(len(e.ids) for e in encodings[:1000]) * timed_n // 1000
        # Same ids as ours wherever no k-mer is ambiguous (HF maps those to [UNK]).
        plain = [i for i, s in enumerate(seqs[:1000]) if set(s) <= set("ACGT")]
        ours = tokenizer.encode([seqs[i] for i in plain])
        theirs = np.concatenate([encodings[i].ids for i in plain])
        result["matches_healthfm"] = bool(np.array_equal(ours.ids, theirs))
    # CPU time (all threads) tells the work apart from waiting on a busy machine.
    result["cpu_seconds"] = time.process_time() - cpu0
    result["peak_rss_mb"] = _peak_mb()
    result["delta_rss_mb"] = max(result["peak_rss_mb"] - rss_before, 0.0)
    return result


def _hf_available() -> bool:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of sequences")
    parser.add_argument(
        "--reference-n",
        type=int,
        default=100_000,
        help="sequences for the pure-Python and Hugging Face variants (extrapolated to --n)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(args.worker, args.n, args.reference_n)))
        return

    variants = [v for v in VARIANTS if not v.startswith("hf") or _hf_available()]
    print(
        f"DNA tokenizer benchmark: {args.n:,} sequences resampled from splice.tsv (60 nt); "
        f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if len(variants) < len(VARIANTS):
        print("(Hugging Face `tokenizers` is not importable: skipping that variant)")
    rows = []
    for name in variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--n", str(args.n),
             "--reference-n", str(args.reference_n)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        # Extrapolate subsampled runs linearly to n (the work is per sequence).
        row["seconds_n"] = row["seconds"] * args.n / row["n_timed"]
        row["cpu_seconds_n"] = row["cpu_seconds"] * args.n / row["n_timed"]
        rows.append(row)

    ours = {r["variant"].split("k=")[1]: r for r in rows if r["variant"].startswith("healthfm")}
    header = (
        f"{'variant':<19}{'timed n':>10}{'wall s':>9}{'CPU s':>9}{'seq/s':>12}"
        f"{'peak RSS MB':>13}{'Δ RSS MB':>10}{'× wall':>8}{'× CPU':>8}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base = ours[r["variant"].split("k=")[1]]
        scale = args.n / r["n_timed"]
        note = []
        if r["n_timed"] < args.n:
            note.append(f"extrapolated from {r['n_timed']:,}; memory at that n")
        if "prep_seconds" in r:
            note.append(
                f"prep {r['prep_seconds'] * scale:.1f}s + encode {r['encode_seconds'] * scale:.1f}s"
            )
        if "matches_healthfm" in r:
            note.append("ids match" if r["matches_healthfm"] else "IDS DIFFER")
        print(
            f"{r['variant']:<19}{r['n_timed']:>10,}{r['seconds_n']:>9.2f}{r['cpu_seconds_n']:>9.2f}"
            f"{args.n / r['seconds_n']:>12,.0f}{r['peak_rss_mb']:>13.0f}{r['delta_rss_mb']:>10.0f}"
            f"{r['seconds_n'] / base['seconds_n']:>8.1f}{r['cpu_seconds_n'] / base['cpu_seconds_n']:>8.1f}"
            f"  {'; '.join(note)}"
        )
    print(
        "wall/CPU s: for all n sequences; × wall, × CPU: relative to healthfm at the same k. "
        "CPU s sums all threads."
    )


if __name__ == "__main__":
    main()
