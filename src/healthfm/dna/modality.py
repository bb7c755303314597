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

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.dna.baselines import BASELINES, one_hot
from healthfm.dna.genome import GenomeIndex, is_genome_input, list_genome_files, read_genome
from healthfm.dna.genome_store import (
    GenomeWindows,
    reuse_genome_store,
    write_genome_store,
)
from healthfm.dna.options import DnaOptions
from healthfm.dna.reader import is_fasta, read_fasta, read_table
from healthfm.dna.tokenizer import (
    KmerTokenizer,
    make_rc_augmenter,
)
from healthfm.errors import ConfigError, DataError
from healthfm.modality import (
    BaselineFn,
    DemoSpec,
    Embedding,
    EvaluationRows,
    Features,
    Modality,
    Pretraining,
    Samples,
    next_power_of_two,
    register_modality,
    survival_options,
)
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

#: Samples per TokenChunk yielded by :meth:`DnaModality.encode`.
CHUNK_SIZE = 65_536
#: Longest context :meth:`DnaModality.model_defaults` proposes.
MAX_CONTEXT = 4096


def _no_label(value: Any) -> bool:
    return value is None or str(value).strip().lower() in ("", "none")


def _is_genome(samples: Samples) -> bool:
    return isinstance(samples.payload, GenomeIndex)


def _window_tokens(tokenizer: KmerTokenizer, window: int) -> int:
    """Tokens a window of ``window`` bases encodes to; more than the longest context is a
    ConfigError."""
    full = KmerTokenizer(
        k=tokenizer.k,
        stride=tokenizer.stride,
        ambiguity=tokenizer.ambiguity,
        add_cls=tokenizer.add_cls,
    )
    tokens = int(full.tokenized_lengths(np.array([window]))[0])
    if tokens > MAX_CONTEXT:
        longest = (MAX_CONTEXT - full.add_cls - 1) * full.stride + full.k
        raise ConfigError(
            f"--window {window} gives {tokens} tokens, more than the longest context "
            f"({MAX_CONTEXT}); use --window {longest} or less",
            column="window",
        )
    return tokens


def _sequence_lengths(samples: Samples, indices: np.ndarray | None = None) -> np.ndarray:
    payload = samples.payload if indices is None else samples.payload[indices]
    return np.fromiter(map(len, payload), dtype=np.int64, count=len(payload))


def _dna(tokenizer: Tokenizer) -> Tokenizer:
    # Embedding takes any DNA tokenizer with encode(sequences, keys) -> TokenChunk.
    if getattr(tokenizer, "modality", None) != "dna" or not hasattr(tokenizer, "encode"):
        raise ConfigError(
            "the DNA modality needs a DNA tokenizer (dna.kmer, or a published DNA "
            f"model's), got {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'type', '?')})"
        )
    return tokenizer


def _kmer(tokenizer: Tokenizer) -> KmerTokenizer:
    if not isinstance(tokenizer, KmerTokenizer):
        raise ConfigError(
            f"the DNA modality needs a dna.kmer tokenizer, got {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'type', '?')})"
        )
    return tokenizer


