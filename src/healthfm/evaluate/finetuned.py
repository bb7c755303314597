"""Fine-tuned models inside evaluations: their own predictions as result rows.

``healthfm evaluate --finetuned`` scores fine-tuned model folders and LoRA adapters next
to the frozen probe and the baselines: same samples, same test split, same metrics and
bootstrap (:func:`finetuned_rows`); the fine-tuned models decide whether the evaluation is
a regression (:func:`evaluation_is_regression`).
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
from healthfm.modality import Modality, Samples
from healthfm.train.data import StoreSource


def finetuned_rows(
    model_dirs: list[str | Path],
    modality: Modality,
    samples: Samples,
    test_idx: np.ndarray,
    classes: np.ndarray,
    task: str,
    n_boot: int = 1000,
    batch_size: int = 128,
    metrics: list[str] | None = None,
    source_for: Any = None,
    salt: str | None = None,
    fractions=None,
) -> list[ResultRow]:
    """Result rows of fine-tuned models' own predictions on the test split.

    Used by :func:`healthfm.stages.evaluate.evaluate` to put LoRA and full fine-tuning next to
    the probe and the baselines: same samples, same test split, same metrics and
    bootstrap. Method names are ``<preset>-finetune-<full|lora|lora-merged>`` (plus
    ``@<folder>`` when two models share one).

    Parameters
    ----------
    model_dirs
        Fine-tuned model folders and/or LoRA adapter folders.
    modality, samples
        The evaluated input.
    test_idx
        Indices of the test split.
    classes
        The evaluation's sorted class names (the probe's class order).
    task
        Task name of the rows.
    source_for
        ``f(model) -> BatchSource`` over the test samples, in ``test_idx`` order, for data
        that are not token sequences (tiles); by default the test samples are tokenized
        into a temporary token store.
    salt, fractions
        The evaluation's split. A model fine-tuned under another split that put any of
        these test samples in its train or val split is refused (``ConfigError``).
    """
    from healthfm.evaluate.probe import align_proba

    rows: list[ResultRow] = []
    seen: set[str] = set()
    for path in model_dirs:
        t = time.perf_counter()
        model = load_finetuned(path)
        spec = task_spec(model)
        info = read_provenance(Path(path))
        method = finetuned_method(model, info, path, seen)
        _check_test_split(modality, samples, test_idx, Path(path), salt, fractions)
        source = source_for(model) if source_for is not None else None
        if source is not None:
            scores = predict(model, source, batch_size=batch_size)
        else:
            modality.check_input(samples, model.tokenizer)
            with tempfile.TemporaryDirectory(prefix="healthfm-ft-eval-") as tmp:
                store = modality.tokenize(model.tokenizer, samples, Path(tmp) / "store", test_idx)
                truncate = getattr(model, "truncate", None) or getattr(modality, "truncate", "head")
                source = StoreSource(store, model.max_len, truncate)
                scores = predict(model, source, batch_size=batch_size)
        seed = int(info.get("config", {}).get("seed", 0))
        groups = np.asarray(samples.groups)[test_idx].astype(str)
        target = samples.info.get("survival")
        if (spec["task"] == "survival") != (target is not None):
            raise ConfigError(
                f"{path} has a {spec['task']} head; "
                + (
                    "these time-to-event labels need a survival (Cox) head"
                    if target is not None
                    else "these labels are not time-to-event"
                ),
                file=Path(path),
            )
        if target is not None:  # Harrell's / Uno's C, td-AUROC of the predicted risks
            from healthfm.evaluate.survival import survival_metrics

            fit = np.setdiff1d(np.arange(len(samples)), test_idx)  # IPCW: the non-test rows
            result = survival_metrics(
                target["time"][test_idx],
                target["event"][test_idx],
                scores,
                train_time=target["time"][fit],
                train_event=target["event"][fit],
                n_boot=n_boot,
                seed=seed,
                groups=groups,
            )
        elif spec["task"] == "regression":
            y = np.asarray(samples.labels[test_idx], dtype=np.float64)
            result = regression_metrics(y, scores, n_boot=n_boot, seed=seed, groups=groups)
        else:
            head_classes = np.asarray(spec["classes"])
            unknown = head_classes[~np.isin(head_classes, classes)]
            if unknown.size:
                raise DataError(
                    f"the fine-tuned model predicts classes {unknown.tolist()[:5]} absent from "
                    "this input's labels",
                    file=samples.source,
                    column=samples.label_column,
                )
            proba = align_proba(scores, head_classes, classes)
            y = np.searchsorted(classes, samples.labels[test_idx])
            result = classification_metrics(y, proba, n_boot=n_boot, seed=seed, groups=groups)
        wall = time.perf_counter() - t
        rows += rows_from_metrics(
            result,
            names=[n for n in result if metrics is None or n in metrics],
            task=task,
            method=method,
            is_baseline=False,
            n_test=len(test_idx),
            seed=seed,
            model_hash=getattr(model, "model_hash", None),
            data_hash=samples.data_hash,
            wall_seconds=wall,
            extra={
                "finetune_method": info.get("method"),
                "trainable_parameters": info.get("trainable_parameters"),
                "finetune_wall_seconds": info.get("wall_seconds"),
                "best_epoch": info.get("best_epoch"),
                "base_model_hash": info.get("base_model_hash"),
                "modality": modality.name,
                "model_folder": str(path),
            },
        )
    return rows


def _check_test_split(
    modality: Modality, samples: Samples, test_idx: np.ndarray, path: Path, salt, fractions
) -> None:
    # A model folder's split, or (a LoRA adapter folder) its base's, in its reference file.
    info = read_training_info(path)
    own_salt, own_fractions = info.get("split_salt"), info.get("split_fractions")
    if salt is None or own_salt is None or own_fractions is None:
        return
    if (own_salt, tuple(own_fractions)) == (salt, tuple(fractions)):
        return
    own = np.asarray(modality.split(samples, own_salt, tuple(own_fractions))).astype(str)
    leaked = own[test_idx] != "test"
    if leaked.any():
        raise ConfigError(
            f"{path} was fine-tuned with split salt {own_salt!r} and fractions {own_fractions}, "
            f"which put {int(leaked.sum())} of this evaluation's test samples in its train or "
            f"val split; evaluate with --split-salt {own_salt}",
            file=path,
            column="split_salt",
        )


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
