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
  EHRSHOT few-shot protocol next to count baselines (see :mod:`healthfm.ehr.evaluate`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from healthfm.ehr.reader import MEDS_SPLITS, Labels, MedsDataset, open_meds, read_labels, scan_meds
from healthfm.ehr.tokenizer import DEFAULT_GAP_DAYS, MedsTokenizer
from healthfm.errors import ConfigError, DataError
from healthfm.modality import Modality, Samples, assign_splits, register_modality
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenChunk

__all__ = [
    "FEW_SHOT_KS",
    "EhrModality",
    "LabelFeatures",
    "Labels",
    "MedsDataset",
    "MedsTokenizer",
    "count_features",
    "embed_cutoffs",
    "featurize_labels",
    "label_cutoffs",
    "open_meds",
    "read_labels",
    "scan_meds",
]

# torch (embed) and scikit-learn (evaluate) load on first use, so that reading and tokenizing
# MEDS stays light (the tokenizer benchmark measures its memory).
_LAZY = {
    "LabelFeatures": "healthfm.ehr.embed",
    "count_features": "healthfm.ehr.embed",
    "embed_cutoffs": "healthfm.ehr.embed",
    "featurize_labels": "healthfm.ehr.embed",
    "label_cutoffs": "healthfm.ehr.embed",
    "FEW_SHOT_KS": "healthfm.ehr.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'healthfm.ehr' has no attribute {name!r}")


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


class EhrModality(Modality):
    """Electronic health records in MEDS 0.4."""

    name = "ehr"
    objective = "causal"
    default_pooling = "last"
    #: Causal models keep the most recent history when a subject is longer than the context.
    truncate = "tail"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add MEDS reader, tokenizer and evaluation options."""
        g = parser  # the CLI passes an argument group already ("ehr input options")
        g.add_argument(
            "--labels",
            default=None,
            help="MEDS label parquet file (or folder) for embed / evaluate",
        )
        g.add_argument(
            "--label-column",
            default=None,
            help="label column (default: the one of boolean_value/integer_value/... holding values)",
        )
        g.add_argument(
            "--few-shot",
            nargs="+",
            default=None,
            help="few-shot k values, integers and/or 'all' (default: 1 2 4 8 16 32 64 128 all)",
        )
        g.add_argument(
            "--min-count", type=int, default=5, help="minimum train count of a code to get a token"
        )
        g.add_argument(
            "--max-codes", type=int, default=None, help="keep only the N most frequent codes"
        )
        g.add_argument(
            "--n-bins", type=int, default=10, help="quantile bins per numeric code (10 = deciles)"
        )
        g.add_argument(
            "--min-text-count",
            type=int,
            default=20,
            help="minimum train count of a text value token",
        )
        g.add_argument("--no-gap-tokens", action="store_true", help="no [GAP] interval tokens")
        g.add_argument(
            "--max-len", type=int, default=None, help="context length (default: from the data)"
        )
        g.add_argument(
            "--strict-codes",
            action="store_true",
            help="error if the data use codes missing from metadata/codes.parquet",
        )

    # ------------------------------------------------------------------ reading
    def read(self, path: str | Path, options: dict[str, Any]) -> Samples:
        """Open and validate a MEDS folder; samples are its subjects."""
        ds = open_meds(path, strict_codes=bool(options.get("strict_codes")))
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
                "max_len": options.get("max_len"),
            },
        )

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

    def fit_tokenizer(self, samples: Samples, train_idx: np.ndarray, options: dict) -> Tokenizer:
        """Fit the MEDS tokenizer on the train subjects only."""
        return MedsTokenizer.fit(
            samples.payload["dataset"],
            samples.keys[train_idx],
            min_count=int(options.get("min_count", 5)),
            max_codes=options.get("max_codes"),
            n_bins=int(options.get("n_bins", 10)),
            min_text_count=int(options.get("min_text_count", 20)),
            gap_days=() if options.get("no_gap_tokens") else DEFAULT_GAP_DAYS,
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

    def model_defaults(self, tokenizer: Tokenizer, samples: Samples) -> dict[str, Any]:
        """Continuous age input on; context from the 95th percentile of events per subject."""
        if samples.info.get("max_len"):
            return {"use_times": True, "max_len": int(samples.info["max_len"])}
        n = samples.payload["subjects"]["n_events"].to_numpy()
        want = int(np.quantile(n, 0.95) * 1.3) + 2  # + gap tokens and [CLS]
        ctx = int(min(MAX_CONTEXT, max(MIN_CONTEXT, 1 << max(want - 1, 1).bit_length())))
        return {"use_times": True, "max_len": ctx}

    # ------------------------------------------------------------------ embed / evaluate
    def _labels(self, options: dict, samples: Samples) -> Labels:
        if not options.get("labels"):
            raise ConfigError(
                "ehr embed / evaluate need --labels LABELS.parquet (MEDS label schema)"
            )
        return read_labels(
            options["labels"], samples.payload["subjects"], options.get("label_column")
        )

    def embed_command(
        self, model: Any, input_path: Path, out: Path, options: dict, **kwargs: Any
    ) -> Path | None:
        """One embedding per label row (subject_id, prediction_time, embedding) as parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from healthfm.ehr.embed import featurize_labels
        from healthfm.fsutil import atomic_write_bytes

        samples = self.read(input_path, options)
        labels = self._labels(options, samples)
        pooling = kwargs.get("pooling") or "last"
        feats = featurize_labels(
            samples.payload["dataset"],
            model.tokenizer,
            labels,
            model,
            pooling,
            batch_size=int(kwargs.get("batch_size") or 32),
        )
        if Path(out).suffix != ".parquet":
            raise ConfigError(f"ehr embeddings are written as .parquet, not {Path(out).suffix!r}")
        d = feats.embeddings.shape[1]
        table = labels.frame.select("subject_id", "prediction_time").to_arrow()
        table = table.append_column(
            "embedding",
            pa.FixedSizeListArray.from_arrays(
                pa.array(feats.embeddings.reshape(-1), type=pa.float32()), d
            ),
        )
        table = table.append_column(labels.column, labels.frame["label"].to_arrow())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(out, sink.getvalue().to_pybytes())
        return Path(out)

    def evaluate_command(
        self, model_dir: Path | None, input_path: Path, out_dir: Path, options: dict, **kwargs: Any
    ) -> list | None:
        """EHRSHOT protocol; writes results.json, predictions/*.parquet and few_shot_auroc.png."""
        seeds = list(kwargs.get("seeds") or [])
        if seeds == [0, 1, 2]:  # the shared CLI default: EHRSHOT's protocol uses five seeds
            seeds = [0, 1, 2, 3, 4]
        return evaluate_ehrshot(
            model_dir,
            input_path,
            out_dir,
            options,
            seeds=seeds,
            n_boot=int(kwargs.get("n_boot") or 1000),
            pooling=kwargs.get("pooling"),
            batch_size=int(kwargs.get("batch_size") or 32),
            include_baselines=kwargs.get("include_baselines", True),
            echo=kwargs.get("echo", True),
            finetuned=kwargs.get("finetuned") or (),
            salt=kwargs.get("salt") or "healthfm",
            fractions=tuple(kwargs.get("fractions") or (0.7, 0.1, 0.2)),
        )

    def task_input(
        self,
        samples: Samples,
        options: dict,
        model: Any,
        salt: str,
        fractions: tuple[float, float, float],
    ) -> Any:
        """Fine-tuning rows: one per label of ``--labels``, holding exactly the events up to
        its prediction time (see :mod:`healthfm.ehr.finetune`); splits are the subjects'
        MEDS splits (train / tuning / held_out → train / val / test)."""
        from healthfm.ehr.finetune import ehr_task_input

        labels = self._labels(options, samples)
        return ehr_task_input(samples, model, labels, self.split(samples, salt, fractions))

    def run_demo(self, out: Path, quick: bool) -> Any:
        """Pretrain on the bundled synthetic MEDS population and run the EHRSHOT protocol."""
        from healthfm.ehr.demo import run_ehr_demo

        return run_ehr_demo(out, quick)


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


def _check_split(model_dir, split: np.ndarray, evaluation: tuple, row_splits) -> Any:
    """``model_dir``, after checking that its fine-tuning never trained on a held-out row."""
    from healthfm.pipeline import _training_info

    info = _training_info(Path(model_dir))
    salt, fractions = info.get("split_salt"), info.get("split_fractions")
    if salt is None or fractions is None:
        return model_dir
    if (salt, tuple(fractions)) == (evaluation[0], tuple(evaluation[1])):
        return model_dir
    its_split, _ = row_splits(salt, fractions)
    leaked = (split == "held_out") & (its_split != "held_out")
    if leaked.any():
        raise ConfigError(
            f"{model_dir} was fine-tuned with split salt {salt!r} and fractions {fractions}, "
            f"which put {int(leaked.sum())} of this evaluation's held-out rows in its train or "
            f"tuning split; evaluate with --split-salt {salt}",
            file=Path(model_dir),
            column="split_salt",
        )
    return model_dir


def evaluate_ehrshot(
    model_dir: str | Path | None,
    input_path: str | Path,
    out_dir: str | Path,
    options: dict,
    seeds: list[int] | None = None,
    n_boot: int = 1000,
    pooling: str | None = None,
    batch_size: int = 32,
    include_baselines: bool = True,
    echo: bool = True,
    finetuned=(),
    salt: str = "healthfm",
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> list:
    """The EHRSHOT evaluation of a model (or of the baselines alone) on a MEDS label file.

    ``finetuned``: fine-tuned EHR model / LoRA adapter folders whose own predictions on the
    held-out rows are scored next to the probe and the baselines (a fine-tuned
    ``model_dir`` adds its own), at their few-shot k. ``salt`` / ``fractions``: the split of
    subjects missing from ``subject_splits.parquet`` (the model's, through ``healthfm
    evaluate``); a fine-tuned model trained on any held-out row is refused.

    Writes ``results.json`` (core schema), ``predictions/<method>.parquet``
    (meds-evaluation schema, held-out rows, largest k), ``few_shot_auroc.png`` and
    ``table.txt`` into ``out_dir``.
    """
    from healthfm import __version__
    from healthfm.ehr.embed import featurize_labels
    from healthfm.ehr.evaluate import (
        format_ehrshot_table,
        parse_few_shot,
        plot_few_shot,
        run_protocol,
        write_predictions,
    )
    from healthfm.evaluate.metrics import REGRESSION_METRICS
    from healthfm.evaluate.results import format_table, write_results
    from healthfm.fsutil import atomic_write_text
    from healthfm.pipeline import finetuned_folders, load_for

    t0 = time.perf_counter()
    modality = EhrModality()
    out_dir = Path(out_dir)
    seeds = list(seeds) if seeds else [0, 1, 2, 3, 4]
    ks = parse_few_shot(options.get("few_shot"))
    samples = modality.read(input_path, options)
    labels = modality._labels(options, samples)
    y_raw = labels.frame["label"]
    from healthfm.ehr.finetune import label_values, subject_positions
    from healthfm.evaluate.finetune import evaluation_is_regression

    # The rule finetune uses (more than 20 distinct numbers → regression; integer lab-value
    # bins and boolean outcomes stay classes, as in EHRSHOT), or the fine-tuned models' task.
    model = None
    if model_dir is not None:
        model, _ = load_for("ehr", model_dir)
    ft_dirs = finetuned_folders(finetuned, model_dir, model)
    regression = evaluation_is_regression(label_values(labels), ft_dirs)
    if regression:
        if options.get("few_shot") is None:
            ks = ["all"]
        try:
            y = np.asarray(label_values(labels), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"the fine-tuned models are regressions but {labels.column} is not numeric",
                file=labels.source,
                column=labels.column,
            ) from exc
        classes = np.array([])
        boolean_like = False
    else:
        classes, y = np.unique(label_values(labels), return_inverse=True)
        y = y.reshape(-1)
        boolean_like = y_raw.dtype == pl.Boolean or set(classes.tolist()) <= {0, 1}

    def row_splits(split_salt: str, split_fractions) -> tuple[np.ndarray, np.ndarray]:
        # MEDS split name of every label row, and the split of every subject.
        of_subject = np.asarray(modality.split(samples, split_salt, tuple(split_fractions)))
        where = subject_positions(samples, labels.subject_ids)
        meds = {"train": "train", "val": "tuning", "test": "held_out"}
        return np.array([meds[x] for x in of_subject.astype(str)])[where], of_subject

    split, split_of = row_splits(salt, fractions)
    if model is None and not include_baselines and not finetuned:
        raise ConfigError("nothing to evaluate: no model, no --finetuned and --no-baselines")
    tokenizer = (
        model.tokenizer
        if model is not None
        else modality.fit_tokenizer(samples, np.flatnonzero(split_of == "train"), options)
    )
    pool = pooling or "last"
    feats = featurize_labels(samples.payload["dataset"], tokenizer, labels, model, pool, batch_size)
    counts = np.log1p(feats.counts.toarray())
    counts = np.column_stack([counts, np.nan_to_num(feats.age_years, nan=-1.0)]).astype(np.float32)
    features: dict[str, tuple[np.ndarray, bool, str]] = {}
    linear = "ridge" if regression else "logreg"
    if model is not None:
        name = f"{model.config.preset or 'model'}-causal-{pool}+{linear}"
        features[name] = (feats.embeddings, False, "linear")
    if include_baselines:
        features[f"counts+{linear}"] = (counts, True, "linear")
        features["counts+gbm"] = (counts, True, "gbm")
    task = _task_name(Path(str(options["labels"])))
    rows, final = run_protocol(
        features,
        y,
        split,
        labels.subject_ids,
        task,
        ks,
        seeds,
        n_boot,
        data_hash=samples.data_hash,
        model_hash=getattr(model, "model_hash", None),
        version=__version__,
        regression=regression,
    )
    for r in rows:
        r.extra["labels_per_s_embed"] = (
            (len(labels) / feats.seconds_embed) if feats.seconds_embed else None
        )
    if ft_dirs:
        from healthfm.ehr.evaluate import metrics_for
        from healthfm.ehr.finetune import finetuned_ehr_rows

        ft_rows, ft_final = finetuned_ehr_rows(
            [_check_split(d, split, (salt, fractions), row_splits) for d in ft_dirs],
            samples.payload["dataset"],
            labels,
            y,
            classes,
            split,
            task,
            list(REGRESSION_METRICS) if regression else list(metrics_for(len(classes))),
            n_boot,
            batch_size,
            samples.data_hash,
        )
        rows += ft_rows
        final.update(ft_final)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir / "results.json", rows)
    te = np.flatnonzero(split == "held_out")
    held = labels.frame[te]
    for method, p in final.items():
        if not boolean_like and not regression and p.ndim == 1:  # two non-boolean classes
            p = np.stack([1.0 - p, p], axis=1)
        write_predictions(
            out_dir / "predictions" / f"{method.replace('+', '_')}.parquet",
            held,
            p,
            classes=classes,
            column=labels.column,
            regression=regression,
        )
    plot = None
    if regression:  # no few-shot curve: one k
        table = format_table([r.to_dict() for r in rows], list(REGRESSION_METRICS))
    else:
        plot = plot_few_shot(rows, out_dir / "few_shot_auroc.png", task)
        table = format_ehrshot_table(rows, task)
    atomic_write_text(out_dir / "table.txt", table)
    atomic_write_text(
        out_dir / "run_info.json",
        json.dumps(
            {
                "n_labels": len(labels),
                "n_held_out": len(te),
                "seeds": seeds,
                "ks": ks,
                "n_boot": n_boot,
                "embed_seconds": feats.seconds_embed,
                "featurize_seconds": feats.seconds_total,
                "total_seconds": time.perf_counter() - t0,
            },
            indent=2,
            default=str,
        )
        + "\n",
    )
    if echo:
        print(table, end="")
        print(f"wrote {out_dir / 'results.json'}" + (f", {plot}" if plot else ""))
    return rows


register_modality(EhrModality())