class DnaPretraining(Pretraining):
    """DNA pretraining: a folder of genomes is a corpus, reverse-complement augmentation, genome windows drawn from a genome store, and an order-5 Markov count baseline."""

    modality: DnaModality

    def expand_input(self, path: Path) -> list[Path]:
        """A folder stands for its FASTA / FASTA.gz / 2bit files (sorted); a file for itself."""
        path = Path(path)
        if not path.is_dir():
            return [path]
        found = list_genome_files(path)
        if not found:
            raise DataError(
                "no FASTA (.fa, .fna, .fasta ..., optionally .gz) or .2bit files", file=path
            )
        return found

    def augmenter(self, tokenizer: Tokenizer) -> Callable | None:
        """Reverse-complement each row with probability 0.5, if the tokenizer says so."""
        tokenizer = _kmer(tokenizer)
        return make_rc_augmenter(tokenizer, p=0.5) if tokenizer.reverse_complement else None

    def batch_source(
        self,
        tokenizer: Tokenizer,
        samples: Samples,
        indices: np.ndarray,
        *,
        training: bool,
        workdir: Path,
    ) -> Any:
        """A token store of table/FASTA samples; for a genome, :class:`GenomeWindows` over
        a genome store of the ``indices`` records at ``workdir`` (reused when it holds the
        same records of the same file): random window offsets in training, a fixed
        tiling held out."""
        if not _is_genome(samples):
            return super().batch_source(
                tokenizer, samples, indices, training=training, workdir=workdir
            )
        index = samples.payload
        chosen = np.sort(np.asarray(indices, dtype=np.int64))
        names = [index.names[i] for i in chosen.tolist()]
        store = reuse_genome_store(workdir, samples.data_hash, names) or self.modality.tokenize(
            tokenizer, samples, workdir, chosen
        )
        window = int(samples.info.get("window", DnaOptions.window))
        return GenomeWindows(store, _kmer(tokenizer), window, training=training)

    def count_baseline(
        self, tokenizer: Tokenizer, train_source: Any, val_source: Any, n_val: int
    ) -> dict[str, Any] | None:
        """For genome windows (one genome, or a corpus of them): an order-5 Markov model of
        bases fitted on the train windows, scored on the first ``n_val`` held-out windows
        (those the trainer's held-out loss read; :func:`healthfm.dna.markov.markov_baseline`);
        None for tables (the stage's token-frequency baseline then)."""
        from healthfm.dna.markov import markov_baseline

        train = list(getattr(train_source, "sources", [train_source]))
        val = list(getattr(val_source, "sources", [val_source]))
        if not all(isinstance(s, GenomeWindows) for s in train + val):
            return None
        train, val = [s for s in train if len(s)], [s for s in val if len(s)]
        if not train or not val:
            return None
        first = np.arange(min(int(n_val), len(val_source)))
        if hasattr(val_source, "sources"):  # a mixture: its first windows, source by source
            owner, local = val_source.locate(first)
            scored = [(val_source.sources[s], local[owner == s]) for s in np.unique(owner)]
        else:
            scored = [(val_source, first)]
        return markov_baseline(train, val, tokenizer=_kmer(tokenizer), scored=scored)


