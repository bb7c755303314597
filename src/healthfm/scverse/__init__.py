"""The scverse facade of the single-cell modality (scanpy-style, as scvi-tools' API).

>>> import scanpy as sc, healthfm.scverse as hsc
>>> model = hsc.fit(adata, out="pbmc_model", steps=300)          # counts in adata.X
>>> hsc.tl.embed(adata, model)                                    # adata.obsm["X_healthfm"]
>>> sc.pp.neighbors(adata, use_rep="X_healthfm"); sc.tl.umap(adata)

``fit`` runs the shared pretrain stage, so this package sits above the stages; the
single-cell modality package (:mod:`healthfm.singlecell`) never imports a stage.
"""

from __future__ import annotations

from healthfm.scverse import tl
from healthfm.scverse.tl import embed, fit

__all__ = ["embed", "fit", "tl"]
