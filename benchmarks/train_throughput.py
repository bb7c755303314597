"""Training throughput: tokens/s and model FLOP utilization (MFU), measured, never asserted.

Every figure comes from the real training step (:meth:`Trainer.train_step`: collation,
masking, forward, backward, clipping, AdamW) on synthetic token stores, and the MFU peak is
a dense matmul of the same dtype measured in the same run on the same threads, so the
numbers are ratios that hold on a busy machine.

Tables:

1. presets × {fp32, bf16 autocast}: tokens/s and MFU on full-length rows;
2. packed vs padded batches on length-skewed data (real tokens/s);
3. 1 vs 2 processes (torchrun, gloo) at the same global batch.

Run: ``python benchmarks/train_throughput.py`` (``--quick`` for a smoke run). On a GPU node
the same script measures the GPU (``--device cuda``; torchrun uses NCCL there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from healthfm.model import FoundationModel, ModelConfig
from healthfm.tokens import TokenChunk, write_store
from healthfm.train.trainer import TrainConfig, Trainer

VOCAB = 64


def synthetic_store(path: Path, n: int, lengths: np.ndarray, seed: int = 0):
    """A token store of ``n`` random samples with the given lengths (CLS first)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(5, VOCAB, int(offsets[-1])).astype(np.int32)
    ids[offsets[:-1]] = 2
    return write_store(
        path, [TokenChunk(ids=ids, offsets=offsets, keys=[str(i) for i in range(n)])], "bench"
    )


def skewed_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths: most samples short, a few near ``max_len`` (like EHR histories)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(max_len / 8), 0.9, n), 8, max_len).astype(np.int64)


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.5) -> float:
    """Best dense-matmul FLOP/s of ``n``×``n`` operands over a few timed repeats."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t))
    return best


def flops_per_step(config: ModelConfig, seq_lengths: np.ndarray, n_targets: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 × forward).

    Per real token: 6 × the block matmul parameters; attention: 12 · layers · d · L per
    token of a length-L sample (useful work only, so packed rows do not get credit for the
    masked-out blocks); the masked-token head runs at target tokens only.
    """
    d, ff, layers = config.d_model, config.d_ff, config.n_layers
    block_params = layers * (4 * d * d + 2 * d * ff)
    tokens = float(seq_lengths.sum())
    attention = 12.0 * layers * d * float((seq_lengths.astype(np.float64) ** 2).sum())
    head = 6.0 * (d * d + d * config.vocab_size) * n_targets
    return 6.0 * block_params * tokens + attention + head


def measure(
    store,
    preset: str,
    max_len: int,
    batch: int,
    bf16: bool,
    pack: bool,
    steps: int,
    device: str,
    run_dir: Path,
) -> dict:
    """Time ``steps`` optimizer steps (after one warm-up step) of the real trainer."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset, modality="bench", vocab_size=VOCAB, max_len=max_len)
    model = FoundationModel(config)
    train = TrainConfig(
        steps=steps + 1,
        batch_size=batch,
        bf16=bf16,
        pack=pack,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=0,
        progress=False,
    )
    trainer = Trainer(model, store, train, run_dir)
    trainer.train_step()  # warm-up: allocator, autocast caches
    dtype = torch.bfloat16 if bf16 else torch.float32
    # The peak is re-measured right before and after: on a shared machine the load drifts.
    peaks = [matmul_peak(dtype, device, n=1024, seconds=0.3)]
    flops = tokens = 0.0
    t = time.perf_counter()
    for _ in range(steps):
        position = trainer.position
        lengths = np.minimum(store.lengths[trainer.batches.part(position)], max_len)  # global batch
        out = trainer.train_step()
        tokens += out["tokens"]
        flops += flops_per_step(config, lengths, round(train.mask_prob * out["tokens"]))
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peaks.append(matmul_peak(dtype, device, n=1024, seconds=0.3))
    return {
        "tokens_per_s": tokens / wall,
        "flops_per_s": flops / wall,
        "step_s": wall / steps,
        "mfu": flops / wall / max(peaks),
    }


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=False)) for r in rows
    ]
    return "\n".join(lines)


def worker(settings: dict) -> None:
    """Under torchrun: train on the given store and print rank 0's tokens/s as JSON."""
    from healthfm.tokens import TokenStore

    torch.set_num_threads(settings["threads"])
    store = TokenStore(settings["store"])
    out = measure(
        store,
        settings["preset"],
        settings["max_len"],
        settings["batch"],
        False,
        False,
        settings["steps"],
        "cpu",
        Path(settings["run_dir"]),
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(out), flush=True)
    from healthfm.train.distributed import shutdown

    shutdown()


