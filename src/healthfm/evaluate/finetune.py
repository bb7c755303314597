"""Fine-tune a pretrained model for a task: the whole network, or LoRA adapters.

A task head (one linear layer) sits on the backbone's pooled output: ``classification``
(softmax over the classes, class-weighted cross-entropy), ``binary`` (one logit,
``pos_weight``-balanced BCE) or ``regression`` (one output, MSE on the standardized
target). Data, splits and labels come exactly as in :func:`healthfm.pipeline.evaluate`:
the modality's reader, ``modality.split`` with the model's split salt and fractions (so
the test split is the one pretraining and the probe held out), and
:func:`~healthfm.modality.require_labels`. Training uses the train split; early stopping
watches the loss on the val split and the best epoch is restored.

The loop is a small epoch loop here, not :class:`healthfm.train.trainer.Trainer`: the
trainer is built around pretraining objectives and a global step budget, while fine-tuning
needs epochs, a labelled task loss and early stopping. It reuses the trainer's pieces:
:func:`healthfm.train.data.collate` (through a :class:`~healthfm.train.data.StoreSource`),
the warm-up + cosine schedule :meth:`TrainConfig.lr_at`, bf16 autocast, and the atomic
model folder of :func:`~healthfm.model.pretrained.save_pretrained`.

Outputs:

* full fine-tuning (and ``--lora --merge``): an ordinary model folder; ``config.json``
  records the head in ``extra["task_head"]`` (task, classes, pooling, target scaling) and
  ``model.safetensors`` holds ``task_head.weight`` / ``task_head.bias``, so
  :func:`healthfm.load` rebuilds it strictly and ``embed`` / ``evaluate`` accept it;
* ``--lora``: a standard ``peft`` adapter folder plus a reference to the base model
  (:mod:`healthfm.evaluate.adapters`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from healthfm.errors import ConfigError, DataError, ModelError
from healthfm.evaluate.metrics import classification_metrics, regression_metrics
from healthfm.evaluate.probe import infer_task
from healthfm.evaluate.results import ResultRow, rows_from_metrics
from healthfm.fsutil import atomic_dir
from healthfm.loader import load
from healthfm.modality import (
    Modality,
    Samples,
    TaskInput,
    get_modality,
    labels_as_targets,
    require_labels,
)
from healthfm.model.heads import FoundationModel, pool
from healthfm.model.pretrained import save_pretrained
from healthfm.train.data import StoreSource

__all__ = [
    "TASKS",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "finetuned_method",
    "finetuned_rows",
    "load_finetuned",
    "predict",
    "read_provenance",
    "task_spec",
    "with_task_head",
]

TASKS = ("classification", "binary", "regression")
_MISSING = {"", "nan", "NaN", "NA", "None", "null"}


@dataclass
class FinetuneConfig:
    """Fine-tuning settings.

    Attributes
    ----------
    task
        "classification", "binary" or "regression"; None infers it from the labels
        (two classes → binary, numbers with more than 20 distinct values → regression,
        otherwise classification).
    lora, lora_rank, lora_alpha, lora_dropout
        Train LoRA adapters (rank, scale ``alpha / rank``; alpha defaults to 2 × rank)
        on the attention ``qkv`` / ``out`` and MLP ``up`` / ``down`` projections instead
        of the whole network.
    merge
        With ``lora``: write a plain model folder with the adapter folded in.
    freeze_layers
        Freeze the input embedder and the first N blocks (LoRA: adapt only the later ones).
    epochs, patience
        At most ``epochs`` passes over the train split; stop after ``patience`` epochs
        without a better val loss; the best epoch's weights are restored.
    lr, weight_decay, warmup_fraction, grad_clip
        AdamW, linear warm-up over the first fraction of steps then cosine decay to 10%.
        ``lr`` None: 1e-3 for full fine-tuning, 3e-3 for LoRA (best of 1e-4 / 1e-3 full and
        1e-3 / 3e-3 LoRA for the tiny preset on splice, 5-10 epochs; lower it for big presets).
    batch_size
        Samples per step.
    class_weight
        Weight classes inversely to their train frequency (cross-entropy weights; BCE
        ``pos_weight``) so that rare classes count as much as common ones.
    pooling
        Pooling of token states for the head; the model's by default.
    head_init
        "random" (default): small random weights. "probe": start from the linear probe of
        the frozen embedding (LP-FT); on the bundled splice data it was worse in short
        runs (the probe's weights are large where the embedding varies little, so the
        first backbone updates swing the logits), hence not the default.
    bf16
        bf16 autocast.
    seed
        Seeds the head, the LoRA matrices, the data order and the few-shot draw.
    few_shot
        Train on ``k`` rows per class drawn from train and early-stop on ``k`` per class
        from val (EHRSHOT's few-shot protocol, seeded by ``seed``); None: every row.
    """

    task: str | None = None
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    merge: bool = False
    freeze_layers: int = 0
    epochs: int = 10
    patience: int = 3
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 32
    class_weight: bool = True
    pooling: str | None = None
    head_init: str = "random"
    bf16: bool = False
    seed: int = 0
    few_shot: int | None = None

    @property
    def method(self) -> str:
        """Short method name used in results: "full", "lora" or "lora-merged"."""
        return ("lora-merged" if self.merge else "lora") if self.lora else "full"

    def learning_rate(self) -> float:
        """The peak learning rate (default depends on the method)."""
        return float(self.lr) if self.lr is not None else (3e-3 if self.lora else 1e-3)


@dataclass
class FinetuneResult:
    """What :func:`finetune` did."""

    out: Path
    method: str
    task: str
    best_epoch: int
    epochs_run: int
    best_val_loss: float
    trainable_parameters: int
    total_parameters: int
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Sample indices of the test split and the model's predictions for them
    #: (probabilities per class, or regression values).
    test_indices: np.ndarray | None = None
    test_scores: np.ndarray | None = None


class FinetuneStopped(Exception):
    """Raised inside :func:`finetune` when ``stop_at_epoch`` is reached (checkpointed)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped after epoch {epoch}")
        self.epoch = epoch


# ---------------------------------------------------------------------------- task head


def task_spec(model: FoundationModel) -> dict[str, Any] | None:
    """The task-head spec of a fine-tuned model (``config.extra["task_head"]``), or None."""
    return model.config.extra.get("task_head")


def with_task_head(base: FoundationModel, spec: dict[str, Any]) -> FoundationModel:
    """A copy of ``base`` whose config records ``spec`` and that carries a fresh task head.

    Every backbone and pretraining-head weight is copied; a task head the base already had
    (fine-tuning a fine-tuned model) is replaced.
    """
    config = replace(base.config, extra={**base.config.extra, "task_head": spec})
    model = FoundationModel(config)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("task_head.")}
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("task_head.")]
    if missing or unexpected:  # pragma: no cover - same config apart from the head
        raise ModelError(
            f"cannot copy the base weights: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tokenizer = getattr(base, "tokenizer", None)
    model.folder = getattr(base, "folder", None)
    model.model_hash = getattr(base, "model_hash", None)
    return model


def pooled_rows(
    model: FoundationModel, batch: dict[str, torch.Tensor], pooling: str
) -> torch.Tensor:
    """One pooled vector per row of a batch.

    A batch from a source whose rows share sequences (``row_seq``, ``row_pos``: the
    sequence and last position of each row, as EHR label rows of one subject share one
    causal pass) reads each row at its own end: ``last`` the state there, ``mean`` the mean
    of the states up to it, ``cls`` the first state; otherwise rows are the batch's
    sequences, pooled over their attention mask.
    """
    hidden = model.forward_batch(batch)
    if "row_seq" not in batch:
        return pool(hidden, batch.get("attention_mask"), pooling)
    seq, pos = batch["row_seq"], batch["row_pos"]
    if pooling == "last":
        return hidden[seq, pos]
    if pooling == "cls":
        return hidden[seq, torch.zeros_like(pos)]
    if pooling == "mean":
        steps = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=torch.float32)
        return (hidden.float().cumsum(1) / steps[None, :, None])[seq, pos].to(hidden.dtype)
    raise ConfigError(f"unknown pooling {pooling!r}", column="pooling")


