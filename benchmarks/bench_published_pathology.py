"""Tile-embedding throughput of the native pathology ViT vs transformers, at the
published models' shapes (random weights: speed does not depend on their values).

* ViT-B/16 (Phikon) vs ``ViTModel``;
* ViT-L/16 with layer scale (Phikon-v2, UNI) vs ``Dinov2Model``;
* ViT-H/14, 4 registers, packed SwiGLU (Virchow2) vs ``Dinov2WithRegistersModel``
  (``use_swiglu_ffn``: the same 3416-wide gated MLP);
* ViT-g/14, 4 registers, packed SwiGLU (H-optimus-0) vs ``Dinov2WithRegistersModel``.

Forward only, 224 px tiles, fp32 and under bf16 autocast; ours takes the patch vectors the
pathology tokenizer cuts, transformers the pixel tensor. The two alternate round by round
and the median is reported with the ratio ours / transformers.

    python benchmarks/bench_published_pathology.py [--models vit-b vit-l] [--tiles 8]

ViT-H/14 and ViT-g/14 are ~170 and ~300 GFLOPs per tile: on a small CPU give them few
tiles (``--big-tiles``, default 2) and one round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from healthfm.encoders.pathology_vits import VisionTransformer, ViTConfig
from healthfm.pathology.tokenizer import patchify

SHAPES = {
    # name: (native config, transformers class name, transformers config kwargs)
    "vit-b": (
        ViTConfig(patch_size=16, dim=768, depth=12, heads=12, mlp_hidden=3072, eps=1e-12),
        "ViTModel",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    ),
    "vit-l": (
        ViTConfig(patch_size=16, dim=1024, depth=24, heads=16, mlp_hidden=4096, layer_scale=True),
        "Dinov2Model",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
    ),
    "vit-h": (
        ViTConfig(
            patch_size=14,
            dim=1280,
            depth=32,
            heads=16,
            mlp_hidden=int(1280 * 5.3375),
            glu=True,
            layer_scale=True,
            reg_tokens=4,
        ),
        "Dinov2WithRegistersModel",
        dict(
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=16,
            mlp_ratio=4,
            use_swiglu_ffn=True,
            num_register_tokens=4,
        ),
    ),
    "vit-g": (
        ViTConfig(
            patch_size=14,
            dim=1536,
            depth=40,
            heads=24,
            mlp_hidden=int(1536 * 2.66667 * 2),
            glu=True,
            layer_scale=True,
            reg_tokens=4,
            no_embed_class=True,
        ),
        "Dinov2WithRegistersModel",
        dict(
            hidden_size=1536,
            num_hidden_layers=40,
            num_attention_heads=24,
            mlp_ratio=4,
            use_swiglu_ffn=True,
            num_register_tokens=4,
        ),
    ),
}


def build(name: str):
    import transformers

    cfg, cls_name, kwargs = SHAPES[name]
    ours = VisionTransformer(cfg).eval()
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("Model", "Config"))
    theirs = cls(config_cls(image_size=224, patch_size=cfg.patch_size, **kwargs)).eval()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for k, p in theirs.named_parameters() if "mask_token" not in k)
    return ours, theirs, n_ours, n_theirs, cfg


@torch.inference_mode()
def timed(fn, x, bf16: bool, device: str) -> float:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        t = time.perf_counter()
        fn(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t


def run(name: str, tiles: int, batch: int, rounds: int, device: str) -> list[str]:
    ours, theirs, n_ours, n_theirs, cfg = build(name)
    ours.to(device)
    theirs.to(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(tiles, 3, 224, 224, generator=gen).to(device)
    patches = patchify(images, cfg.patch_size)
    lines = []
    for bf16 in (False, True):
        # One warm-up batch each, then alternate the two models round by round.
        timed(ours.forward_patches, patches[:batch], bf16, device)
        timed(lambda x: theirs(pixel_values=x), images[:batch], bf16, device)
        t_ours, t_theirs = [], []
        for _ in range(rounds):
            a = b = 0.0
            for s in range(0, tiles, batch):
                a += timed(ours.forward_patches, patches[s : s + batch], bf16, device)
                b += timed(lambda x: theirs(pixel_values=x), images[s : s + batch], bf16, device)
            t_ours.append(tiles / a)
            t_theirs.append(tiles / b)
        o, t = statistics.median(t_ours), statistics.median(t_theirs)
        lines.append(
            f"{name:6s} {'bf16' if bf16 else 'fp32':5s} params {n_ours / 1e6:7.1f}M / "
            f"{n_theirs / 1e6:7.1f}M  ours {o:8.3f} tiles/s  transformers {t:8.3f} tiles/s  "
            f"ratio {o / t:5.2f}"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tiles", type=int, default=8, help="tiles per round (B and L)")
    parser.add_argument("--big-tiles", type=int, default=2, help="tiles per round (H and g)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}", flush=True)
    for name in args.models:
        big = name in ("vit-h", "vit-g") and args.device == "cpu"
        tiles = args.big_tiles if big else args.tiles
        run(name, tiles, min(args.batch, tiles), 1 if big else args.rounds, args.device)


if __name__ == "__main__":
    main()