def run_processes(nproc: int, threads: int, settings: dict) -> dict:
    """Launch this script's worker under torchrun; return rank 0's result."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        "--worker",
        json.dumps({**settings, "threads": threads}),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--seq", type=int, default=256, help="tokens per sample (presets table)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: on a shared CPU more threads stall on each other)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny + small, fewer steps")
    parser.add_argument(
        "--skip-processes", action="store_true", help="skip the 1 vs 2 processes table"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.presets, args.steps = ["tiny", "small"], 2
    device = args.device
    print(
        f"torch {torch.__version__}, device {device}, {args.threads} threads, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    peak = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    print(
        f"dense matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. presets × precision on full-length rows (no padding).
        n = 512
        full = synthetic_store(tmp / "full", n, np.full(n, args.seq))
        rows = []
        for preset in args.presets:
            batch = {"tiny": 32, "small": 16, "base": 8, "large": 4}.get(preset, 8)
            for name in ("fp32", "bf16"):
                r = measure(
                    full,
                    preset,
                    args.seq,
                    batch,
                    name == "bf16",
                    False,
                    args.steps,
                    device,
                    tmp / "r",
                )
                rows.append(
                    {
                        "preset": preset,
                        "dtype": name,
                        "batch": f"{batch}x{args.seq}",
                        "tokens/s": f"{r['tokens_per_s']:.0f}",
                        "GFLOP/s": f"{r['flops_per_s'] / 1e9:.1f}",
                        "MFU (same-dtype matmul peak)": f"{100 * r['mfu']:.0f}%",
                    }
                )
                print(f"  {preset} {name}: {rows[-1]['tokens/s']} tokens/s", flush=True)
        print("\nPresets (full-length rows, masked objective, real trainer step;")
        print("MFU = model FLOP/s over the same-dtype 1024^2 matmul peak measured around each row)")
        print(table(rows, list(rows[0])))

        # 2. packed vs padded on length-skewed data.
        max_len = 512
        lengths = skewed_lengths(2048, max_len)
        skewed = synthetic_store(tmp / "skewed", len(lengths), lengths)
        print(
            f"\nSkewed lengths: median {int(np.median(lengths))}, mean {lengths.mean():.0f}, max {lengths.max()}"
            f" (max_len {max_len})"
        )
        rows = []
        for pack in (False, True):
            for name in ("fp32", "bf16"):
                r = measure(
                    skewed,
                    "small",
                    max_len,
                    16,
                    name == "bf16",
                    pack,
                    args.steps,
                    device,
                    tmp / "p",
                )
                rows.append(
                    {
                        "batching": "packed" if pack else "padded",
                        "dtype": name,
                        "real tokens/s": f"{r['tokens_per_s']:.0f}",
                        "step s": f"{r['step_s']:.2f}",
                        "MFU": f"{100 * r['mfu']:.0f}%",
                        "_t": r["tokens_per_s"],
                    }
                )
        for name in ("fp32", "bf16"):
            pad, _pk = (
                next(r["_t"] for r in rows if r["batching"] == b and r["dtype"] == name)
                for b in ("padded", "packed")
            )
            for r in rows:
                if r["dtype"] == name:
                    r["vs padded"] = f"{r['_t'] / pad:.2f}x"
        print("Packed vs padded (small preset, 16 samples per step)")
        print(table(rows, ["batching", "dtype", "real tokens/s", "step s", "MFU", "vs padded"]))

        # 3. 1 vs 2 processes at the same global batch (CPU: gloo).
        if not args.skip_processes and device == "cpu":
            settings = {
                "store": str(tmp / "full"),
                "preset": "small",
                "max_len": args.seq,
                "batch": 16,
                "steps": args.steps,
                "run_dir": str(tmp / "d"),
            }
            cores = os.cpu_count() or 1
            runs = [(1, cores), (1, 1), (2, max(1, cores // 2))]
            rows = []
            for nproc, threads in runs:
                r = run_processes(nproc, threads, settings)
                rows.append(
                    {
                        "processes": nproc,
                        "threads each": threads,
                        "tokens/s": f"{r['tokens_per_s']:.0f}",
                        "_t": r["tokens_per_s"],
                    }
                )
            for r in rows:
                r["vs 1 process"] = f"{r['_t'] / rows[0]['_t']:.2f}x"
            print(
                f"\nProcesses (small preset, global batch 16x{args.seq}, torchrun + gloo, {cores} cores)"
            )
            print(table(rows, ["processes", "threads each", "tokens/s", "vs 1 process"]))


if __name__ == "__main__":
    main()
