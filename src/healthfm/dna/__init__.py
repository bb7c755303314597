"""The DNA modality: FASTA/TSV sequences, k-mer tokens, masked pretraining, k-mer baselines.

The modality class, its defaults and their reasons: :mod:`healthfm.dna.modality`.
"""

from __future__ import annotations

from healthfm.dna.baselines import kmer_counts, one_hot
from healthfm.dna.genome_store import GenomeStore, GenomeWindows
from healthfm.dna.modality import DnaModality
from healthfm.dna.reader import read_fasta, read_table
from healthfm.dna.tokenizer import KmerTokenizer, make_rc_augmenter, reverse_complement_batch

__all__ = [
    "DnaModality",
    "GenomeStore",
    "GenomeWindows",
    "KmerTokenizer",
    "kmer_counts",
    "make_rc_augmenter",
    "one_hot",
    "read_fasta",
    "read_table",
    "reverse_complement_batch",
]
