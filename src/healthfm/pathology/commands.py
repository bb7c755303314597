"""The pathology sub-commands of ``healthfm``: ``tile`` and ``evaluate-slides``.

Registered through the pathology modality's :class:`~healthfm.modality.Commands` capability
(:class:`healthfm.pathology.modality.PathologyCommands`), so the CLI names no modality. The work
(tiling, MIL) is imported when a command runs, not when ``healthfm --help`` is built.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    """Add ``tile`` and ``evaluate-slides`` to the CLI's sub-commands ``sub``."""
    p = sub.add_parser(
        "tile", help="detect tissue and tile slides into Trident-layout HDF5 + thumbnails"
    )
    p.add_argument("input", help="a slide (.svs, .tif ...) or a folder of slides")
    p.add_argument(
        "--out", required=True, help="folder for patches/<slide>.h5 and thumbnails/<slide>.png"
    )
    p.add_argument(
        "--mpp", type=float, default=0.5, help="target microns per pixel (default 0.5, about 20x)"
    )
    p.add_argument(
        "--size", type=int, default=224, help="tile side in pixels at --mpp (default 224)"
    )
    p.add_argument("--overlap", type=int, default=0, help="overlap of neighbouring tiles in pixels")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="minimum tissue fraction of a tile (default 0.5)",
    )
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="microns per level-0 pixel if the file lacks it",
    )

    p = sub.add_parser(
        "evaluate-slides", help="slide-level gated ABMIL on tile features vs mean pooling, with CIs"
    )
    p.add_argument("model", help="model folder that produced the features (provenance)")
    p.add_argument(
        "features", help="folder of <slide_id>.h5 files with 'features' (from healthfm embed)"
    )
    p.add_argument("--labels", required=True, help="CSV with slide_id,label[,split]")
    p.add_argument("--out", required=True, help="folder for results.json, attention/ and heatmaps/")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="repeated runs (default 0-4)"
    )
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=40, help="ABMIL training epochs (default 40)")
    p.add_argument("--slide-column", default="slide_id")
    p.add_argument("--label-column", default="label")


def _is_tile_file(path) -> bool:
    """A Trident-layout tile ``.h5`` (``coords``): one healthfm tile wrote (before the
    folder's marker listed its files), so tile may replace it."""
    if str(path).lower().endswith(".h5"):
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                return "coords" in handle
        except Exception:  # unreadable: not ours
            return False
    return False


def run_command(args: argparse.Namespace) -> bool:
    """Run ``args.command`` if it is ``tile`` or ``evaluate-slides``; True when it was."""
    if args.command == "tile":
        from healthfm.fsutil import check_output_parent, owned_outputs
        from healthfm.pathology.tiling import find_slides, tile_slide

        check_output_parent(args.out, "tile --out folder")
        # Only files tile wrote (listed in the folder's marker, or a tile .h5) are replaced.
        with owned_outputs(args.out, "the tile --out folder", ours=_is_tile_file):
            for slide in find_slides(args.input):
                h5, grid = tile_slide(
                    slide, args.out, args.mpp, args.size, args.overlap, args.min_tissue,
                    args.slide_mpp,
                )  # fmt: skip
                print(
                    f"{slide.name}: {len(grid)} tiles of {args.size} px at {args.mpp} µm/px -> {h5}"
                )
        return True
    if args.command == "evaluate-slides":
        from healthfm.pathology.mil import evaluate_slides

        evaluate_slides(
            args.model,
            args.features,
            args.labels,
            args.out,
            seeds=tuple(args.seeds),
            n_boot=args.n_boot,
            slide_column=args.slide_column,
            label_column=args.label_column,
            epochs=args.epochs,
        )
        return True
    return False
