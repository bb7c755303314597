"""Peak memory of training vs token-store size: the store is memory-mapped, not loaded.

For each size (1× and 10× by default) a token store with ids and values is written, then a
*fresh process* trains the tiny preset on it for a fixed number of steps (random batches
from the whole store) and reports its peak resident set size (``VmHWM``; ``getrusage`` elsewhere).
Training reads only the pages of the sampled samples, so peak RSS should not follow the
store size; what does grow with it is the epoch permutation (8 bytes per sample). Pages
of the store that were read are unmapped after each batch (``release_pages``): without
that, Linux maps whole page-cache folios and RSS climbs towards the store size.

Run: ``python benchmarks/train_memory.py`` (``--samples`` sets the 1× size).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_synthetic(path: Path, n: int, seed: int = 0, chunk: int = 50_000) -> tuple[int, int]:
    """Write ``n`` samples (lengths 16..192) with ids and values, in chunks; return (n, bytes)."""
    from healthfm.tokens import TokenChunk, TokenStoreWriter

    rng = np.random.default_rng(seed)
    with TokenStoreWriter(path, "mem", ("values",)) as writer:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            lengths = rng.integers(16, 193, m)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            ids = rng.integers(5, 64, int(offsets[-1])).astype(np.int32)
            ids[offsets[:-1]] = 2
            values = rng.normal(size=len(ids)).astype(np.float32)
            writer.write(
                TokenChunk(
                    ids=ids, offsets=offsets, keys=[str(start + i) for i in range(m)], values=values
                )
            )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return n, size


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    ``VmHWM`` (Linux) is the high-water mark of this process's own address space;
    ``getrusage``'s ``ru_maxrss`` is the fallback, but on Linux it also carries the
    parent's footprint at fork time across ``exec``, which would blur the comparison.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(store_path: str, steps: int, release: bool = True) -> None:
    """Train on the store in this process; print peak RSS as JSON.

    ``release=False`` disables the per-batch unmapping, to show what it saves.
    """
    if not release:
        import healthfm.train.data as data

        data.release_pages = lambda store: None
    import torch

    from healthfm.model import FoundationModel, ModelConfig
    from healthfm.tokens import TokenStore
    from healthfm.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    store = TokenStore(store_path)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", modality="mem", vocab_size=64, max_len=128, use_values=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            FoundationModel(config),
            store,
            TrainConfig(
                steps=steps,
                batch_size=32,
                warmup_steps=1,
                eval_every=0,
                checkpoint_every=0,
                progress=False,
            ),
            tmp,
        )
        before = peak_rss_mb()
        t = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall = time.perf_counter() - t
    peak = peak_rss_mb()
    split = {}
    if Path("/proc/self/status").exists():  # resident now: anonymous vs file-backed (mapped store)
        status = dict(x.split(":", 1) for x in Path("/proc/self/status").read_text().splitlines())
        split = {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile") if k in status}
    result = {
        "peak_rss_mb": peak,
        "rss_before_training_mb": before,
        "step_s": wall / steps,
    }
    result.update(
        anon_mb=split.get("RssAnon", float("nan")), file_mb=split.get("RssFile", float("nan"))
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40_000, help="samples of the 1x store")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--compare-release",
        action="store_true",
        help="also run without unmapping pages after each batch",
    )
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2] == "1")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in args.factors:
            path = Path(tmp) / f"store{factor}"
            n, size = write_synthetic(path, args.samples * factor)
            for release in (True, False) if args.compare_release else (True,):
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(path),
                        str(args.steps),
                        str(int(release)),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=1200,
                )
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-2000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                label = f"{factor}x" + ("" if release else " no-release")
                rows.append({"store": label, "samples": n, "store MB": size / 2**20, **r})
                print(f"  {label} done", flush=True)
            import shutil

            shutil.rmtree(path)
    base = rows[0]["peak_rss_mb"]
    print(
        f"\nPeak RSS while training (tiny preset, batch 32, {args.steps} steps, fresh process per size)"
    )
    head = [
        "store",
        "samples",
        "store MB",
        "RSS before MB",
        "peak RSS MB",
        "vs 1x MB",
        "end anon MB",
        "end file MB",
        "step s",
    ]
    table = []
    for r in rows:
        cells = [
            r["store"],
            r["samples"],
            f"{r['store MB']:.0f}",
            f"{r['rss_before_training_mb']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_rss_mb'] - base:+.0f}",
            f"{r['anon_mb']:.0f}",
            f"{r['file_mb']:.0f}",
            f"{r['step_s']:.3f}",
        ]
        table.append([str(c) for c in cells])
    widths = [max(len(h), *(len(c[k]) for c in table)) for k, h in enumerate(head)]
    for line in [head, *table]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
