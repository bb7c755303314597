"""The labelled rows of a fine-tuning task: rows, splits, targets, class weights and head spec.

Data, splits and labels come exactly as in :func:`healthfm.stages.evaluate.evaluate`: the
modality's reader, its rows (``modality.task_input``, or one row per sample tokenized into
a temporary token store), ``modality.split`` with the model's split salt and fractions (so
the test split is the one pretraining and the probe held out), and
:func:`~healthfm.modality.require_labels`.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.probe import infer_task
from healthfm.evaluate.task_head import TASKS
from healthfm.modality import Modality, Samples, TaskInput, labels_as_targets, require_labels
from healthfm.train.data import StoreSource

_MISSING = {"", "nan", "NaN", "NA", "None", "null"}


@dataclass
class TaskData:
    """Everything the stage trains and scores on, per row of the task input."""

    samples: Samples
    splits: dict[str, np.ndarray]
    spec: dict[str, Any]
    targets: np.ndarray  # class index (int64) or standardized float32 target
    class_weights: np.ndarray | None
    salt: str
    fractions: tuple[float, float, float]
    val_from_train: bool


_TaskData = TaskData  # the former private name


def shared_task_input(
    modality: Modality,
    samples: Samples,
    model: Any,
    salt: str,
    fractions,
    stack: contextlib.ExitStack,
) -> TaskInput:
    """One row per sample: the modality's split, per-sample labels, a temporary token store
    (removed when ``stack`` closes), read as ``model`` (any Encoder) reads its inputs."""
    if (
        samples.labels is None
        and "survival" not in samples.info
        and type(modality).evaluation_rows is not Modality.evaluation_rows
    ):
        # Labels that are not per sample come through the modality's own evaluation rows;
        # without a task_input part, fine-tuning cannot pair them with samples.
        raise ConfigError(
            f"fine-tuning {modality.name!r} data needs per-sample labels; this modality's labels "
            "come through its own evaluation rows and it has no fine-tuning rows (task_input)",
            file=samples.source,
        )
    if samples.labels is None and "survival" not in samples.info:
        require_labels(samples)  # raises the shared "no label column" error
    modality.check_input(samples, model.tokenizer)
    split_names = np.asarray(modality.split(samples, salt, tuple(fractions))).astype(str)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="healthfm-finetune-")))
    store = modality.tokenize(model.tokenizer, samples, tmp / "store")
    # The end a too-long sample is cut at: a published encoder's own, else the modality's.
    truncate = getattr(model, "truncate", None) or getattr(modality, "truncate", "head")
    source = StoreSource(store, model.max_len, truncate)
    return TaskInput(samples, split_names, source)


def task_data(
    samples: Samples,
    split_names: np.ndarray,
    salt: str,
    fractions,
    config: Any,
    pooling: str,
) -> TaskData:
    """Check the labels and build the task: splits (a val split carved from train when
    there is none; few-shot draws), the task kind, targets, class weights and head spec.

    ``config`` is the :class:`~healthfm.stages.finetune.FinetuneConfig` (``task``,
    ``few_shot``, ``seed``, ``class_weight``).
    """
    split_names = np.asarray(split_names).astype(str)
    survival = samples.info.get("survival")
    if samples.labels is None and survival is None:
        require_labels(samples)  # raises the shared "no label column" error
    if survival is None:
        _check_missing(samples, split_names)
    splits = {name: np.flatnonzero(split_names == name) for name in ("train", "val", "test")}
    if len(splits["train"]) == 0:
        raise DataError(
            "the train split is empty (too few samples or groups); nothing to fine-tune on",
            file=samples.source,
            column=samples.label_column,
        )
    val_from_train = False
    if len(splits["val"]) == 0:
        # No val split (tiny data, or the data's own splits lack one): hold out 1/8 of the
        # train groups for early stopping, by a seeded group draw.
        from healthfm.evaluate.protocol import probe_split

        tr, va = probe_split(splits["train"], samples.groups, config.seed)
        if len(va) == 0 or len(tr) == 0:
            raise DataError(
                "the val split is empty and the train split has too few groups to carve one",
                file=samples.source,
                column=samples.label_column,
            )
        splits["train"], splits["val"], val_from_train = tr, va, True
    if survival is not None:  # time and event: a Cox head
        return _survival_task(
            samples, splits, survival, config, pooling, salt, fractions, val_from_train
        )
    if config.task == "survival":
        raise ConfigError(
            "--task survival needs time-to-event labels (MEDS boolean_value + float_value, "
            "or --time-column and --event-column)",
            column="task",
        )
    task = config.task or infer_task(
        samples.labels[np.concatenate([splits["train"], splits["val"]])],
        bool(samples.info.get("categorical_labels")),
    )
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}, not {task!r}", column="task")
    if config.few_shot is not None:
        splits = _few_shot(samples, splits, task, int(config.few_shot), config.seed)
    spec: dict[str, Any] = {"task": task, "pooling": pooling, "label_column": samples.label_column}
    class_weights = None
    if task == "regression":
        values = labels_as_targets(samples, samples.labels)
        train_values = values[splits["train"]]
        mean, std = float(train_values.mean()), float(train_values.std())
        if not np.isfinite(std) or std == 0.0:
            raise DataError(
                "the regression target is constant on the train split",
                file=samples.source,
                column=samples.label_column,
            )
        spec.update(n_outputs=1, target_mean=mean, target_std=std, classes=None)
        targets = ((values - mean) / std).astype(np.float32)
    else:
        # The shared checks: two or more classes overall, in train and in test.
        require_labels(samples, np.where(split_names == "val", "train", split_names))
        classes = np.unique(samples.labels[np.concatenate([splits["train"], splits["val"]])])
        if task == "binary" and len(classes) != 2:
            raise DataError(
                f"--task binary needs exactly two classes, the labels have {len(classes)}",
                file=samples.source,
                column=samples.label_column,
            )
        present = np.unique(samples.labels[splits["train"]])
        if len(present) < 2:
            raise DataError(
                f"the train split holds {len(present)} class(es); fine-tuning needs two or more",
                file=samples.source,
                column=samples.label_column,
            )
        targets = np.searchsorted(classes, samples.labels).astype(np.int64)
        unseen = ~np.isin(samples.labels, classes)
        targets[unseen] = -1  # test-only classes: scored as never predicted
        counts = np.bincount(targets[splits["train"]], minlength=len(classes)).astype(np.float64)
        if config.class_weight:
            # "balanced" weights n / (k * n_c); a class absent from train gets weight 0.
            class_weights = np.where(
                counts > 0, counts.sum() / (len(classes) * np.maximum(counts, 1)), 0.0
            )
        spec.update(n_outputs=1 if task == "binary" else len(classes), classes=classes.tolist())
    return TaskData(
        samples, splits, spec, targets, class_weights, salt, tuple(fractions), val_from_train
    )


_task_data = task_data  # the former private name (tests)


def _survival_task(
    samples: Samples,
    splits: dict[str, np.ndarray],
    survival: dict[str, Any],
    config: Any,
    pooling: str,
    salt: str,
    fractions,
    val_from_train: bool,
) -> TaskData:
    """A Cox head: targets ``[time, event]`` (float32, rows × 2); ``--few-shot k`` draws
    k rows with an event and k censored rows from train and from val."""
    from healthfm.evaluate.probe import few_shot_indices

    if config.task not in (None, "survival"):
        raise ConfigError(
            f"these are time-to-event labels; --task {config.task} does not apply (use "
            "--task survival, or leave it out)",
            column="task",
        )
    time, event = np.asarray(survival["time"], float), np.asarray(survival["event"], bool)
    if config.few_shot is not None:
        k, seed = int(config.few_shot), config.seed
        tr, va = splits["train"], splits["val"]
        splits = {
            **splits,
            "train": tr[few_shot_indices(event[tr], k, seed)],
            "val": va[few_shot_indices(event[va], k, seed + 10_000)],
        }
    if not event[splits["train"]].any():
        raise DataError(
            "no event in the train split; a Cox head cannot be fitted",
            file=samples.source,
            column=survival.get("event_column", "event"),
        )
    spec: dict[str, Any] = {
        "task": "survival",
        "pooling": pooling,
        "label_column": samples.label_column,
        "n_outputs": 1,
        "classes": None,
        "time_unit": "days",
    }
    targets = np.column_stack([time, event]).astype(np.float32)
    return TaskData(samples, splits, spec, targets, None, salt, tuple(fractions), val_from_train)


def _check_missing(samples: Samples, split_names: np.ndarray) -> None:
    labels = samples.labels
    # Vectorized over all labels (None becomes 'None', NaN 'nan').
    missing = np.isin(np.char.strip(np.asarray(labels).astype(str)), sorted(_MISSING))
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{int(missing.sum())} sample(s) have no label (first: key {samples.keys[row]!r}, "
            f"{split_names[row]} split); every train / val / test sample needs one",
            file=samples.source,
            column=samples.label_column,
            row=row,
        )


def _few_shot(
    samples: Samples, splits: dict[str, np.ndarray], task: str, k: int, seed: int
) -> dict[str, np.ndarray]:
    """k rows per class from train and k from val (EHRSHOT draws both), seeded."""
    from healthfm.evaluate.probe import few_shot_indices

    if task == "regression":
        raise ConfigError(
            "--few-shot draws k rows per class; it does not apply to regression",
            column="few_shot",
        )
    labels = np.asarray(samples.labels)
    train, val = splits["train"], splits["val"]
    return {
        **splits,
        "train": train[few_shot_indices(labels[train], k, seed)],
        "val": val[few_shot_indices(labels[val], k, seed + 10_000)],
    }
