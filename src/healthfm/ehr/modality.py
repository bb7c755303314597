"""The EHR modality: MEDS 0.4 timelines, causal next-event pretraining, EHRSHOT evaluation.

* ``read`` opens a MEDS folder and validates every shard (one at a time); samples are
  subjects (one token sequence per subject in the token store).
* splits come from ``metadata/subject_splits.parquet``: ``train`` → train,
  ``tuning`` → val (held-out pretraining loss), ``held_out`` → test; subjects missing
  from that file fall back to the group-hash split.
* pretraining is causal next-event prediction (CLMBR / ETHOS style), truncating long
  histories to their most recent tokens.
* ``healthfm embed`` / ``healthfm evaluate`` need ``--labels`` (a MEDS label file): one
  embedding per label row from exactly the events up to its prediction time, and the
  EHRSHOT few-shot protocol next to count baselines (see :mod:`healthfm.ehr.evaluation`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from healthfm.ehr.options import EhrOptions
from healthfm.ehr.reader import MEDS_SPLITS, Labels, MedsDataset, open_meds, read_labels, scan_meds
from healthfm.ehr.tokenizer import DEFAULT_GAP_DAYS, MedsTokenizer
from healthfm.errors import ConfigError, DataError
from healthfm.modality import (
    Embedding,
    EvaluationRows,
    Features,
    Modality,
    Samples,
    TaskRule,
    assign_splits,
    next_power_of_two,
    register_modality,
)
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

#: Context length bounds proposed by :meth:`EhrModality.model_defaults`.
MIN_CONTEXT, MAX_CONTEXT = 64, 1024


def _data_hash(ds: MedsDataset) -> str:
    # Content hash of the shards and metadata, streamed file by file.
    h = hashlib.sha256()
    files = (
        [*ds.shards, *sorted((ds.root / "metadata").glob("*"))]
        if (ds.root / "metadata").is_dir()
        else ds.shards
    )
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ds.root)).encode())
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


@dataclass
class LabelRowsInfo:
    """What EHR keeps of its evaluation rows (``EvaluationRows.info``).

    Attributes
    ----------
    labels
        The label rows of ``--labels``, one per evaluation row, at their prediction times.
    boolean_like
        Whether the label column is boolean (or 0/1): predictions are written as one
        probability.
    row_splits
        ``row_splits(salt, fractions) -> (MEDS split name per label row, split per
        subject)`` under another split (a fine-tuned model's).
    salt, fractions
        The evaluation's split.
    features_by_vocabulary
        The featurized label rows of each tokenizer (by its hash) that embedded them: the
        count baselines count the codes of one vocabulary, whatever the model order.
    seconds_embed, seconds_featurize
        Wall time of the last model's embedding pass (for labels-per-second in the rows).
    """

    labels: Labels
    boolean_like: bool
    row_splits: Callable[[str, Any], tuple[np.ndarray, np.ndarray]]
    salt: str
    fractions: tuple[float, float, float]
    features_by_vocabulary: dict[str, Any] = field(default_factory=dict)
    seconds_embed: float | None = None
    seconds_featurize: float | None = None


def _labels(options: EhrOptions, samples: Samples) -> Labels:
    """The label rows of ``--labels`` (a ``ConfigError`` without it)."""
    if not options.labels:
        raise ConfigError("ehr embed / evaluate need --labels LABELS.parquet (MEDS label schema)")
    return read_labels(
        options.labels, samples.payload["subjects"], options.label_column, options.task_type
    )


def _featurize(
    modality: EhrModality,
    encoder: Any,
    samples: Samples,
    rows: EvaluationRows,
    pooling: str | None,
    batch_size: int,
) -> Any:
    # One pass over the labelled subjects gives the embeddings and the count features.
    from healthfm.ehr.embed import featurize_labels

    if encoder is not None:
        tokenizer = encoder.tokenizer
    else:  # the baselines alone: a tokenizer fitted on the train subjects
        _, of_subject = rows.info.row_splits(rows.info.salt, rows.info.fractions)
        tokenizer = modality.fit_tokenizer(
            samples, np.flatnonzero(of_subject == "train"), rows.options
        )
    feats = featurize_labels(
        samples.payload["dataset"],
        tokenizer,
        rows.info.labels,
        encoder,
        pooling or (encoder.pooling if encoder is not None else "last"),
        batch_size,
    )
    # Kept by vocabulary: the count baseline reuses a model's pass only when every model
    # embedded so far shares one vocabulary (see EhrModality.baseline_features).
    # (A new dict, not an update in place: the untrained control restores rows.info from a
    # shallow copy.)
    rows.info.features_by_vocabulary = {**rows.info.features_by_vocabulary, tokenizer.hash: feats}
    rows.info.seconds_embed = feats.seconds_embed
    rows.info.seconds_featurize = feats.seconds_total
    return feats


def _count_pass(modality: EhrModality, samples: Samples, rows: EvaluationRows) -> Any:
    """The featurized label rows the count baselines count the codes of.

    The models' own pass when every model embedded shares one vocabulary (one model: its
    tokenizer, as its embeddings were computed with); with no model, or models of different
    vocabularies, a tokenizer fitted on the train subjects, so that the baselines never
    depend on which model was embedded last (``--model A --model B`` and ``--model B
    --model A`` give the same baseline rows).
    """
    by_vocabulary = rows.info.features_by_vocabulary
    if len(by_vocabulary) == 1:
        return next(iter(by_vocabulary.values()))
    return _featurize(modality, None, samples, rows, None, 32)


class EhrEmbedding(Embedding):
    """EHR embedding: one vector per label row of ``--labels``, from exactly the events up to its prediction time (the rows at prediction times)."""

    modality: EhrModality

    def prepare(self, encoder: Any, samples: Samples, options: EhrOptions) -> None:
        """Read ``--labels`` (kept in ``samples.info["labels"]``): one vector per label row."""
        samples.info["labels"] = _labels(self.modality.options(options), samples)

    def n_rows(self, samples: Samples, options: EhrOptions) -> int:
        """The label rows (sorted by subject and prediction time, so a part's rows are a
        few whole subjects)."""
        return len(samples.info["labels"])

    def tokenize_part(
        self,
        encoder: Any,
        samples: Samples,
        indices: np.ndarray,
        options: EhrOptions,
        workdir: Path,
    ) -> Labels:
        """The part's label rows; their subjects are tokenized as they are embedded."""
        labels: Labels = samples.info["labels"]
        return Labels(labels.source, labels.frame[np.asarray(indices)], labels.column)

    def embed_part(
        self,
        encoder: Any,
        samples: Samples,
        part: Labels,
        options: EhrOptions,
        pooling: str | None,
        batch_size: int,
        bf16: bool = False,
        compile: bool = False,
    ) -> np.ndarray:
        """One embedding per label row of the part, from exactly the events up to its
        prediction time (:func:`healthfm.ehr.embed.featurize_labels`). ``compile`` is not
        applied: the packed one-pass rows vary in layout from batch to batch."""
        import torch

        from healthfm.ehr.embed import featurize_labels

        device = next(encoder.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            feats = featurize_labels(
                samples.payload["dataset"],
                encoder.tokenizer,
                part,
                encoder,
                pooling or encoder.pooling,
                batch_size=batch_size,
            )
        return feats.embeddings

    def write(
        self,
        out: Path,
        samples: Samples,
        embeddings: np.ndarray,
        attrs: dict[str, Any],
        options: EhrOptions,
    ) -> Path:
        """Parquet: subject_id, prediction_time, embedding, and the label column (streamed
        in row blocks)."""
        import pyarrow as pa

        from healthfm.inference import embedding_array, write_table_blocks

        if Path(out).suffix != ".parquet":
            raise ConfigError(f"ehr embeddings are written as .parquet, not {Path(out).suffix!r}")
        labels: Labels = samples.info["labels"]
        frame = labels.frame.select(
            "subject_id", "prediction_time", "label", *(["event"] if labels.survival else [])
        )

        def block(start: int, stop: int) -> pa.Table:
            rows = frame.slice(start, stop - start)
            table = rows.select("subject_id", "prediction_time").to_arrow()
            table = table.append_column("embedding", embedding_array(embeddings[start:stop]))
            table = table.append_column(labels.column, rows["label"].to_arrow())
            if labels.survival:  # the event indicator beside the time
                table = table.append_column("boolean_value", rows["event"].to_arrow())
            return table

        return write_table_blocks(out, len(frame), block)

    def embed_rows(
        self,
        encoder: Any,
        samples: Samples,
        rows: EvaluationRows,
        pooling: str | None,
        batch_size: int,
    ) -> np.ndarray:
        """Embeddings at each label's prediction time (the count features come in the same pass)."""
        return _featurize(self.modality, encoder, samples, rows, pooling, batch_size).embeddings


class EhrModality(Modality):
    """Electronic health records in MEDS 0.4."""

    name = "ehr"
    embedding_class = EhrEmbedding
    options_class = EhrOptions
    input_kind = "a MEDS folder (data/*.parquet, metadata/)"

    def looks_like(self, path: Path) -> bool | None:
        """A folder with ``data/`` parquet shards or ``metadata/codes.parquet``."""
        path = Path(path)
        if not path.is_dir():
            return False
        return (path / "metadata" / "codes.parquet").is_file() or any(
            (path / "data").glob("**/*.parquet")
        )

    objective = "causal"
    default_pooling = "last"
    #: Prediction-time embeddings read the state at the cut-off, or the mean up to it.
    poolings = ("last", "mean")
    #: Causal models keep the most recent history when a subject is longer than the context.
    truncate = "tail"
    embedding_method = "{preset}-causal-{pooling}+{probe}"

    # ------------------------------------------------------------------ reading
    def read(self, path: str | Path, options: EhrOptions) -> Samples:
        """Open and validate a MEDS folder; samples are its subjects."""
        options = self.options(options)
        ds = open_meds(path, strict_codes=options.strict_codes)
        subjects = scan_meds(ds)
        keys = subjects["subject_id"].to_numpy()
        return Samples(
            source=Path(path),
            keys=keys,
            groups=keys,
            labels=None,
            payload={"dataset": ds, "subjects": subjects},
            data_hash=_data_hash(ds),
            info={
                "n_events": int(subjects["n_events"].sum()),
                "n_shards": len(ds.shards),
            },
        )

    def split_source(self, samples: Samples) -> dict[str, Any]:
        """``metadata/subject_splits.parquet`` (with its SHA-256) when the folder has one."""
        ds: MedsDataset = samples.payload["dataset"]
        path = ds.root / "metadata" / "subject_splits.parquet"
        if not ds.splits or not path.is_file():
            return {"source": "hash"}
        from healthfm.fsutil import sha256_file

        return {"source": "metadata/subject_splits.parquet", "sha256": sha256_file(path)}

    def split(
        self, samples: Samples, salt: str, fractions: tuple[float, float, float]
    ) -> np.ndarray:
        """MEDS splits (train / tuning / held_out → train / val / test); hash split for the rest."""
        ds: MedsDataset = samples.payload["dataset"]
        fallback = assign_splits(samples.groups, fractions, salt)
        if not ds.splits:
            return fallback
        meds = np.array([ds.splits.get(int(k), "") for k in samples.keys], dtype=object)
        unknown = sorted({s for s in meds if s and s not in MEDS_SPLITS})
        if unknown:
            raise DataError(
                f"unknown split names {unknown} (MEDS: train, tuning, held_out)",
                file=ds.root / "metadata" / "subject_splits.parquet",
                column="split",
            )
        mapped = np.array([MEDS_SPLITS.get(s, "") for s in meds], dtype=object)
        return np.where(mapped == "", fallback, mapped).astype(str)

    def fit_tokenizer(
        self, samples: Samples, train_idx: np.ndarray, options: EhrOptions
    ) -> Tokenizer:
        """Fit the MEDS tokenizer on the train subjects only."""
        options = self.options(options)
        return MedsTokenizer.fit(
            samples.payload["dataset"],
            samples.keys[train_idx],
            min_count=options.min_count,
            max_codes=options.max_codes,
            n_bins=options.n_bins,
            min_text_count=options.min_text_count,
            gap_days=() if options.no_gap_tokens else DEFAULT_GAP_DAYS,
        )

    def fit_corpus_tokenizer(
        self, parts: list[tuple[Samples, np.ndarray]], options: EhrOptions
    ) -> Tokenizer:
        """One MEDS tokenizer over several MEDS roots: codes counted over every root's train
        subjects (each root split by its own ``subject_splits.parquet``)."""
        options = self.options(options)
        return MedsTokenizer.fit(
            [(samples.payload["dataset"], samples.keys[idx]) for samples, idx in parts],
            min_count=options.min_count,
            max_codes=options.max_codes,
            n_bins=options.n_bins,
            min_text_count=options.min_text_count,
            gap_days=() if options.no_gap_tokens else DEFAULT_GAP_DAYS,
        )

    def encode(
        self, tokenizer: Tokenizer, samples: Samples, indices: np.ndarray | None = None
    ) -> Iterator[TokenChunk]:
        """One sample per subject; chunks follow the data (shard) order, which is the order
        of ``samples.keys``; unsorted ``indices`` are gathered and reordered."""
        assert isinstance(tokenizer, MedsTokenizer)
        ds: MedsDataset = samples.payload["dataset"]
        chosen = samples.keys if indices is None else samples.keys[np.asarray(indices)]
        if indices is None or np.all(np.diff(np.asarray(indices)) > 0):
            for enc in tokenizer.encode_dataset(ds, chosen):
                yield enc.chunk()
            return
        encs = [enc.chunk() for enc in tokenizer.encode_dataset(ds, chosen)]
        yield _reorder(encs, chosen)

    def model_defaults(
        self, tokenizer: Tokenizer, samples: Samples, options: EhrOptions
    ) -> dict[str, Any]:
        """Continuous age input on; context ``--max-len``, else from the 95th percentile of
        events per subject."""
        options = self.options(options)
        if options.max_len:
            return {"use_times": True, "max_len": int(options.max_len)}
        n = samples.payload["subjects"]["n_events"].to_numpy()
        want = int(np.quantile(n, 0.95) * 1.3) + 2  # + gap tokens and [CLS]
        ctx = int(min(MAX_CONTEXT, max(MIN_CONTEXT, next_power_of_two(want))))
        return {"use_times": True, "max_len": ctx}

    # ------------------------------------------------------------------ rows at prediction times
    def evaluation_rows(
        self,
        samples: Samples,
        options: EhrOptions,
        salt: str,
        fractions: tuple[float, float, float],
        task_rule: TaskRule,
    ) -> EvaluationRows:
        """One row per label of ``--labels``; each takes its subject's MEDS split
        (train / tuning / held_out → train / val / test). A regression when the fine-tuned
        models are, or when the labels hold many distinct numbers (integer lab-value bins
        and boolean outcomes stay classes, as in EHRSHOT)."""
        from healthfm.ehr.evaluation import meds_split_names
        from healthfm.ehr.finetune import label_values, subject_positions

        labels = _labels(self.options(options), samples)
        values = label_values(labels)
        task_type = self.options(options).task_type
        regression = not labels.survival and (
            task_type == "regression"
            if task_type in ("classification", "regression") and not task_rule.finetuned
            else task_rule.regression(values, False)
        )
        event = None
        if labels.survival:  # y: days to the event or to censoring; event: observed
            y = np.asarray(values, dtype=np.float64)
            event = labels.frame["event"].to_numpy().astype(bool)
            classes, boolean_like = np.array([]), False
        elif regression:
            try:
                y = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise DataError(
                    f"the fine-tuned models are regressions but {labels.column} is not numeric",
                    file=labels.source,
                    column=labels.column,
                ) from exc
            classes, boolean_like = np.array([]), False
        else:
            classes, y = np.unique(values, return_inverse=True)
            y = y.reshape(-1)
            boolean_like = labels.frame["label"].dtype == pl.Boolean or set(classes.tolist()) <= {
                0,
                1,
            }
        where = subject_positions(samples, labels.subject_ids)

        def row_splits(split_salt: str, split_fractions) -> tuple[np.ndarray, np.ndarray]:
            # The MEDS split name of every label row, and the split of every subject.
            of_subject = np.asarray(self.split(samples, split_salt, tuple(split_fractions)))
            return meds_split_names(of_subject)[where], of_subject

        split = np.asarray(self.split(samples, salt, tuple(fractions))).astype(str)[where]
        return EvaluationRows(
            task=_task_name(Path(str(self.options(options).labels))),
            groups=labels.subject_ids,
            y=y,
            classes=classes,
            regression=regression,
            split=split,
            data_hash=samples.data_hash,
            survival=labels.survival,
            event=event,
            options=options,
            info=LabelRowsInfo(labels, boolean_like, row_splits, salt, tuple(fractions)),
        )

    def evaluation_protocol(self, options: EhrOptions) -> Any:
        """The EHRSHOT few-shot protocol (``--few-shot``)."""
        from healthfm.ehr.evaluation import EhrshotProtocol

        return EhrshotProtocol(self.options(options).few_shot)

    def baseline_features(self, samples: Samples, rows: EvaluationRows) -> dict[str, Features]:
        """log(1 + count) of every token up to the prediction time, plus the age then,
        under the linear probe and under gradient-boosted trees."""
        import time

        from healthfm.ehr.baselines import baseline_probes, count_features
        from healthfm.ehr.tabular import meds_tab_features

        feats = _count_pass(self, samples, rows)
        counts = count_features(feats)
        out = {
            name: Features(counts, baseline=True, probe=probe)
            for name, probe in baseline_probes(rows.regression).items()
        }
        # MEDS-Tab's recipe (windowed counts and value aggregates, static codes, age) under
        # boosted trees; its code vocabulary is fitted on the train subjects.
        t = time.perf_counter()
        _, of_subject = rows.info.row_splits(rows.info.salt, rows.info.fractions)
        train_subjects = samples.keys[np.asarray(of_subject) == "train"]
        X, vocab = meds_tab_features(samples.payload["dataset"], rows.info.labels, train_subjects)
        out["meds-tab+gbm"] = Features(
            X,
            baseline=True,
            probe="gbm",
            extra={"n_features": X.shape[1], "windows_days": [w or "all" for w in vocab.windows]},
            seconds=time.perf_counter() - t,
        )
        return out

    def task_input(
        self,
        samples: Samples,
        options: EhrOptions,
        model: Any,
        salt: str,
        fractions: tuple[float, float, float],
    ) -> Any:
        """Fine-tuning rows: one per label of ``--labels``, holding exactly the events up to
        its prediction time (see :mod:`healthfm.ehr.finetune`); splits are the subjects'
        MEDS splits (train / tuning / held_out → train / val / test)."""
        from healthfm.ehr.finetune import ehr_task_input

        labels = _labels(self.options(options), samples)
        return ehr_task_input(samples, model, labels, self.split(samples, salt, fractions))

    def demo_spec(self, quick: bool) -> Any:
        """Pretrain on the bundled clinosim MEDS population, then the EHRSHOT protocol."""
        from healthfm.ehr.demo import demo_spec

        return demo_spec(quick)


def _reorder(chunks: list[TokenChunk], order_keys: np.ndarray) -> TokenChunk:
    keys = np.concatenate([np.asarray(c.keys, dtype=np.int64) for c in chunks])
    offs, ids, times = [], [], []
    base = 0
    for c in chunks:
        offs.append(c.offsets[:-1] + base)
        base += len(c.ids)
        ids.append(c.ids)
        times.append(c.times)
    starts = np.concatenate(offs)
    flat_ids, flat_t = np.concatenate(ids), np.concatenate(times)
    ends = np.r_[starts[1:], len(flat_ids)]
    where = {int(k): i for i, k in enumerate(keys)}
    pick = np.array([where[int(k)] for k in order_keys])
    lengths = (ends - starts)[pick]
    idx = (
        np.concatenate([np.arange(starts[p], ends[p]) for p in pick])
        if len(pick)
        else np.zeros(0, np.int64)
    )
    return TokenChunk(
        ids=flat_ids[idx],
        offsets=np.r_[0, np.cumsum(lengths)],
        keys=[int(k) for k in order_keys],
        times=flat_t[idx],
    )


def _task_name(path: Path) -> str:
    # MEDS task folders hold generic file names (labels.parquet, 0.parquet): use the folder.
    if path.is_dir():
        return path.name
    return (
        path.parent.name
        if path.stem in ("labels", "0", "data") or path.stem.isdigit()
        else path.stem
    )


register_modality(EhrModality())