def _head_outputs(
    model: FoundationModel, batch: dict[str, torch.Tensor], pooling: str
) -> torch.Tensor:
    return model.task_head(pooled_rows(model, batch, pooling))


def _to_scores(raw: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Head outputs → class probabilities (n, n_classes) or regression values (n,)."""
    if spec["task"] == "regression":
        return raw[:, 0] * spec["target_std"] + spec["target_mean"]
    if spec["task"] == "binary":
        p = 1.0 / (1.0 + np.exp(-raw[:, 0].astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1)
    z = raw.astype(np.float64) - raw.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@torch.no_grad()
def _per_row(
    model: FoundationModel,
    source: Any,
    indices: np.ndarray,
    compute,
    width: int,
    batch_size: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    """``compute(batch)`` (one vector of ``width`` per row) over rows ``indices``, in eval
    mode without augmentation, batch by batch; float32 ``(len(indices), width)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(indices), width), dtype=np.float32)
    for start in range(0, len(indices), batch_size):
        batch = {
            k: v.to(device)
            for k, v in source.batch(indices[start : start + batch_size], None).items()
        }
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out[start : start + batch_size] = compute(batch).float().cpu().numpy()
    model.train(was_training)
    return out


def _raw_outputs(
    model: FoundationModel,
    source: Any,
    indices: np.ndarray,
    pooling: str,
    batch_size: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    return _per_row(
        model,
        source,
        indices,
        lambda batch: _head_outputs(model, batch, pooling),
        model.task_head.out_features,
        batch_size,
        bf16,
    )


def predict(
    model: FoundationModel,
    source: Any,
    indices: np.ndarray | None = None,
    batch_size: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    """Predictions of a fine-tuned model for samples ``indices`` of a batch source.

    Returns class probabilities ``(n, n_classes)`` in the order of
    ``config.extra["task_head"]["classes"]``, or regression values ``(n,)``.
    """
    spec = task_spec(model)
    if spec is None or model.task_head is None:
        raise ModelError(
            "this model has no task head; fine-tune it first (healthfm finetune)",
            file=getattr(model, "folder", None),
        )
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    return _to_scores(_raw_outputs(model, source, indices, spec["pooling"], batch_size, bf16), spec)


def load_finetuned(
    path: str | Path, base_dir: str | Path | None = None, merge: bool = False
) -> FoundationModel:
    """Load a fine-tuned model folder, or a LoRA adapter folder onto its base model."""
    from healthfm.evaluate.adapters import is_adapter, load_adapter

    if is_adapter(path):
        return load_adapter(path, base_dir, merge=merge)
    model = load(path)
    if task_spec(model) is None:
        raise ModelError(
            "not a fine-tuned model: config.json has no extra.task_head",
            file=Path(path) / "config.json",
        )
    return model


# ---------------------------------------------------------------------------- data


@dataclass
class _TaskData:
    samples: Samples
    splits: dict[str, np.ndarray]
    spec: dict[str, Any]
    targets: np.ndarray  # class index (int64) or standardized float32 target
    class_weights: np.ndarray | None
    salt: str
    fractions: tuple[float, float, float]
    val_from_train: bool


def _shared_task_input(
    modality: Modality,
    samples: Samples,
    model: FoundationModel,
    salt: str,
    fractions,
    stack: contextlib.ExitStack,
) -> TaskInput:
    """One row per sample: the modality's split, per-sample labels, a temporary token store."""
    if samples.labels is None and type(modality).evaluation_rows is not Modality.evaluation_rows:
        # Labels that are not per sample come through the modality's own evaluate; without
        # a task_input hook, fine-tuning cannot pair them with samples.
        raise ConfigError(
            f"fine-tuning {modality.name!r} data needs per-sample labels; this modality's labels "
            "come through its own evaluate command and it has no fine-tuning rows (task_input)",
            file=samples.source,
        )
    if samples.labels is None:
        require_labels(samples)  # raises the shared "no label column" error
    modality.check_input(samples, model.tokenizer)
    split_names = np.asarray(modality.split(samples, salt, tuple(fractions))).astype(str)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="healthfm-finetune-")))
    store = modality.tokenize(model.tokenizer, samples, tmp / "store")
    source = StoreSource(store, model.config.max_len, getattr(modality, "truncate", "head"))
    return TaskInput(samples, split_names, source)


