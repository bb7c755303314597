"""Embedding throughput of healthfm's native CLMBR-T network at the published shape.

Usage::

    .venv/bin/python benchmarks/bench_published_ehr.py [--device cuda] [--lengths 512 1024]
        [--batch 8] [--release 0.2.0] [--out bench_out/published_ehr.json]

Random weights at CLMBR-T-base's shape as FEMR's defaults and the model card give it
(hidden 768, 12 heads, FFN 3072, attention width 496; 12 layers and a 65,536-entry
embedding are our reading: a real folder's config.json decides), forward passes of padded
batches of random token ids with increasing ages, fp32 and (on CUDA) bf16 autocast.
Reports tokens/s (best of 3 after a warm-up) and the peak CUDA memory.

No reference implementation runs here: femr's network needs flash-attn (0.2.0) or
xformers (>= 0.2.2), neither installable on these machines; correctness against femr's
code is checked by ``scripts/verify_clmbr_against_femr.py`` on tiny checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from healthfm.encoders.clmbr import FEMR_DEFAULTS, ClmbrEncoder, ClmbrTokenizer

PUBLISHED = {**FEMR_DEFAULTS, "vocab_size": 65536, "n_layers": 12}


def build(release: str, device: str) -> ClmbrEncoder:
    """A randomly initialised CLMBR-T network at the published shape."""
    torch.manual_seed(0)
    tok = ClmbrTokenizer([{"type": "code", "code_string": f"X/{i}"} for i in range(16)])
    enc = ClmbrEncoder(PUBLISHED, release, tok, Path("."), None)
    return enc.eval().to(device)


def batch_of(n: int, length: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, PUBLISHED["vocab_size"], (n, length), generator=g)
    ages = torch.cumsum(torch.rand(n, length, generator=g, dtype=torch.float64) * 3, 1)
    mask = torch.ones(n, length, dtype=torch.bool)
    return {"ids": ids.to(device), "times": ages.to(device), "attention_mask": mask.to(device)}


@torch.inference_mode()
def measure(enc, batch, bf16: bool, device: str, repeats: int = 3) -> float:
    def once():
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            enc.forward_features(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    once()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t)
    return batch["ids"].numel() / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--release", default="0.2.0", choices=["0.2.0", "0.2.2"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    enc = build(args.release, args.device)
    n_params = sum(p.numel() for p in enc.parameters())
    rows = []
    print(f"CLMBR-T shape, {n_params / 1e6:.1f}M parameters, femr {args.release}, {args.device}")
    for length in args.lengths:
        batch = batch_of(args.batch, length, args.device)
        for bf16 in [False, True] if args.device.startswith("cuda") else [False]:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            tps = measure(enc, batch, bf16, args.device)
            peak = (
                torch.cuda.max_memory_allocated() / 2**30
                if args.device.startswith("cuda")
                else None
            )
            row = {
                "length": length,
                "batch": args.batch,
                "dtype": "bf16" if bf16 else "fp32",
                "tokens_per_s": round(tps),
                "peak_gib": None if peak is None else round(peak, 2),
            }
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"params": n_params, "device": args.device, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
