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
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from healthfm.ehr.embed import label_cutoffs, window_start
from healthfm.ehr.reader import Labels, MedsDataset, iter_batches
from healthfm.ehr.tokenizer import MedsTokenizer
from healthfm.errors import ConfigError, DataError
from healthfm.modality import Samples, TaskInput
from healthfm.model.config import ModelConfig
from healthfm.tokenizer import PAD_ID

__all__ = [
    "LabelWindows",
    "ehr_task_input",
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
    if (lengths == 0).any():
        # A tokenizer without a start token (CLMBR's) knows no event of such a row: its
        # task head would read padding. FEMR refuses such labels as well.
        row = int(np.flatnonzero(lengths == 0)[0])
        raise DataError(
            f"label subject {int(subjects[row])} has no event the model's vocabulary knows "
            f"at or before its prediction time ({int((lengths == 0).sum())} such label rows); "
            "drop these labels to fine-tune or score this model on them",
            file=labels.source,
            column="prediction_time",
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


def is_causal(model: Any) -> bool:
    """Whether a model's states never see later tokens: healthfm's causal objective, or an
    encoder (a published one, or a task model on one) that declares ``causal``."""
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return bool(config.causal)
    return bool(getattr(model, "causal", False))


def uses_times(model: Any) -> bool:
    """Whether a model reads the age of every token: healthfm's ``use_times``, or a
    tokenizer that fills ``times`` (CLMBR's)."""
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return bool(config.use_times)
    return "times" in getattr(model.tokenizer, "fields", ())


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
        A causal model with its tokenizer: healthfm's, or any encoder that declares
        ``causal`` (a published one such as CLMBR, or a task model on one).
    labels
        The label rows.
    subject_splits
        "train" / "val" / "test" of every subject in ``samples.keys`` order.
    """
    if not is_causal(model):
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
    source = label_windows(ds, model.tokenizer, labels, model.max_len, uses_times(model))
    return TaskInput(rows, split_names, source, {"labels": str(labels.source)})
