"""Fine-tuned models inside evaluations: their own predictions as result rows.

``healthfm evaluate --finetuned`` scores fine-tuned model folders, fine-tuned published
encoders and LoRA adapters next to the frozen probe and the baselines: same rows, same
test split, same metrics and bootstrap (:func:`finetuned_rows`), for every modality and
every kind of base (healthfm's own or a published encoder). The fine-tuned models decide
whether the evaluation is a regression (:func:`evaluation_is_regression`).

What differs between modalities is only where a model reads the rows from: the rows the
modality builds for fine-tuning (:meth:`~healthfm.modality.Modality.task_input`: EHR label
rows at their prediction times, image tiles), else the samples tokenized by the model's
tokenizer; and what differs between protocols is their metrics and, for the survival
metrics, the rows the censoring weights are fitted on (the protocol's ``refit``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.metrics import classification_metrics, regression_metrics
from healthfm.evaluate.probe import infer_task
from healthfm.evaluate.results import ResultRow, rows_from_metrics
from healthfm.evaluate.task_head import predict, task_spec
from healthfm.loader import finetuned_spec, load_finetuned, read_training_info
from healthfm.modality import EvaluationRows, Modality, Samples, TaskInput
from healthfm.options import Options
from healthfm.train.data import StoreSource


def finetuned_rows(
    model_dirs: list[str | Path],
    modality: Modality,
    samples: Samples,
    rows: EvaluationRows,
    options: Options,
    protocol: Any,
    n_boot: int = 1000,
    batch_size: int = 128,
    salt: str | None = None,
    fractions: tuple[float, float, float] | None = None,
) -> tuple[list[ResultRow], dict[str, np.ndarray]]:
    """Result rows of fine-tuned models' own predictions on the evaluation's test rows.

    Used by :func:`healthfm.stages.evaluate.evaluate` to put LoRA and full fine-tuning next to
    the probe and the baselines. Method names are ``<name>-finetune-<full|lora|lora-merged>``
    (plus ``-k<k>`` for a few-shot model, ``@<folder>`` when two models share one).

    Parameters
    ----------
    model_dirs
        Fine-tuned model folders (healthfm's or a published encoder's) and/or LoRA adapter
        folders.
    modality, samples, rows, options
        The evaluated input and the rows the task is scored on
        (:meth:`~healthfm.modality.Modality.evaluation_rows`).
    protocol
        The evaluation's protocol: its reported metrics (``reported``); a survival
        protocol's ``refit`` ("train": the censoring weights are fitted on the train rows,
        else on every non-test row); a protocol that names itself in ``row_extra`` (EHRSHOT)
        gets its few-shot fields on the rows and resamples the rows' own groups.
    salt, fractions
        The evaluation's split. A model fine-tuned under another split that put any of
        these test rows in its train or val split is refused (``ConfigError``).

    Returns
    -------
    (list of ResultRow, dict)
        The rows, and each method's test scores (P(class 1) of a binary task, the class
        probabilities, the predicted values or the risks) for the protocol's outputs.
    """
    metrics = list(protocol.reported(rows.regression, len(rows.classes)))
    test_idx = rows.indices("test")
    found: list[ResultRow] = []
    scores: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for path in model_dirs:
        t = time.perf_counter()
        model = load_finetuned(path)
        spec = task_spec(model)
        info = read_training_info(path)
        provenance = info.get("finetune", {})
        method = finetuned_method(model, provenance, path, seen)
        _check_head(model, spec, modality, rows, Path(path))
        own_salt, own_fractions = _own_split(info, salt, fractions)
        task_input = modality.task_input(samples, options, model, own_salt, own_fractions)
        _check_test_split(
            modality, samples, test_idx, Path(path), task_input, info, salt, fractions
        )
        predicted = _predict(modality, samples, test_idx, model, task_input, batch_size)
        seed = int(provenance.get("config", {}).get("seed", 0))
        result, scores[method] = _score(
            spec, rows, test_idx, predicted, protocol, metrics, n_boot, seed
        )
        found += rows_from_metrics(
            result,
            names=metrics,
            task=rows.task,
            method=method,
            is_baseline=False,
            n_test=len(test_idx),
            seed=seed,
            model_hash=getattr(model, "model_hash", None),
            data_hash=samples.data_hash,
            wall_seconds=time.perf_counter() - t,
            extra=_row_extra(protocol, provenance, modality, rows, test_idx, path),
        )
    return found, scores


def _check_head(
    model: Any, spec: dict[str, Any], modality: Modality, rows: EvaluationRows, path: Path
) -> None:
    """Refuse a model of another modality, or whose head does not predict these rows'
    targets (survival or not, regression or not, classes among the rows')."""
    if model.modality != modality.name:
        raise ConfigError(
            f"{path} is a fine-tuned {model.modality!r} model, not a {modality.name!r} one",
            file=path,
        )
    if (spec["task"] == "survival") != rows.survival:
        raise ConfigError(
            f"{path} has a {spec['task']} head; "
            + (
                "these time-to-event labels need a survival (Cox) head"
                if rows.survival
                else "these labels are not time-to-event"
            ),
            file=path,
        )
    if not rows.survival and (spec["task"] == "regression") != rows.regression:
        wanted = "a regression" if rows.regression else "classes"
        raise ConfigError(
            f"{path} has a {spec['task']} head; this evaluation's labels need {wanted}",
            file=path,
        )
    if spec["task"] in ("classification", "binary"):
        head_classes = np.asarray(spec["classes"])
        unknown = head_classes[~np.isin(head_classes, rows.classes)]
        if unknown.size:
            raise DataError(
                f"the fine-tuned model predicts classes {unknown.tolist()[:5]} absent from "
                "this input's labels",
                file=path,
            )


def _own_split(
    info: dict[str, Any], salt: str | None, fractions
) -> tuple[str | None, tuple[float, float, float] | None]:
    """The split a model was fine-tuned with (its folder's record), else the evaluation's."""
    own_salt, own_fractions = info.get("split_salt"), info.get("split_fractions")
    if own_salt is None or own_fractions is None:
        return salt, fractions
    return own_salt, tuple(own_fractions)


def _check_test_split(
    modality: Modality,
    samples: Samples,
    test_idx: np.ndarray,
    path: Path,
    task_input: TaskInput | None,
    info: dict[str, Any],
    salt: str | None,
    fractions,
) -> None:
    """Refuse a model fine-tuned under another split that put any of the evaluation's test
    rows in its train or val split (``task_input`` was built under the model's split)."""
    own_salt, own_fractions = info.get("split_salt"), info.get("split_fractions")
    if salt is None or own_salt is None or own_fractions is None:
        return
    if (own_salt, tuple(own_fractions)) == (salt, tuple(fractions)):
        return
    if task_input is not None:  # the modality's own rows (EHR label rows, tiles)
        own = np.asarray(task_input.split_names).astype(str)
    else:  # one row per sample
        own = np.asarray(modality.split(samples, own_salt, tuple(own_fractions))).astype(str)
    leaked = own[test_idx] != "test"
    if leaked.any():
        raise ConfigError(
            f"{path} was fine-tuned with split salt {own_salt!r} and fractions {own_fractions}, "
            f"which put {int(leaked.sum())} of this evaluation's test rows in its train or "
            f"val split; evaluate with --split-salt {own_salt}",
            file=path,
            column="split_salt",
        )


def _predict(
    modality: Modality,
    samples: Samples,
    test_idx: np.ndarray,
    model: Any,
    task_input: TaskInput | None,
    batch_size: int,
) -> np.ndarray:
    """The model's predictions of the test rows: read from the modality's fine-tuning rows,
    else from the test samples tokenized by the model's tokenizer."""
    if task_input is not None:
        return predict(model, task_input.source, test_idx, batch_size=batch_size)
    modality.check_input(samples, model.tokenizer)
    with tempfile.TemporaryDirectory(prefix="healthfm-ft-eval-") as tmp:
        store = modality.tokenize(model.tokenizer, samples, Path(tmp) / "store", test_idx)
        truncate = getattr(model, "truncate", None) or getattr(modality, "truncate", "head")
        return predict(model, StoreSource(store, model.max_len, truncate), batch_size=batch_size)


def _few_shot_protocol(protocol: Any) -> bool:
    """Whether the protocol names itself on its rows (EHRSHOT): its fine-tuned rows then
    carry its few-shot fields, and resample the rows' own groups (the subjects) as its
    probes do; other protocols resample the groups as strings, as their probes do."""
    return "protocol" in (getattr(protocol, "row_extra", None) or {})


def _score(
    spec: dict[str, Any],
    rows: EvaluationRows,
    test_idx: np.ndarray,
    predicted: np.ndarray,
    protocol: Any,
    metrics: list[str],
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics (with bootstrap CIs) of a model's test predictions, and the scores the
    protocol's outputs keep."""
    groups = np.asarray(rows.groups)[test_idx]
    if not _few_shot_protocol(protocol):
        groups = groups.astype(str)
    boot = {"n_boot": n_boot, "seed": seed, "groups": groups, "metrics": metrics}
    if rows.survival:  # Harrell's / Uno's C, td-AUROC of the predicted risks
        from healthfm.evaluate.survival import survival_metrics

        # The censoring distribution of the IPC weights: from the rows the protocol fits on.
        fit = rows.indices("train") if getattr(protocol, "refit", None) == "train" else None
        fit = np.flatnonzero(rows.split != "test") if fit is None else fit
        train = {"train_time": rows.y[fit], "train_event": rows.event[fit]}
        y, event = rows.y[test_idx], rows.event[test_idx]
        return survival_metrics(y, event, predicted, **train, **boot), predicted
    if rows.regression:
        y = np.asarray(rows.y[test_idx], dtype=np.float64)
        return regression_metrics(y, predicted, **boot), predicted
    from healthfm.evaluate.probe import align_proba

    proba = align_proba(predicted, np.asarray(spec["classes"]), rows.classes)
    kept = proba[:, 1] if proba.shape[1] == 2 else proba  # P(class 1) of a binary task
    return classification_metrics(rows.y[test_idx], proba, **boot), kept


def _row_extra(
    protocol: Any,
    provenance: dict[str, Any],
    modality: Modality,
    rows: EvaluationRows,
    test_idx: np.ndarray,
    path: str | Path,
) -> dict[str, Any]:
    """What a fine-tuned model's rows record: its fine-tuning, and (a few-shot protocol)
    its ``k`` and row counts, as the protocol's probe rows do."""
    tuned = {
        "finetune_method": provenance.get("method"),
        "trainable_parameters": provenance.get("trainable_parameters"),
        "finetune_wall_seconds": provenance.get("wall_seconds"),
        "best_epoch": provenance.get("best_epoch"),
        "base_model_hash": provenance.get("base_model_hash"),
    }
    if not _few_shot_protocol(protocol):
        return {**tuned, "modality": modality.name, "model_folder": str(path)}
    return {
        "k": provenance.get("few_shot") or "all",
        "n_train": provenance.get("n_train"),
        "n_tuning": provenance.get("n_val"),
        "n_test_subjects": len(np.unique(np.asarray(rows.groups)[test_idx])),
        "modality": modality.name,
        **protocol.row_extra,
        **tuned,
        "model_folder": str(path),
    }


def finetuned_method(model: Any, info: dict[str, Any], path: str | Path, seen: set[str]) -> str:
    """Result-row method name of a fine-tuned model: ``<preset>-finetune-<method>``, plus
    ``-k<k>`` for a few-shot one and ``@<folder>`` when the name is taken; added to ``seen``."""
    method = f"{model.name}-finetune-{info.get('method', 'full')}"
    if info.get("few_shot"):
        method += f"-k{info['few_shot']}"
    if method in seen:
        method = f"{method}@{Path(path).name}"
    seen.add(method)
    return method


def evaluation_is_regression(
    labels: np.ndarray, model_dirs: list, categorical: bool = False
) -> bool:
    """Whether ``evaluate`` scores these labels as a regression.

    The fine-tuned models' task when any are scored (they were trained for it, perhaps
    with ``finetune --task``), else :func:`~healthfm.evaluate.probe.infer_task` on the
    labels. Refused (``ConfigError``): fine-tuned models that mix regression and
    classification, and a classifier whose classes are not among the labels' values (the
    label file of another task).
    """
    specs = {str(p): finetuned_spec(p) for p in model_dirs}
    kinds = {spec["task"] == "regression" for spec in specs.values()}
    if len(kinds) > 1:
        tasks = {p: spec["task"] for p, spec in specs.items()}
        raise ConfigError(
            f"the fine-tuned models mix regression and classification heads ({tasks}); "
            "evaluate them in separate runs"
        )
    values = np.unique(np.asarray(labels).astype(str))
    for path, spec in specs.items():
        classes = np.asarray(spec.get("classes") or []).astype(str)
        missing = classes[~np.isin(classes, values)]
        if spec["task"] != "regression" and missing.size:
            raise ConfigError(
                f"{path} is a {spec['task']} model whose classes {missing[:5].tolist()} are not "
                f"among these labels' values ({len(values)} distinct, e.g. "
                f"{values[:5].tolist()}): the label file of another task?",
                file=Path(path),
            )
    return kinds.pop() if kinds else infer_task(labels, categorical) == "regression"


def read_provenance(path: Path) -> dict[str, Any]:
    """The ``finetune`` provenance of a fine-tuned model or adapter folder ({} if none)."""
    return read_training_info(path).get("finetune", {})