def _training_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "training_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


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


def _task_data(
    samples: Samples,
    split_names: np.ndarray,
    salt: str,
    fractions,
    config: FinetuneConfig,
    pooling: str,
) -> _TaskData:
    split_names = np.asarray(split_names).astype(str)
    if samples.labels is None:
        require_labels(samples)  # raises the shared "no label column" error
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
    return _TaskData(
        samples, splits, spec, targets, class_weights, salt, tuple(fractions), val_from_train
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


# ---------------------------------------------------------------------------- training


def _loss_terms(spec: dict[str, Any], class_weights: np.ndarray | None, device: torch.device):
    """``f(out, y)`` → the *sum* of the per-sample task-loss terms of a batch.

    The task loss is that sum divided by :func:`_normaliser` (PyTorch's ``mean``
    reductions: MSE and ``pos_weight``-balanced BCE divide by the number of samples,
    class-weighted cross-entropy by the sum of the samples' class weights). Processes that
    hold parts of one batch divide by the *whole* batch's normaliser, so their averaged
    gradients are exactly the one-process gradient.
    """
    task = spec["task"]
    if task == "regression":
        return lambda out, y: F.mse_loss(out[:, 0].float(), y, reduction="sum")
    if task == "binary":
        pos_weight = None
        if class_weights is not None and class_weights[1] > 0:
            pos_weight = torch.tensor(
                class_weights[1] / max(class_weights[0], 1e-12), device=device
            )
        return lambda out, y: F.binary_cross_entropy_with_logits(
            out[:, 0].float(), y.float(), pos_weight=pos_weight, reduction="sum"
        )
    weight = (
        torch.tensor(class_weights, dtype=torch.float32, device=device)
        if class_weights is not None
        else None
    )
    return lambda out, y: F.cross_entropy(out.float(), y, weight=weight, reduction="sum")


def _normaliser(spec: dict[str, Any], class_weights: np.ndarray | None, y: np.ndarray) -> float:
    """The denominator of the mean task loss of a batch with targets ``y``."""
    if spec["task"] == "classification" and class_weights is not None:
        return float(np.asarray(class_weights, dtype=np.float64)[np.asarray(y)].sum())
    return float(len(y))


def _loss_fn(spec: dict[str, Any], class_weights: np.ndarray | None, device: torch.device):
    """The mean task loss ``f(out, y)`` of a whole batch."""
    terms = _loss_terms(spec, class_weights, device)

    def loss(out, y):
        norm = _normaliser(spec, class_weights, y.detach().cpu().numpy())
        return terms(out, y) / max(norm, 1e-12)

    return loss


@torch.no_grad()
def _init_head(
    model: FoundationModel, source: StoreSource, data: _TaskData, config: FinetuneConfig
) -> None:
    """Initialise the task head: from the linear probe of the frozen embedding (LP-FT),
    or small random weights.

    LP-FT (Kumar et al., 2022) starts fine-tuning where the probe ends: the head is the
    probe's standardized logistic (or ridge) regression folded back to raw features
    (``W / sigma``, ``b - W mu / sigma``), so the first epochs adapt the backbone to a good
    head instead of distorting it to fit a random one; with a frozen backbone it is
    exactly the probe.
    """
    head = model.task_head
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    if config.head_init == "random":
        return
    spec = data.spec
    fit_idx = np.concatenate([data.splits["train"], data.splits["val"]])
    pooled = _pooled(model, source, fit_idx, spec["pooling"])
    X, y = pooled.astype(np.float64), data.targets[fit_idx]
    n_train = len(data.splits["train"])
    mu, sigma = X[:n_train].mean(0), X[:n_train].std(0)
    sigma = np.where(sigma > 1e-8, sigma, 1.0)
    if spec["task"] == "regression":
        from sklearn.linear_model import RidgeCV

        reg = RidgeCV(alphas=np.logspace(-2, 4, 7)).fit((X[:n_train] - mu) / sigma, y[:n_train])
        coef, intercept = reg.coef_[None, :], np.atleast_1d(reg.intercept_)
    else:
        from healthfm.evaluate.probe import fit_linear_probe

        probe = fit_linear_probe(
            X[:n_train],
            y[:n_train],
            X[n_train:],
            y[n_train:],
            X[:1],
            refit="train",
            seed=config.seed,
            class_weight="balanced" if config.class_weight else None,
        )
        lr = probe.model[-1]
        mu, sigma = probe.model[0].mean_, probe.model[0].scale_
        if spec["task"] == "binary":
            coef, intercept = lr.coef_, lr.intercept_
        else:
            # Rows for the classes the probe saw; a class absent from train gets a very
            # low logit (it cannot be learnt anyway).
            coef = np.zeros((spec["n_outputs"], X.shape[1]))
            intercept = np.full(spec["n_outputs"], -10.0)
            seen = np.asarray(probe.classes, dtype=int)
            if lr.coef_.shape[0] == 1:  # two classes seen: one logit for the second
                coef[seen[0]], intercept[seen[0]] = 0.0, 0.0
                coef[seen[1]], intercept[seen[1]] = lr.coef_[0], lr.intercept_[0]
            else:
                coef[seen] = lr.coef_
                intercept[seen] = lr.intercept_
    weight = coef / sigma[None, :]
    bias = intercept - weight @ mu
    head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
    head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))