class DnaEmbedding(Embedding):
    """DNA embedding: a genome is embedded window by window (or by BED region); tables and FASTA records one vector per sample."""

    modality: DnaModality

    # ------------------------------------------------------------------ genome embedding
    def _genome_rows(self, samples: Samples, options: DnaOptions) -> Any:
        """The genome's embedding windows (cached on the samples): BED regions cut to
        ``--window``, or the tiling by ``--window`` every ``--window-stride`` bases."""
        from healthfm.dna.genome_embed import read_bed, tile_records

        key = (options.window, options.window_stride, options.regions)
        cached = samples.info.get("embedding_rows")
        if cached is not None and cached[0] == key:
            return cached[1]
        index = samples.payload
        if options.regions:
            rows = read_bed(options.regions, index, int(options.window))
        else:
            stride = int(options.window_stride or options.window)
            rows = tile_records(index.lengths, int(options.window), stride)
        samples.info["embedding_rows"] = (key, rows)
        return rows

    def prepare(self, encoder: Any, samples: Samples, options: Any) -> None:
        """A genome: its windows (or regions) must fit the model's context."""
        if not _is_genome(samples):
            return super().prepare(encoder, samples, options)
        options = self.modality.options(options)
        tokenizer = _dna(encoder.tokenizer)
        rows = self._genome_rows(samples, options)
        if isinstance(tokenizer, KmerTokenizer) and tokenizer.max_length is not None:
            longest = int((rows.end - rows.start).max()) if len(rows) else 0
            tokens = int(tokenizer.tokenized_lengths(np.array([longest]))[0])
            full = _window_tokens(tokenizer, longest) if longest else 0
            if full > tokens:
                raise ConfigError(
                    f"--window {options.window} gives windows of {full} tokens, longer than "
                    f"the model's context of {tokenizer.max_length}: give a smaller --window",
                    column="window",
                )
        return None

    def n_rows(self, samples: Samples, options: Any) -> int:
        """A genome: one row per window (or BED region); else one per sample."""
        if not _is_genome(samples):
            return super().n_rows(samples, options)
        return len(self._genome_rows(samples, self.modality.options(options)))

    def tokenize_part(
        self, encoder: Any, samples: Samples, indices: np.ndarray, options: Any, workdir: Path
    ) -> Any:
        """A genome: the windows' bases (by random access, or, for a streamed FASTA, from
        a genome store of the whole input written once in a temporary folder beside the
        part folders) tokenized by the encoder's tokenizer into a token store."""
        if not _is_genome(samples):
            return super().tokenize_part(encoder, samples, indices, options, workdir)
        from healthfm.dna.genome_embed import window_sequences
        from healthfm.tokens import write_store

        options = self.modality.options(options)
        rows = self._genome_rows(samples, options)
        index = samples.payload
        # A streamed input's store is written once per opened input, in a temporary folder
        # beside the part folders (the embed stage's work folder), removed with it or
        # when the samples are dropped.
        scratch = samples.info.get("_genome_scratch")
        if scratch is None or not Path(scratch.name).is_dir():
            scratch = tempfile.TemporaryDirectory(
                prefix=".genome-", dir=Path(workdir).parent, ignore_cleanup_errors=True
            )
            samples.info["_genome_scratch"] = scratch
        store_dir = Path(scratch.name) / "store"
        sequences = window_sequences(index, rows, indices, store_dir, samples.data_hash)
        tokenizer = _dna(encoder.tokenizer)
        keys = rows.keys(index, indices).tolist()
        chunks = (
            tokenizer.encode(sequences[lo : lo + CHUNK_SIZE], keys=keys[lo : lo + CHUNK_SIZE])
            for lo in range(0, len(sequences), CHUNK_SIZE)
        )
        extra = {
            "modality": self.modality.name,
            "source": str(samples.source),
            "data_hash": samples.data_hash,
        }
        return write_store(Path(workdir) / "store", chunks, tokenizer.hash, tokenizer.fields, extra)

    def write(
        self, out: Path, samples: Samples, embeddings: Any, attrs: dict[str, Any], options: Any
    ) -> Path:
        """A genome: keys ``record:start-end`` (and the BED names in parquet, if any)."""
        if not _is_genome(samples):
            return super().write(out, samples, embeddings, attrs, options)
        from healthfm.inference import save_embeddings

        rows = self._genome_rows(samples, self.modality.options(options))
        columns = None
        if rows.names is not None and Path(out).suffix == ".parquet":
            columns = {"name": rows.names.astype(str)}
        return save_embeddings(out, rows.keys(samples.payload), embeddings, columns)


