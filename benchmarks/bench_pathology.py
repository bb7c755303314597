"""Pathology throughput and memory: tiling + tile reading on a large pyramidal TIFF, and
ViT embedding speed.

1. Writes a pyramidal, JPEG-tiled TIFF of SIDE × SIDE px (default 20,480) at 0.5 µm/px by
   repeating the bundled Aperio slide (CMU-1-Small-Region.svs) — tile by tile, never
   holding the plane in memory — plus a 4× smaller one to show that memory does not grow
   with the slide.
2. For each slide, in a fresh process: tissue detection + tile planning at 0.5 µm/px,
   224 px, then reading N tiles through a DataLoader with 0 / 1 / 2 workers. Reports
   tiles/s and the peak RSS of the process and of its workers.
3. Embedding throughput (tiles/s) of the ``tiny`` and ``small`` ViT presets (224 px,
   16 px patches = 197 tokens), fp32 vs bf16 autocast, on this machine's CPU (or GPU).

Run: ``.venv/bin/python benchmarks/bench_pathology.py [--side 20480] [--tiles 1500]``.
Numbers are ratios within one run on one machine, not promises.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 256


def write_big_slide(path: Path, side: int, mpp: float = 0.5, levels: int = 5) -> None:
    """A ``side``² pyramidal TIFF made of the bundled slide repeated, written tile by tile."""
    import tifffile
    from PIL import Image

    from healthfm.datasets import data_path

    src = tifffile.imread(data_path("pathology", "CMU-1-Small-Region.svs"), key=0)
    res = 1e4 / mpp

    def tiles(image: np.ndarray, n_side: int):
        h, w = image.shape[:2]
        # Wrap around the source so every tile is a real-pixel crop.
        padded = np.concatenate([image, image[:TILE]], axis=0)
        padded = np.concatenate([padded, padded[:, :TILE]], axis=1)
        for r in range(-(-n_side // TILE)):
            for c in range(-(-n_side // TILE)):
                y, x = (r * TILE) % h, (c * TILE) % w
                yield padded[y : y + TILE, x : x + TILE]

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        opts = {
            "tile": (TILE, TILE),
            "compression": "jpeg",
            "compressionargs": {"level": 90},
            "photometric": "rgb",
            "dtype": np.uint8,
        }
        tif.write(
            tiles(src, side),
            shape=(side, side, 3),
            subifds=levels - 1,
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            **opts,
        )
        for k in range(1, levels):
            f = 2**k
            small = np.asarray(
                Image.fromarray(src).resize(
                    (src.shape[1] // f, src.shape[0] // f), Image.Resampling.BOX
                )
            )
            tif.write(
                tiles(small, side // f),
                shape=(side // f, side // f, 3),
                subfiletype=1,
                resolution=(res / f, res / f),
                resolutionunit="CENTIMETER",
                **opts,
            )


def child_read(slide: str, workers: int, n_tiles: int) -> dict:
    """Run in a fresh process: plan tiles, read ``n_tiles`` of them with ``workers``."""
    import torch

    from healthfm.pathology.reader import open_slide
    from healthfm.pathology.tiling import SlideTiles, plan_tiles, tile_loader

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with open_slide(slide) as s:
        grid = plan_tiles(s, mpp=0.5, size=224, min_tissue=0.5)
        t_plan = time.perf_counter() - t0
        dataset = SlideTiles(s, grid)
        n = min(n_tiles, len(grid))
        t1 = time.perf_counter()
        seen = 0
        checksum = 0
        for batch in tile_loader(dataset, n, 64, num_workers=workers):
            seen += batch.shape[0]
            checksum += int(batch[:, ::32, ::32].sum())
        t_read = time.perf_counter() - t1
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "tiles_total": len(grid),
        "tiles_read": seen,
        "plan_s": t_plan,
        "read_s": t_read,
        "tiles_per_s": seen / t_read,
        "peak_rss_mb": own,
        "peak_worker_rss_mb": kids,
        "checksum": checksum,
        "level": grid.attrs["level"],
    }


def run_child(slide: Path, workers: int, n_tiles: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(slide),
            "--workers",
            str(workers),
            "--tiles",
            str(n_tiles),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_embedding(n_batches: int, batch_size: int) -> list[dict]:
    import torch

    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel
    from healthfm.pathology.tokenizer import PatchTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = PatchTokenizer(224, 16)
    tiles = torch.randint(0, 256, (batch_size, 224, 224, 3), dtype=torch.uint8)
    batch = {k: v.to(device) for k, v in tok.encode_tiles(tiles).items()}
    rows = []
    for preset in ("tiny", "small"):
        torch.manual_seed(0)
        model = (
            FoundationModel(
                ModelConfig.from_preset(
                    preset,
                    modality="pathology",
                    vocab_size=tok.vocab_size,
                    objective="mae",
                    input_dim=tok.input_dim,
                    max_len=tok.n_tokens,
                )
            )
            .to(device)
            .eval()
        )
        for bf16 in (False, True):
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            ):
                model.embed(batch)  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(n_batches):
                    out = model.embed(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
            rows.append(
                {
                    "preset": preset,
                    "dtype": "bf16" if bf16 else "fp32",
                    "device": device.type,
                    "tiles_per_s": n_batches * batch_size / dt,
                    "dim": int(out.shape[1]),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--side", type=int, default=20480, help="slide side in pixels (default 20480)"
    )
    parser.add_argument("--tiles", type=int, default=1500, help="tiles read per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--embed-batches", type=int, default=3)
    parser.add_argument("--embed-batch-size", type=int, default=32)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_read(args.child, args.workers[0], args.tiles)))
        return
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        slides = {}
        for side in (args.side // 4, args.side):
            path = Path(tmp) / f"big_{side}.tif"
            t = time.perf_counter()
            write_big_slide(path, side)
            slides[side] = path
            print(
                f"wrote {side}×{side} px pyramidal TIFF ({path.stat().st_size / 1e6:.0f} MB) "
                f"in {time.perf_counter() - t:.1f} s"
            )
        print(
            "\nTiling + reading (0.5 µm/px, 224 px tiles, min tissue 0.5; DataLoader batches of 64)"
        )
        print(
            f"{'slide px':>12} {'workers':>7} {'tiles':>7} {'read':>6} {'plan s':>7} {'tiles/s':>8} "
            f"{'peak RSS MB':>12} {'worker RSS MB':>14}"
        )
        for side, path in slides.items():
            for w in args.workers:
                r = run_child(path, w, args.tiles)
                print(
                    f"{side:>12} {w:>7} {r['tiles_total']:>7} {r['tiles_read']:>6} {r['plan_s']:>7.2f} "
                    f"{r['tiles_per_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['peak_worker_rss_mb']:>14.0f}"
                )
    print(
        f"\nEmbedding (224 px, 197 tokens, batch {args.embed_batch_size}, {args.embed_batches} batches)"
    )
    print(f"{'preset':>7} {'dtype':>5} {'device':>6} {'tiles/s':>8}")
    for r in bench_embedding(args.embed_batches, args.embed_batch_size):
        print(f"{r['preset']:>7} {r['dtype']:>5} {r['device']:>6} {r['tiles_per_s']:>8.1f}")


if __name__ == "__main__":
    main()
