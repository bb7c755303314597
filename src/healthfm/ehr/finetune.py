"""Fine-tuning rows for EHR: one row per label, holding exactly its prediction-time window.

A fine-tuned EHR model must obey the same contract as its embeddings: the prediction for a
label row ``(subject_id, prediction_time)`` depends only on the subject's events with
``time <= prediction_time``. Each label row is therefore the token window that
:func:`healthfm.ehr.embed.embed_cutoffs` reads (the cut-off from
:func:`~healthfm.ehr.embed.label_cutoffs`, the window start from
:func:`~healthfm.ehr.embed.window_start`): the task head sees the causal state of the
last token of that window (``last`` pooling), which is the prediction-time embedding that
``healthfm embed`` writes. Nothing after the cut-off is ever put in a batch, so neither
training nor prediction can see the future, whatever the model.

Rows are built once, batch by batch of whole subjects
(:func:`~healthfm.ehr.reader.iter_batches`); the token windows of all labelled subjects are kept
as flat arrays (int32 ids, float64 ages).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from healthfm.ehr.embed import label_cutoffs, window_start
from healthfm.ehr.reader import Labels, MedsDataset, iter_batches
from healthfm.ehr.tokenizer import MedsTokenizer
from healthfm.errors import ConfigError, DataError
from healthfm.modality import Samples, TaskInput
from healthfm.tokenizer import PAD_ID

__all__ = [
    "LabelWindows",
    "ehr_task_input",
    "finetuned_ehr_rows",
    "label_values",
    "label_windows",
]


@dataclass
class LabelWindows:
    """A batch source over label rows: row ``i`` is ``ids[starts[i] : starts[i] + lengths[i]]``.

    ``batch(indices)`` returns right-padded ``ids``, ``attention_mask`` and (when the
    model uses them) ``times`` (age in days) — the dict the trainer and the task head read.

    With ``shared`` (the default), rows that start at the same token (one subject's labels
    in one context window) share one sequence, as long as the longest of them: the causal
    state at a row's last token depends only on that row's tokens, so one pass serves them
    all. The batch then also holds ``row_seq`` / ``row_pos`` (each row's sequence and last
    position) for :func:`healthfm.evaluate.task_head.pooled_rows`, and :meth:`group_order`
    puts a subject's rows next to each other in the training order.
    """

    ids: np.ndarray
    ages: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    use_times: bool
    fingerprint: str
    subjects: np.ndarray | None = None
    shared: bool = True

    def __len__(self) -> int:
        return len(self.starts)

    def group_order(self, order: np.ndarray) -> np.ndarray:
        """``order`` with each subject's rows together, subjects in order of first appearance."""
        order = np.asarray(order, dtype=np.int64)
        if not self.shared or self.subjects is None or len(order) == 0:
            return order
        _, first, inverse = np.unique(self.subjects[order], return_index=True, return_inverse=True)
        return order[np.argsort(first[inverse.reshape(-1)], kind="stable")]

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Collate label rows ``indices`` (no augmentation: ``generator`` is unused)."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.starts[indices], self.lengths[indices]
        extra: dict[str, torch.Tensor] = {}
        if self.shared:
            starts, row_seq = np.unique(starts, return_inverse=True)
            row_seq = row_seq.reshape(-1)
            seq_len = np.zeros(len(starts), dtype=np.int64)
            np.maximum.at(seq_len, row_seq, lengths)
            extra = {
                "row_seq": torch.from_numpy(row_seq.astype(np.int64)),
                "row_pos": torch.from_numpy(lengths - 1),
            }
            lengths = seq_len
        width = int(lengths.max()) if len(lengths) else 0
        cols = np.arange(width)
        mask = cols[None, :] < lengths[:, None]
        positions = (starts[:, None] + cols[None, :])[mask]
        ids = np.full((len(starts), width), PAD_ID, dtype=np.int64)
        ids[mask] = self.ids[positions]
        batch = {"ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.use_times:
            times = np.full((len(starts), width), np.nan)
            times[mask] = self.ages[positions]
            batch["times"] = torch.from_numpy(times)
        return {**batch, **extra}


def label_windows(
    ds: MedsDataset,
    tokenizer: MedsTokenizer,
    labels: Labels,
    max_len: int,
    use_times: bool = True,
    shared: bool = True,
) -> LabelWindows:
    """Token windows of every label row, in the order of ``labels.frame``.

    Parameters
    ----------
    ds
        The MEDS data set.
    tokenizer
        The model's fitted tokenizer.
    labels
        Label rows (every subject must be in ``ds``; :func:`read_labels` checks it).
    max_len
        Context length N: a history longer than N keeps the window
        :func:`~healthfm.ehr.embed.window_start` gives (the most recent N/2+1 to N tokens).
    use_times
        Collate the age input (models with ``use_times``).
    shared
        Let rows of one subject and window share one sequence (see :class:`LabelWindows`).
    """
    subjects, times_us = labels.subject_ids, labels.times_us
    n = len(subjects)
    starts = np.zeros(n, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    ids_parts: list[np.ndarray] = []
    age_parts: list[np.ndarray] = []
    base = 0
    found = np.zeros(n, dtype=bool)
    for _, df in iter_batches(ds, np.unique(subjects)):
        if len(df) == 0:
            continue
        enc = tokenizer.encode_frame(df)
        idx = np.flatnonzero(np.isin(subjects, enc.subject_ids))
        if len(idx) == 0:
            continue
        s_idx, cut = label_cutoffs(enc, subjects[idx], times_us[idx])
        lo = enc.offsets[s_idx]
        start = window_start(cut - lo, max_len)
        starts[idx] = base + lo + start
        lengths[idx] = cut - lo - start
        found[idx] = True
        ids_parts.append(np.asarray(enc.ids, dtype=np.int32))
        age_parts.append(np.asarray(enc.ages, dtype=np.float64))
        base += len(enc.ids)
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise DataError(
            f"label subject {int(subjects[row])} has no events in the MEDS data",
            file=labels.source,
            column="subject_id",
            row=int(labels.frame["row"][row]),
        )
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    ages = np.concatenate(age_parts) if age_parts else np.zeros(0)
    # The rows: tokenizer, context, and every label's subject and prediction time.
    h = hashlib.sha256(tokenizer.hash.encode() + str(max_len).encode())
    h.update(np.ascontiguousarray(subjects, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(times_us, dtype=np.int64).tobytes())
    digest = h.hexdigest()
    return LabelWindows(ids, ages, starts, lengths, use_times, digest, subjects, shared)


def subject_positions(samples: Samples, subject_ids: np.ndarray) -> np.ndarray:
    """Position in ``samples.keys`` of each of ``subject_ids`` (all must be there)."""
    order = np.argsort(samples.keys, kind="stable")
    return order[np.searchsorted(samples.keys[order], subject_ids)]


def label_values(labels: Labels) -> np.ndarray:
    """Label values as a numpy array: booleans as 0/1 integers, others as they are."""
    y = labels.frame["label"]
    if y.dtype == pl.Boolean:
        y = y.cast(pl.Int64)
    return y.to_numpy()


def ehr_task_input(
    samples: Samples, model: Any, labels: Labels, subject_splits: np.ndarray
) -> TaskInput:
    """Label rows with their prediction-time windows; each row takes its subject's split.

    Parameters
    ----------
    samples
        The MEDS subjects (:meth:`EhrModality.read`).
    model
        A causal model with its tokenizer.
    labels
        The label rows.
    subject_splits
        "train" / "val" / "test" of every subject in ``samples.keys`` order.
    """
    if not model.config.causal:
        raise ConfigError(
            "fine-tuning at prediction times needs a causal EHR model (its states must not "
            "see later tokens)",
            column="objective",
        )
    ds: MedsDataset = samples.payload["dataset"]
    subject_ids = labels.subject_ids
    split_names = np.asarray(subject_splits).astype(str)[subject_positions(samples, subject_ids)]
    values = label_values(labels)
    rows = Samples(
        source=labels.source,
        keys=np.arange(len(labels)),
        groups=subject_ids.astype(str),
        labels=values,
        payload=None,
        data_hash=samples.data_hash,
        label_column=labels.column,
        info={"prediction_time": labels.frame["prediction_time"]},
    )
    if labels.survival:  # days to the event or censoring, and the event: a Cox head
        rows.info["survival"] = {
            "time": np.asarray(values, dtype=np.float64),
            "event": labels.frame["event"].to_numpy().astype(bool),
            "time_column": "float_value",
            "event_column": "boolean_value",
        }
    source = label_windows(
        ds, model.tokenizer, labels, model.config.max_len, model.config.use_times
    )
    return TaskInput(rows, split_names, source, {"labels": str(labels.source)})


def finetuned_ehr_rows(
    model_dirs: list[str | Path],
    ds: MedsDataset,
    labels: Labels,
    y: np.ndarray,
    classes: np.ndarray,
    split: np.ndarray,
    task: str,
    metrics: list[str],
    n_boot: int = 1000,
    batch_size: int = 32,
    data_hash: str | None = None,
    event: np.ndarray | None = None,
) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Rows of fine-tuned EHR models' own predictions on the ``held_out`` label rows.

    Same rows, metrics and subject bootstrap as the EHRSHOT probe and baselines; ``k`` is
    the model's few-shot k (``all`` when it was fine-tuned on every row). ``y`` holds class
    indices into ``classes`` (the evaluation's sorted label values), or the targets of a
    regression (``classes`` empty), which only a regression model can score, or the
    follow-up times of a survival task (``event`` given), which only a survival (Cox)
    model can score: Harrell's / Uno's C and time-dependent AUROC of its risks.

    Returns
    -------
    (list of ResultRow, dict)
        The rows, and each method's held-out probabilities.
    """
    from healthfm.ehr.evaluation import positive_scores
    from healthfm.evaluate.finetuned import finetuned_method, read_provenance
    from healthfm.evaluate.metrics import classification_metrics, regression_metrics
    from healthfm.evaluate.probe import align_proba
    from healthfm.evaluate.results import rows_from_metrics
    from healthfm.evaluate.task_head import predict, task_spec
    from healthfm.loader import load_finetuned

    te = np.flatnonzero(split == "held_out")
    held = Labels(labels.source, labels.frame[te], labels.column)
    groups = labels.subject_ids[te]
    rows: list[Any] = []
    final: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for path in model_dirs:
        t = time.perf_counter()
        model = load_finetuned(path)
        spec = task_spec(model)
        if model.config.modality != "ehr":
            raise ConfigError(
                f"{path} is a fine-tuned {model.config.modality!r} model, not an EHR one"
            )
        head_classes = np.asarray(spec.get("classes") or [])
        regression = len(classes) == 0 and event is None
        if (spec["task"] == "survival") != (event is not None):
            wanted = "time-to-event labels" if spec["task"] == "survival" else "a Cox head"
            raise ConfigError(
                f"{path} has a {spec['task']} head and {labels.column} of this label file "
                f"is {'time-to-event' if event is not None else 'not time-to-event'}: it "
                f"needs {wanted}",
                file=Path(path),
            )
        if event is None and (
            (spec["task"] == "regression") != regression or not np.isin(head_classes, classes).all()
        ):
            wanted = "a regression" if regression else f"the classes {classes.tolist()[:10]}"
            raise ConfigError(
                f"{path} predicts {spec['task']} classes {spec.get('classes')}, not "
                f"{wanted} of {labels.column} in this label file",
                file=Path(path),
            )
        info = read_provenance(Path(path))
        method = finetuned_method(model, info, path, seen)
        source = label_windows(
            ds, model.tokenizer, held, model.config.max_len, model.config.use_times
        )
        out = predict(model, source, batch_size=batch_size)
        seed = int(info.get("config", {}).get("seed", 0))
        if event is not None:
            from healthfm.evaluate.survival import survival_metrics

            fit = np.flatnonzero(split == "train")
            p = out
            m = survival_metrics(
                y[te],
                event[te],
                p,
                train_time=y[fit],
                train_event=event[fit],
                n_boot=n_boot,
                seed=seed,
                groups=groups,
                metrics=metrics,
            )
        elif regression:
            p = out
            m = regression_metrics(
                y[te], p, n_boot=n_boot, seed=seed, groups=groups, metrics=metrics
            )
        else:
            p = positive_scores(align_proba(out, head_classes, classes))
            m = classification_metrics(
                y[te], p, n_boot=n_boot, seed=seed, groups=groups, metrics=metrics
            )
        final[method] = p
        rows += rows_from_metrics(
            m,
            names=list(metrics),
            task=task,
            method=method,
            is_baseline=False,
            n_test=len(te),
            seed=seed,
            model_hash=getattr(model, "model_hash", None),
            data_hash=data_hash,
            wall_seconds=time.perf_counter() - t,
            extra={
                "k": info.get("few_shot") or "all",
                "n_train": info.get("n_train"),
                "n_tuning": info.get("n_val"),
                "n_test_subjects": len(np.unique(groups)),
                "modality": "ehr",
                "protocol": "ehrshot",
                "finetune_method": info.get("method"),
                "trainable_parameters": info.get("trainable_parameters"),
                "finetune_wall_seconds": info.get("wall_seconds"),
                "best_epoch": info.get("best_epoch"),
                "base_model_hash": info.get("base_model_hash"),
                "model_folder": str(path),
            },
        )
    return rows, final
