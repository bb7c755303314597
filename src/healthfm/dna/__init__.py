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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.dna.baselines import BASELINES, kmer_counts, one_hot
from healthfm.dna.options import DnaOptions
from healthfm.dna.reader import is_fasta, read_fasta, read_table
from healthfm.dna.tokenizer import (
    KmerTokenizer,
    make_rc_augmenter,
    reverse_complement_batch,
)
from healthfm.errors import ConfigError, DataError
from healthfm.modality import (
    BaselineFn,
    DemoSpec,
    EvaluationRows,
    Features,
    Modality,
    Samples,
    attach_survival,
    next_power_of_two,
    register_modality,
    survival_options,
)
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

__all__ = [
    "DnaModality",
    "KmerTokenizer",
    "kmer_counts",
    "make_rc_augmenter",
    "one_hot",
    "read_fasta",
    "read_table",
    "reverse_complement_batch",
]

#: Samples per TokenChunk yielded by :meth:`DnaModality.encode`.
CHUNK_SIZE = 65_536
#: Longest context :meth:`DnaModality.model_defaults` proposes.
MAX_CONTEXT = 4096


def _no_label(value: Any) -> bool:
    return value is None or str(value).strip().lower() in ("", "none")


def _sequence_lengths(samples: Samples, indices: np.ndarray | None = None) -> np.ndarray:
    payload = samples.payload if indices is None else samples.payload[indices]
    return np.fromiter(map(len, payload), dtype=np.int64, count=len(payload))