def _pooled(
    model: FoundationModel, source: Any, indices: np.ndarray, pooling: str, batch_size: int = 128
) -> np.ndarray:
    return _per_row(
        model,
        source,
        indices,
        lambda batch: pooled_rows(model, batch, pooling),
        model.config.d_model,
        batch_size,
    )


def _freeze(model: FoundationModel, freeze_layers: int) -> None:
    # The pretraining head is unused by the task loss: never train it.
    for p in model.head.parameters():
        p.requires_grad_(False)
    if freeze_layers > 0:
        for p in model.backbone.embed.parameters():
            p.requires_grad_(False)
        for block in model.backbone.blocks[:freeze_layers]:
            for p in block.parameters():
                p.requires_grad_(False)


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "embed.tokens" not in name else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _validate(config: FinetuneConfig, n_layers: int) -> None:
    if config.task is not None and config.task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}, not {config.task!r}", column="task")
    if not 0 <= config.freeze_layers <= n_layers:
        raise ConfigError(
            f"--freeze-layers {config.freeze_layers} is outside 0..{n_layers} (the model has {n_layers} blocks)",
            column="freeze_layers",
        )
    if config.lora and config.freeze_layers >= n_layers:
        raise ConfigError(
            f"--freeze-layers {config.freeze_layers} leaves no block for LoRA (depth {n_layers})",
            column="freeze_layers",
        )
    if config.merge and not config.lora:
        raise ConfigError("--merge only applies to --lora", column="merge")
    for name in ("epochs", "batch_size", "lora_rank"):
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1", column=name)
    if config.head_init not in ("probe", "random"):
        raise ConfigError(
            f"head_init must be 'probe' or 'random', not {config.head_init!r}", column="head_init"
        )
    if config.patience < 1:
        raise ConfigError("patience must be at least 1", column="patience")
    if config.few_shot is not None and int(config.few_shot) < 1:
        raise ConfigError(
            f"--few-shot must be at least 1, not {config.few_shot}", column="few_shot"
        )
    if not config.learning_rate() > 0:
        raise ConfigError(f"--lr must be positive, not {config.lr}", column="lr")