class DnaModality(Modality):
    """DNA sequences from TSV/CSV tables or FASTA files."""

    name = "dna"
    pretraining_class = DnaPretraining
    embedding_class = DnaEmbedding
    options_class = DnaOptions
    objective = "masked"
    default_pooling = "mean"
    #: Fixed-length tasks (splice sites, promoters) are motifs at fixed offsets: "concat"
    #: keeps every position's state, which mean pooling erases.
    poolings = ("mean", "cls", "concat")
    input_kind = "a table (TSV/CSV) or FASTA file of sequences, or a genome (FASTA, .2bit)"

    def looks_like(self, path: Path) -> bool | None:
        """A text file (a table or FASTA) or a ``.2bit`` genome: not HDF5, parquet or an
        image; a folder only when it holds FASTA / 2bit files (a genome corpus)."""
        if Path(path).is_dir():
            try:
                return bool(list_genome_files(path))
            except OSError:
                return None
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
        if is_genome_input(path, options.labels, MAX_CONTEXT):
            if options.labels:
                raise ConfigError(
                    f"--labels is for FASTA records read as samples; {path} is a .2bit genome"
                )
            return read_genome(
                path,
                info={
                    "window": int(options.window),
                    "window_stride": options.window_stride,
                    "regions": options.regions,
                },
            )
        survival = survival_options(options)
        if survival is not None:  # a time-to-event table: its time and event columns
            from healthfm.evaluate.survival import attach_survival

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
        ``max_length``: the power of two covering the longest training sequence (at most
        4096 tokens), or for a genome the tokens of one ``--window``."""
        return self.fit_corpus_tokenizer([(samples, train_idx)], options)

    def fit_corpus_tokenizer(
        self, parts: list[tuple[Samples, np.ndarray]], options: DnaOptions | dict[str, Any]
    ) -> KmerTokenizer:
        """One k-mer tokenizer for several sources (genomes and tables): ``max_length`` is
        the largest of the sources' (a genome's: the tokens of a window; a table's: the
        power of two covering its longest train sequence), at most 4096."""
        options = self.options(options)
        if not parts:
            raise ConfigError("no inputs to fit a tokenizer on")
        probe = KmerTokenizer(k=options.k, stride=options.stride, ambiguity=options.ambiguity)
        longest = 2
        for samples, train_idx in parts:
            if _is_genome(samples):
                window = int(samples.info.get("window", options.window))
                longest = max(longest, _window_tokens(probe, window))
                continue
            lengths = probe.tokenized_lengths(_sequence_lengths(samples, np.asarray(train_idx)))
            if len(lengths):
                longest = max(longest, next_power_of_two(int(lengths.max())))
        config = probe.config()
        config["max_length"] = min(longest, MAX_CONTEXT)
        config["reverse_complement"] = bool(options.reverse_complement)
        return KmerTokenizer.from_config(config)

    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """Tokenize the chosen samples in chunks of at most 65,536, in order (with the
        k-mer tokenizer or any other DNA tokenizer, e.g. a published model's)."""
        tokenizer = _dna(tokenizer)
        if _is_genome(samples):
            raise ConfigError(
                f"{samples.source} is a genome: its records are cut into windows (a genome "
                "store: DnaModality.tokenize, batch_source), not encoded as samples"
            )
        indices = np.arange(len(samples)) if indices is None else np.asarray(indices)
        for lo in range(0, len(indices), CHUNK_SIZE):
            idx = indices[lo : lo + CHUNK_SIZE]
            yield tokenizer.encode(samples.payload[idx], keys=samples.keys[idx].tolist())

    def check_input(self, samples: Samples, tokenizer: Tokenizer) -> None:
        """The k-mer vocabulary covers every valid sequence; a sequence longer than the
        context is said (a warning with the count): its vector describes its first tokens
        only. A published model's tokenizer checks its own coverage (``check_sequences``)."""
        import logging

        if _is_genome(samples):
            _dna(tokenizer)  # windows are cut to the context: nothing to warn about
            return
        check = getattr(_dna(tokenizer), "check_sequences", None)
        if check is not None:
            check(samples.payload, source=samples.source)
            return
        kmer = _kmer(tokenizer)
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

    def model_defaults(
        self, tokenizer: Tokenizer, samples: Samples, options: dict[str, Any]
    ) -> dict[str, Any]:
        """``max_len``: power of two covering the longest tokenized sample, at most 4096;
        for a genome, the tokens of one ``--window``."""
        if _is_genome(samples):
            window = int(samples.info.get("window", self.options(options).window))
            return {"max_len": _window_tokens(_kmer(tokenizer), window)}
        lengths = _kmer(tokenizer).tokenized_lengths(_sequence_lengths(samples))
        longest = int(lengths.max()) if len(lengths) else 1
        return {"max_len": min(next_power_of_two(longest), MAX_CONTEXT)}

    # ------------------------------------------------------------------ genomes
    def tokenize(
        self,
        tokenizer: Tokenizer,
        samples: Samples,
        out: str | Path,
        indices: np.ndarray | None = None,
    ) -> Any:
        """A token store of the samples; for a genome, its genome store (the bases of the
        chosen records, N gaps left out: any DNA tokenizer reads it, window by window)."""
        if not _is_genome(samples):
            return super().tokenize(tokenizer, samples, out, indices)
        return write_genome_store(samples.payload, out, samples.data_hash, records=indices)

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


register_modality(DnaModality())
