"""The single-cell modality: AnnData counts, Geneformer / scGPT tokens, HVG+PCA baselines.

The modality class, its defaults and their reasons: :mod:`healthfm.singlecell.modality`.
"""

from __future__ import annotations

from healthfm.singlecell.baselines import highly_variable_genes, hvg_pca, log_normalize
from healthfm.singlecell.bundled import celltypist_sample, pbmc68k, pretraining_corpus
from healthfm.singlecell.modality import SingleCellModality, stratified_splits
from healthfm.singlecell.reader import CountMatrix, Coverage, read_h5ad, samples_from_anndata
from healthfm.singlecell.soma import read_soma
from healthfm.singlecell.tokenizer import BinnedTokenizer, CellTokenizer, RankValueTokenizer

__all__ = [
    "BinnedTokenizer",
    "CellTokenizer",
    "CountMatrix",
    "Coverage",
    "RankValueTokenizer",
    "SingleCellModality",
    "celltypist_sample",
    "highly_variable_genes",
    "hvg_pca",
    "log_normalize",
    "pbmc68k",
    "pretraining_corpus",
    "read_h5ad",
    "read_soma",
    "samples_from_anndata",
    "stratified_splits",
]
