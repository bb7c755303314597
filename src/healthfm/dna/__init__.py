"""The DNA modality: FASTA/TSV sequences, k-mer tokens, masked pretraining, k-mer baselines.

Defaults, chosen for short sequences such as the bundled 60-nt splice junctions:

* ``k=1`` (single nucleotides, as HyenaDNA and Caduceus): 20 tokens, one per base, so a
  signal at a fixed offset (the GT/AG of a splice site) is one token, and masked-token
  pretraining is not trivially solved by copying from overlapping neighbours (the known
  weakness of overlapping 6-mers, DNABERT). ``--k 6`` gives DNABERT-style tokens.
* reverse-complement augmentation during pretraining, on by default. It is a flag of the
  tokenizer (``tokenizer.json`` records what the model was pretrained with) that is left
  out of the tokenizer hash; turn it off (``--no-reverse-complement``) for strand-specific
  data when you fine-tune with augmentation.

Genomes (a ``.2bit`` file, or a FASTA without ``--labels`` whose first record is longer than
the longest context) are read as a corpus, not as one sample per record: the records are the
split unit, a genome store holds their bases once (:mod:`healthfm.dna.genome_store`), and
training draws windows of ``--window`` bases from it (:class:`GenomeWindows`); embedding
tiles the records (or reads BED regions) into windows ``record:start-end``.
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
