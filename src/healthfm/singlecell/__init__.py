"""The single-cell modality: AnnData counts, Geneformer / scGPT tokens, HVG+PCA baselines.

* Reading: ``.h5ad`` (optionally backed), counts in ``X`` or ``--layer``, genes in
  ``var_names`` or ``--gene-column``, validated (:mod:`healthfm.singlecell.reader`); a
  TileDB-SOMA experiment (CELLxGENE Census format), read in blocks of cells, optionally
  filtered (``--obs-filter``) (:mod:`healthfm.singlecell.soma`).
* Corpora: several sources with different gene panels share one vocabulary
  (:meth:`SingleCellModality.fit_corpus_tokenizer`, :mod:`healthfm.singlecell.corpus`).
* Tokens: rank-value encoding (``--tokenizer rank``, default, Geneformer) or value
  binning (``--tokenizer binned``, scGPT), fitted on the training cells only
  (:mod:`healthfm.singlecell.tokenizer`). Pretraining is masked gene modelling through the
  shared masked objective (for binned tokens it also hides the masked tokens' values).
* Splits: by ``--group-column`` (donor, sample) when given; otherwise, with a label column,
  stratified by label (each class cut 70/10/20 by a hash of the barcode); otherwise by a
  hash of the barcode. Give pretraining the same ``--label-column`` as evaluation so both
  hold out the same test cells.
* Evaluation: linear probe next to ``hvg-pca+logreg`` and ``lognorm+logreg``
  (:mod:`healthfm.singlecell.baselines`), plus k-NN probes and zero-shot k-means
  clustering (ARI, NMI) of the embedding next to the same on HVG+PCA.
* scverse API: :mod:`healthfm.scverse` (``fit`` and ``tl.embed``).
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