class DnaModality(Modality):
    """DNA sequences from TSV/CSV tables or FASTA files."""

    name = "dna"
    options_class = DnaOptions
    objective = "masked"
    default_pooling = "mean"
    #: Fixed-length tasks (splice sites, promoters) are motifs at fixed offsets: "concat"
    #: keeps every position's state, which mean pooling erases.
    poolings = ("mean", "cls", "concat")
    input_kind = "a table (TSV/CSV) or FASTA file of sequences"

    def looks_like(self, path: Path) -> bool | None:
        """A text file (a table or FASTA): not a folder, not HDF5, parquet or an image."""
        if Path(path).is_dir():
            return False
        try:
            with open(path, "rb") as handle:
                head = handle.read(8)
        except OSError:
            return None
        binary = (b"\x89HDF", b"PAR1", b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
        return not head.startswith(binary)

    def read(self, path: str | Path, options: DnaOptions | dict[str, Any]) -> Samples:
        """Read a FASTA (``.fa``/``.fasta``/``.fna``, optionally ``.gz``) or a TSV/CSV table."""
        options = self.options(options)
        label_column = options.label_column
        survival = survival_options(options)
        if survival is not None:  # a time-to-event table: its time and event columns
            if is_fasta(path):
                raise ConfigError(
                    "--time-column / --event-column are for a table input, not FASTA",
                    file=path,
                    column="time_column",
                )
            samples = read_table(
                path,
                sequence_column=options.sequence_column,
                label_column=None,
                key_column=options.key_column,
                columns=survival,
            )
            cols = samples.info["columns"]
            return attach_survival(
                samples, cols[survival[0]], cols[survival[1]], *survival, options.task_type
            )
        if is_fasta(path):
            return read_fasta(
                path,
                labels=options.labels,
                label_column="label" if _no_label(label_column) else label_column,
                id_column=options.id_column,
            )
        if options.labels:
            raise ConfigError(
                f"--labels is for FASTA input; {path} is read as a table, whose labels are "
                "its --label-column"
            )

        def table(label: str | None) -> Samples:
            return read_table(
                path,
                sequence_column=options.sequence_column,
                label_column=label,
                key_column=options.key_column,
            )

        if label_column is None:
            # Not given: "label" if the table has it, else unlabelled (a pretraining corpus).
            try:
                return table("label")
            except DataError as exc:
                if exc.column != "label" or "no label column" not in exc.message:
                    raise
                return table(None)
        return table(None if _no_label(label_column) else label_column)

    def fit_tokenizer(
        self, samples: Samples, train_idx: np.ndarray, options: DnaOptions | dict[str, Any]
    ) -> KmerTokenizer:
        """Build the k-mer tokenizer; its vocabulary is fixed, so fitting only sets
        ``max_length`` to the power of two covering the longest training sequence
        (at most 4096 tokens)."""
        options = self.options(options)
        probe = KmerTokenizer(k=options.k, stride=options.stride, ambiguity=options.ambiguity)
        lengths = probe.tokenized_lengths(_sequence_lengths(samples, np.asarray(train_idx)))
        longest = int(lengths.max()) if len(lengths) else 1
        config = probe.config()
        config["max_length"] = min(next_power_of_two(longest), MAX_CONTEXT)
        config["reverse_complement"] = bool(options.reverse_complement)
        return KmerTokenizer.from_config(config)

    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tokenize the chosen samples in chunks of at most 65,536, in order (with the
        k-mer tokenizer or any other DNA tokenizer, e.g. a published model's)."""
        tokenizer = self._dna(tokenizer)
        indices = np.arange(len(samples)) if indices is None else np.asarray(indices)
        for lo in range(0, len(indices), CHUNK_SIZE):
            idx = indices[lo : lo + CHUNK_SIZE]
            yield tokenizer.encode(samples.payload[idx], keys=samples.keys[idx].tolist())

    def check_input(self, samples: Samples, tokenizer: Tokenizer) -> None:
        """The k-mer vocabulary covers every valid sequence; a sequence longer than the
        context is said (a warning with the count): its vector describes its first tokens
        only. A published model's tokenizer checks its own coverage (``check_sequences``)."""
        import logging

        check = getattr(self._dna(tokenizer), "check_sequences", None)
        if check is not None:
            check(samples.payload, source=samples.source)
            return
        kmer = self._kmer(tokenizer)
        if kmer.max_length is None:
            return
        full = KmerTokenizer(
            k=kmer.k, stride=kmer.stride, ambiguity=kmer.ambiguity, add_cls=kmer.add_cls
        )
        lengths = full.tokenized_lengths(_sequence_lengths(samples))
        longer = np.flatnonzero(lengths > kmer.max_length)
        if len(longer):
            i = int(longer[0])
            logging.getLogger("healthfm").warning(
                "healthfm: warning: %d of %d sequences are longer than the model's context of "
                "%d tokens and are embedded from their first %d tokens only (e.g. %r: %d "
                "tokens) (file %s)",
                len(longer),
                len(samples),
                kmer.max_length,
                kmer.max_length,
                str(samples.keys[i]),
                int(lengths[i]),
                samples.source,
            )

    def augmenter(self, tokenizer: Tokenizer) -> Callable | None:
        """Reverse-complement each row with probability 0.5, if the tokenizer says so."""
        tokenizer = self._kmer(tokenizer)
        return make_rc_augmenter(tokenizer, p=0.5) if tokenizer.reverse_complement else None

    def model_defaults(
        self, tokenizer: Tokenizer, samples: Samples, options: dict[str, Any]
    ) -> dict[str, Any]:
        """``max_len``: power of two covering the longest tokenized sample, at most 4096."""
        lengths = self._kmer(tokenizer).tokenized_lengths(_sequence_lengths(samples))
        longest = int(lengths.max()) if len(lengths) else 1
        return {"max_len": min(next_power_of_two(longest), MAX_CONTEXT)}

    def baselines(self) -> dict[str, BaselineFn]:
        """``kmer-counts+logreg`` and ``one-hot+logreg`` featurizers."""
        return dict(BASELINES)

    def baseline_features(self, samples: Samples, rows: EvaluationRows) -> dict[str, Features]:
        """The featurizers' baselines, and ``onehot-cnn+logreg``: the supervised CNN trained
        on the ``train`` rows with early stopping on ``val`` (its hidden layer probed; not
        for a time-to-event task, which it has no loss for)."""
        import time

        from healthfm.dna.baselines import cnn_features

        out = super().baseline_features(samples, rows)
        if rows.survival:  # the CNN's losses are classification / regression ones
            return out
        t = time.perf_counter()
        train, val = rows.indices("train"), rows.indices("val")
        if len(val) == 0:  # no val split: the last tenth of the train rows stops it
            train, val = train[: -max(1, len(train) // 10)], train[-max(1, len(train) // 10) :]
        length = int(_sequence_lengths(samples, train).max())
        X, info = cnn_features(
            one_hot(samples.payload, length), rows.y, train, val, rows.regression
        )
        out["onehot-cnn+logreg"] = Features(
            X, baseline=True, extra=info, seconds=time.perf_counter() - t
        )
        return out

    def demo_spec(self, quick: bool) -> DemoSpec:
        """Splice junctions (EI / IE / N): masked pretraining on the train split, then probes."""
        from healthfm.dna.demo import demo_spec

        return demo_spec(quick)

    @staticmethod
    def _dna(tokenizer: Tokenizer) -> Tokenizer:
        # Embedding takes any DNA tokenizer with encode(sequences, keys) -> TokenChunk.
        if getattr(tokenizer, "modality", None) != "dna" or not hasattr(tokenizer, "encode"):
            raise ConfigError(
                "the DNA modality needs a DNA tokenizer (dna.kmer, or a published DNA "
                f"model's), got {type(tokenizer).__name__} "
                f"({getattr(tokenizer, 'type', '?')})"
            )
        return tokenizer

    @staticmethod
    def _kmer(tokenizer: Tokenizer) -> KmerTokenizer:
        if not isinstance(tokenizer, KmerTokenizer):
            raise ConfigError(
                f"the DNA modality needs a dna.kmer tokenizer, got {type(tokenizer).__name__} "
                f"({getattr(tokenizer, 'type', '?')})"
            )
        return tokenizer


register_modality(DnaModality())