def finetune(
    model_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    config: FinetuneConfig | None = None,
    modality_name: str | None = None,
    salt: str | None = None,
    fractions=None,
    n_boot: int = 200,
    echo: bool = True,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_at_epoch: int | None = None,
    device: str | None = None,
) -> FinetuneResult | None:
    """Fine-tune a model folder on the labelled input and write the result to ``out``.

    Parameters
    ----------
    model_dir
        The pretrained (or previously fine-tuned) model folder.
    input_path
        Labelled input, read by the model's modality with ``options`` (label column ...).
    out
        Model folder to write (full fine-tuning, or LoRA with ``merge``) or adapter folder
        (LoRA). Written atomically, only after training succeeded.
    options
        Modality reader options, as for ``healthfm evaluate``.
    config
        :class:`FinetuneConfig`.
    modality_name
        The modality the caller expects (checked against the model).
    salt, fractions
        The split; the model's ``training_info.json`` values by default, so the test
        split is the one held out from pretraining and from the probe.
    n_boot
        Bootstrap resamples of the test metrics recorded in the provenance.
    echo
        Print parameter counts, progress per epoch and the test metrics.
    run_dir
        Folder for per-epoch checkpoints (``checkpoints/step-N``, N the epoch: trainable weights, the
        best epoch's weights, optimizer, RNG, history); None: no checkpoints.
    resume
        Continue from the latest checkpoint in ``run_dir`` (same data, rows and settings,
        checked); the result equals an uninterrupted run.
    stop_at_epoch
        Stop after this epoch (checkpointed) without writing ``out``; returns None.
    device
        "cpu" or "cuda" (default: CUDA when available). Under torchrun each process takes
        an equal part of every batch (DDP); only rank 0 writes.

    Returns
    -------
    FinetuneResult or None
        None when stopped by ``stop_at_epoch``.

    Raises
    ------
    ConfigError
        Bad settings (``--freeze-layers`` beyond the depth, unknown task ...).
    DataError
        No labels, one class, labels missing, an empty train split.
    ModelError
        Unreadable model folder.
    """
    from healthfm.train.distributed import barrier, init_distributed

    if run_dir is None and (resume or stop_at_epoch is not None):
        raise ConfigError(
            "--resume and --stop-at-epoch need epoch checkpoints: drop --no-checkpoints "
            "(or give a run folder)",
            column="run_dir",
        )
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    options = options or {}
    model_dir = Path(model_dir)
    base = load(model_dir, modality=modality_name)
    dist_info = init_distributed(device)
    echo = echo and dist_info.is_main
    if base.tokenizer is None:
        raise ModelError("model folder has no tokenizer.json", file=model_dir)
    _validate(config, base.config.n_layers)
    modality = get_modality(base.config.modality)
    info = _training_info(model_dir)
    salt = salt or info.get("split_salt", "healthfm")
    fractions = tuple(fractions or info.get("split_fractions", (0.7, 0.1, 0.2)))
    pooling = config.pooling or base.config.pooling
    samples = modality.read(input_path, options)
    with contextlib.ExitStack() as stack:
        task_input = modality.task_input(samples, options, base, salt, fractions)
        if task_input is None:
            task_input = _shared_task_input(modality, samples, base, salt, fractions, stack)
        samples = task_input.samples
        data = _task_data(samples, task_input.split_names, salt, fractions, config, pooling)
        source = task_input.source
        torch.manual_seed(config.seed)
        model = with_task_head(base, data.spec).to(dist_info.device)
        _init_head(model, source, data, config)
        _freeze(model, config.freeze_layers)
        peft_model = None
        if config.lora:
            from healthfm.evaluate.adapters import add_lora

            peft_model = add_lora(
                model,
                config.lora_rank,
                config.lora_alpha or 2.0 * config.lora_rank,
                config.lora_dropout,
                first_layer=config.freeze_layers,
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if echo:
            print(
                f"fine-tuning ({config.method}, {data.spec['task']}): trainable parameters {trainable:,} "
                f"of {total:,} ({100.0 * trainable / total:.2f}%)"
            )
        try:
            history, best_epoch, best_loss = _fit(
                model,
                source,
                data,
                config,
                echo,
                run_dir=Path(run_dir) if run_dir is not None else None,
                resume=resume,
                dist_info=dist_info,
                base_hash=str(base.model_hash),
                stop_after_epoch=stop_at_epoch,
            )
        except FinetuneStopped as stop:
            if echo:
                print(
                    f"stopped after epoch {stop.epoch}; checkpoint in {run_dir} "
                    "(continue with --resume)"
                )
            return None
        test_scores = None
        if len(data.splits["test"]):
            test_scores = _to_scores(
                _raw_outputs(model, source, data.splits["test"], pooling, bf16=config.bf16),
                data.spec,
            )
    test_metrics = _score(data, test_scores, n_boot, config.seed) if test_scores is not None else {}
    wall = time.perf_counter() - t0
    provenance = {
        "finetune": {
            "method": config.method,
            "config": asdict(config),
            "base_model": str(model_dir.resolve()),
            "base_model_hash": base.model_hash,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "best_val_loss": best_loss,
            "history": history,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "n_train": len(data.splits["train"]),
            "n_val": len(data.splits["val"]),
            "n_test": len(data.splits["test"]),
            "val_carved_from_train": data.val_from_train,
            "few_shot": config.few_shot,
            "rows": task_input.info,
            "test_metrics": test_metrics,
            "wall_seconds": wall,
        },
        "data_hash": samples.data_hash,
        "source": str(samples.source),
        "split_salt": salt,
        "split_fractions": list(fractions),
    }
    out = Path(out)
    if not dist_info.is_main:  # one writer; the others wait until the folder is there
        barrier(dist_info)
        return None
    model.to("cpu")
    if peft_model is not None and not config.merge:
        from healthfm.evaluate.adapters import save_adapter

        with atomic_dir(out) as tmp_out:
            save_adapter(
                peft_model,
                tmp_out,
                model_dir,
                base.model_hash,
                {"task_head": data.spec, "modality": base.config.modality, **provenance},
            )
    else:
        final = peft_model.merge_and_unload() if peft_model is not None else model
        for p in final.parameters():
            p.requires_grad_(False)
        save_pretrained(
            final,
            out,
            base.tokenizer,
            info={**{k: v for k, v in info.items() if k not in provenance}, **provenance},
        )
    if echo:
        line = ", ".join(
            f"{k} {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
            for k, v in test_metrics.items()
            if k in ("auroc", "balanced_accuracy", "r2", "rmse")
        )
        print(
            f"wrote {out}: best epoch {best_epoch} of {len(history)}, val loss {best_loss:.4f}; "
            f"test {line or '-'}; {wall:.1f} s"
        )
    barrier(dist_info)
    return FinetuneResult(
        out=out,
        method=config.method,
        task=data.spec["task"],
        best_epoch=best_epoch,
        epochs_run=len(history),
        best_val_loss=best_loss,
        trainable_parameters=trainable,
        total_parameters=total,
        wall_seconds=wall,
        history=history,
        test_metrics=test_metrics,
        test_indices=data.splits["test"],
        test_scores=test_scores,
    )


class _TaskForward(torch.nn.Module):
    """The head outputs of a batch as ``forward`` (what DistributedDataParallel wraps)."""

    def __init__(self, model: FoundationModel, pooling: str) -> None:
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _head_outputs(self.model, batch, self.pooling)


def _run_fingerprint(data: _TaskData, config: FinetuneConfig, source: Any, base_hash: str) -> str:
    """What a checkpoint must match to be resumed: the data, rows, targets, splits and every
    setting (the epoch count too: it shapes the learning-rate schedule)."""
    import hashlib

    h = hashlib.sha256()
    h.update(
        json.dumps(
            [asdict(config), data.spec, base_hash, data.samples.data_hash], default=str
        ).encode()
    )
    h.update(str(getattr(source, "fingerprint", "")).encode())
    h.update(np.ascontiguousarray(data.targets).tobytes())
    for name in ("train", "val"):
        h.update(np.ascontiguousarray(data.splits[name], dtype=np.int64).tobytes())
    return h.hexdigest()


def _fit(
    model: FoundationModel,
    source: Any,
    data: _TaskData,
    config: FinetuneConfig,
    echo: bool,
    run_dir: Path | None = None,
    resume: bool = False,
    dist_info: Any = None,
    base_hash: str = "",
    stop_after_epoch: int | None = None,
) -> tuple[list[dict[str, float]], int, float]:
    """Epoch loop with early stopping; per-epoch checkpoints in ``run_dir/checkpoints``
    (folders ``step-N`` with N the epoch, the trainer's checkpoint format).

    Under torchrun every process takes an equal part of each batch (DDP averages the
    gradients; the loss is normalised by the whole batch, so the update is the one-process
    one) and computes the same validation loss; only the main process writes.
    """
    from healthfm.train.checkpoint import (
        checkpoint_dirs,
        clean_temporary,
        load_checkpoint,
        save_checkpoint,
    )
    from healthfm.train.distributed import (
        DistInfo,
        all_reduce_mean,
        all_reduce_sum,
        barrier,
        wrap_model,
    )
    from healthfm.train.trainer import TrainConfig

    info = dist_info or DistInfo(device=next(model.parameters()).device)
    device = info.device
    train_idx, val_idx = data.splits["train"], data.splits["val"]
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = TrainConfig(
        steps=total_steps,
        lr=config.learning_rate(),
        min_lr_ratio=0.1,
        warmup_steps=max(1, int(config.warmup_fraction * total_steps)),
    )
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=schedule.lr, betas=(0.9, 0.98)
    )
    named_trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named_trainable.values())
    terms = _loss_terms(data.spec, data.class_weights, device)
    loss_fn = _loss_fn(data.spec, data.class_weights, device)
    pooling = data.spec["pooling"]
    targets = torch.from_numpy(data.targets)
    forward = wrap_model(_TaskForward(model, pooling), info, "ddp")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if config.bf16
        else contextlib.nullcontext
    )
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, since_best = math.inf, 0, None, 0
    step, first_epoch = 0, 1
    ckpt_root = Path(run_dir) / "checkpoints" if run_dir is not None else None
    fingerprint = _run_fingerprint(data, config, source, base_hash)
    if ckpt_root is not None and not resume and checkpoint_dirs(ckpt_root):
        # A fresh run replaces an earlier run's checkpoints (they could not be resumed into
        # this one, and a later --resume must never pick them up).
        if info.is_main:
            for old in checkpoint_dirs(ckpt_root):
                shutil.rmtree(old)
            if echo:
                print(f"  removed the checkpoints of an earlier run in {ckpt_root}")
        barrier(info)
    if ckpt_root is not None and resume and checkpoint_dirs(ckpt_root):
        if info.is_main:
            clean_temporary(ckpt_root)
        ckpt = load_checkpoint(checkpoint_dirs(ckpt_root)[-1], expect={"run": fingerprint})
        state = ckpt["state"]
        with torch.no_grad():
            for name, p in named_trainable.items():
                p.copy_(ckpt["model"][name])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        best = {k[len("best::") :]: v for k, v in ckpt["model"].items() if k.startswith("best::")}
        best_state = {k: v.to(device) for k, v in best.items()} or None
        history, step = state["history"], state["optimizer_step"]
        best_loss, best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        since_best, first_epoch = int(state["since_best"]), int(state["epoch"]) + 1
        if echo and info.is_main:
            print(f"  resumed after epoch {state['epoch']} from {checkpoint_dirs(ckpt_root)[-1]}")
    elif ckpt_root is not None and resume and echo and info.is_main:
        print(f"  no checkpoint in {ckpt_root}: starting from epoch 1")
    stopped = since_best >= config.patience
    # A step progress bar as the pretraining trainer's: only on a terminal, only rank 0.
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (echo and info.is_main and sys.stderr.isatty()),
        desc="finetune",
        unit="step",
        dynamic_ncols=True,
    )
    for epoch in range(first_epoch, config.epochs + 1):
        if stopped:
            break
        forward.train()
        order = train_idx[np.random.default_rng([config.seed, epoch]).permutation(len(train_idx))]
        if hasattr(source, "group_order"):
            # Rows that can share a forward pass (one subject's labels) next to each other;
            # groups in random order, so the epoch stays a function of (seed, epoch).
            order = source.group_order(order)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            mine = np.array_split(idx, info.world_size)[info.rank]
            # Normalise by the whole batch (every process knows it) and undo DDP's average.
            norm = max(_normaliser(data.spec, data.class_weights, data.targets[idx]), 1e-12)
            share = float(info.world_size) / norm
            if len(mine) == 0:
                # Fewer samples than processes (an epoch's last batch): this process still
                # runs forward and backward (DDP needs every rank), with weight zero.
                mine, share = idx[:1], 0.0
            # Sources that augment (tiles) do so for training batches only, seeded per step.
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([config.seed, step, info.rank]).generate_state(1)[0])
            )
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            batch = {k: v.to(device) for k, v in source.batch(mine, generator).items()}
            with autocast():
                loss = terms(forward(batch), targets[mine].to(device)) * share
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            # The parts' losses sum to world_size x the batch's mean loss.
            mean = all_reduce_sum(loss.detach().float(), info) / info.world_size
            total += float(mean) * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{float(mean):.4f}", refresh=False)
            count += len(idx)
        raw = _raw_outputs(model, source, val_idx, pooling, bf16=config.bf16)
        with torch.no_grad():
            val = loss_fn(torch.from_numpy(raw).to(device), targets[val_idx].to(device))
            # Every process computes it; averaging makes the early-stopping decision (and
            # so the collective calls that follow) identical on all of them.
            val_loss = float(all_reduce_mean(val.detach().float().reshape(1), info))
        train_loss = total / max(count, 1)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if echo and info.is_main:
            print(f"  epoch {epoch:>3}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, since_best = val_loss, epoch, 0
            # Only trainable tensors change: keep copies of those (cheap for LoRA).
            best_state = {n: p.detach().clone() for n, p in named_trainable.items()}
        else:
            since_best += 1
            stopped = since_best >= config.patience
        if ckpt_root is not None:
            if info.is_main:
                state_tensors = {n: p.detach() for n, p in named_trainable.items()}
                for n, v in (best_state or {}).items():
                    state_tensors[f"best::{n}"] = v
                save_checkpoint(
                    ckpt_root,
                    epoch,
                    state_tensors,
                    optimizer.state_dict(),
                    {
                        "run": fingerprint,
                        "epoch": epoch,
                        "optimizer_step": step,
                        "history": history,
                        "best_loss": best_loss,
                        "best_epoch": best_epoch,
                        "since_best": since_best,
                    },
                    keep=1,
                )
            barrier(info)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and not stopped:
            if epoch < config.epochs:
                raise FinetuneStopped(epoch)
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for name, value in best_state.items():
                named_trainable[name].copy_(value)
    model.eval()
    return history, best_epoch, best_loss


def _score(
    data: _TaskData, scores: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    test_idx = data.splits["test"]
    # Resample groups (identical sequences, a donor's cells), as evaluate does.
    groups = np.asarray(data.samples.groups)[test_idx].astype(str)
    if data.spec["task"] == "regression":
        y = np.asarray(data.samples.labels[test_idx], dtype=np.float64)
        metrics = regression_metrics(y, scores, n_boot=n_boot, seed=seed, groups=groups)
    else:
        y = data.targets[test_idx]
        keep = y >= 0
        metrics = classification_metrics(
            y[keep], scores[keep], n_boot=n_boot, seed=seed, groups=groups[keep]
        )
    return {
        k: {"value": float(m.value), "ci_low": float(m.ci_low), "ci_high": float(m.ci_high)}
        for k, m in metrics.items()
    }


# ---------------------------------------------------------------------------- evaluate rows


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

    Used by :func:`healthfm.pipeline.evaluate` to put LoRA and full fine-tuning next to
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
                truncate = getattr(modality, "truncate", "head")
                source = StoreSource(store, model.config.max_len, truncate)
                scores = predict(model, source, batch_size=batch_size)
        seed = int(info.get("config", {}).get("seed", 0))
        groups = np.asarray(samples.groups)[test_idx].astype(str)
        if spec["task"] == "regression":
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
    from healthfm.evaluate.adapters import BASE_REF

    # A LoRA adapter folder records its base's split in its reference file.
    info = _training_info(path) or (
        json.loads((path / BASE_REF).read_text()) if (path / BASE_REF).exists() else {}
    )
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


def finetuned_method(
    model: FoundationModel, info: dict[str, Any], path: str | Path, seen: set[str]
) -> str:
    """Result-row method name of a fine-tuned model: ``<preset>-finetune-<method>``, plus
    ``-k<k>`` for a few-shot one and ``@<folder>`` when the name is taken; added to ``seen``."""
    method = f"{model.config.preset or 'model'}-finetune-{info.get('method', 'full')}"
    if info.get("few_shot"):
        method += f"-k{info['few_shot']}"
    if method in seen:
        method = f"{method}@{Path(path).name}"
    seen.add(method)
    return method


def finetuned_spec(path: str | Path) -> dict[str, Any]:
    """The task-head spec (``task``, ``classes`` ...) of a fine-tuned model or LoRA adapter
    folder, read from its metadata without loading weights."""
    from healthfm.evaluate.adapters import BASE_REF, is_adapter

    path = Path(path)
    meta = path / (BASE_REF if is_adapter(path) else "config.json")
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the fine-tuned model's metadata: {exc}", file=meta) from exc
    spec = data.get("task_head") if is_adapter(path) else (data.get("extra") or {}).get("task_head")
    if not spec or "task" not in spec:
        raise ModelError("not a fine-tuned model: no task_head", file=meta)
    return spec


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
    from healthfm.evaluate.adapters import BASE_REF

    for name in (BASE_REF, "training_info.json"):
        if (path / name).is_file():
            return json.loads((path / name).read_text()).get("finetune", {})
    return {}
