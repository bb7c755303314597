"""The task head of a fine-tuned model: its spec, outputs, loss, initialisation and predictions.

A task head is one linear layer on the backbone's pooled output: ``classification``
(softmax over the classes, class-weighted cross-entropy), ``binary`` (one logit,
``pos_weight``-balanced BCE), ``regression`` (one output, MSE on the standardized
target) or ``survival`` (one output, the log relative hazard; Cox's negative partial
log-likelihood with Breslow's ties, the risk set being the batch's rows). Its spec (task, classes, pooling, target scaling, ``n_outputs``) is recorded in
``config.extra["task_head"]``, so :func:`healthfm.load` rebuilds the model strictly.

Any other encoder (a published model) gets its head through
:class:`~healthfm.evaluate.encoder_task.EncoderTaskModel`, on ``encoder.embed``; the
functions here take either (the "task model").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from healthfm.errors import ConfigError, ModelError
from healthfm.model.heads import FoundationModel, pool

TASKS = ("classification", "binary", "regression", "survival")


def task_spec(model: Any) -> dict[str, Any] | None:
    """The task-head spec of a fine-tuned model (``config.extra["task_head"]``, or an
    :class:`~healthfm.evaluate.encoder_task.EncoderTaskModel`'s ``head_spec``), or None."""
    if isinstance(model, FoundationModel):
        return model.config.extra.get("task_head")
    return getattr(model, "head_spec", None)


def with_task_head(base: Any, spec: dict[str, Any], copy_encoder: bool = True) -> Any:
    """A copy of ``base`` that carries a fresh task head of ``spec``.

    A :class:`FoundationModel`: its config records ``spec``; every backbone and
    pretraining-head weight is copied. Any other encoder: an
    :class:`~healthfm.evaluate.encoder_task.EncoderTaskModel` on a copy of it. A task head
    the base already had (fine-tuning a fine-tuned model) is replaced. ``copy_encoder``
    False puts the head on the other encoder itself (a base loaded only to carry saved
    weights).
    """
    if not isinstance(base, FoundationModel):
        from healthfm.evaluate.encoder_task import encoder_with_head

        return encoder_with_head(base, spec, copy_encoder)
    config = replace(base.config, extra={**base.config.extra, "task_head": spec})
    model = FoundationModel(config)
    fresh = ("task_head.", "task_pool.")  # the task model's own parts start afresh
    state = {k: v for k, v in base.state_dict().items() if not k.startswith(fresh)}
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith(fresh)]
    if missing or unexpected:  # pragma: no cover - same config apart from the head
        raise ModelError(
            f"cannot copy the base weights: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.tokenizer = getattr(base, "tokenizer", None)
    model.folder = getattr(base, "folder", None)
    model.model_hash = getattr(base, "model_hash", None)
    return model


# ---------------------------------------------------------------------------- outputs


def pooled_rows(model: Any, batch: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """One pooled vector per row of a batch.

    A task model on another encoder pools as that encoder does (``encoder.embed``). A batch from a source whose rows share sequences (``row_seq``, ``row_pos``: the
    sequence and last position of each row, as EHR label rows of one subject share one
    causal pass) reads each row at its own end: ``last`` the state there, ``mean`` the mean
    of the states up to it, ``cls`` the first state; otherwise rows are the batch's
    sequences, pooled over their attention mask.
    """
    if "row_seq" not in batch and not isinstance(model, FoundationModel):
        return model(batch, pooling)
    hidden = model.forward_batch(batch)
    if pooling == "attention":
        if getattr(model, "task_pool", None) is None or "row_seq" in batch:
            raise ConfigError(
                "attention pooling needs a task model built with it, on rows that are whole "
                "sequences (not prediction-time rows sharing a causal pass)",
                column="pooling",
            )
        return model.task_pool(hidden, batch.get("attention_mask"))
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


def head_outputs(model: Any, batch: dict[str, torch.Tensor], pooling: str) -> torch.Tensor:
    """The task head's raw outputs (logits, or the standardized value) per row."""
    return model.task_head(pooled_rows(model, batch, pooling))


_head_outputs = head_outputs  # the name benchmarks use


def to_scores(raw: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Head outputs → class probabilities (n, n_classes), regression values (n,) or
    survival risks (n,: log relative hazard, higher is earlier)."""
    if spec["task"] == "survival":
        return raw[:, 0].astype(np.float64)
    if spec["task"] == "regression":
        return raw[:, 0] * spec["target_std"] + spec["target_mean"]
    if spec["task"] == "binary":
        p = 1.0 / (1.0 + np.exp(-raw[:, 0].astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1)
    z = raw.astype(np.float64) - raw.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@torch.no_grad()
def per_row(
    model: Any,
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


def raw_outputs(
    model: Any,
    source: Any,
    indices: np.ndarray,
    pooling: str,
    batch_size: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    """The head's raw outputs for rows ``indices`` of a batch source."""
    return per_row(
        model,
        source,
        indices,
        lambda batch: head_outputs(model, batch, pooling),
        model.task_head.out_features,
        batch_size,
        bf16,
    )


def predict(
    model: Any,
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
    return to_scores(raw_outputs(model, source, indices, spec["pooling"], batch_size, bf16), spec)


# ---------------------------------------------------------------------------- loss


def loss_terms(spec: dict[str, Any], class_weights: np.ndarray | None, device: torch.device):
    """``f(out, y)`` → the *sum* of the per-sample task-loss terms of a batch.

    The task loss is that sum divided by :func:`normaliser` (PyTorch's ``mean``
    reductions: MSE and ``pos_weight``-balanced BCE divide by the number of samples,
    class-weighted cross-entropy by the sum of the samples' class weights). Processes that
    hold parts of one batch divide by the *whole* batch's normaliser, so their averaged
    gradients are exactly the one-process gradient.
    """
    task = spec["task"]
    if task == "survival":
        return lambda out, y: cox_partial_likelihood(out[:, 0].float(), y[:, 0], y[:, 1])
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


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor):
    """Cox's negative partial log-likelihood (Breslow's ties), summed over the events.

    For each row with an event, ``risk_i - log Σ_{j: t_j >= t_i} exp(risk_j)``; the risk
    sets are formed among the given rows (a minibatch: the usual stochastic Cox loss of
    DeepSurv and its successors). :func:`normaliser` divides by the number of events.
    """
    order = torch.argsort(time, descending=True)
    r, t, e = risk[order], time[order], event[order].float()
    log_sum = torch.logcumsumexp(r, dim=0)
    # Tied times share one risk set: everyone at or after the time, i.e. up to the last
    # of the tie in this descending order.
    _, counts = torch.unique_consecutive(t, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    log_sum = log_sum[torch.repeat_interleave(last, counts)]
    return -(e * (r - log_sum)).sum()


def normaliser(spec: dict[str, Any], class_weights: np.ndarray | None, y: np.ndarray) -> float:
    """The denominator of the mean task loss of a batch with targets ``y`` (a survival
    task: its number of events)."""
    if spec["task"] == "survival":
        return float(max(np.asarray(y)[:, 1].sum(), 1.0))
    if spec["task"] == "classification" and class_weights is not None:
        return float(np.asarray(class_weights, dtype=np.float64)[np.asarray(y)].sum())
    return float(len(y))


def loss_fn(spec: dict[str, Any], class_weights: np.ndarray | None, device: torch.device):
    """The mean task loss ``f(out, y)`` of a whole batch."""
    terms = loss_terms(spec, class_weights, device)

    def loss(out, y):
        norm = normaliser(spec, class_weights, y.detach().cpu().numpy())
        return terms(out, y) / max(norm, 1e-12)

    return loss


class TaskLoss(torch.nn.Module):
    """The trainer's loss module for fine-tuning: the *sum* of the task-loss terms of a
    batch (``batch["targets"]``); the trainer divides by the whole batch's
    :func:`normaliser`."""

    #: FSDP must hook the backbone pass (the task head is its own FSDP unit).
    fsdp_methods = ("forward_batch",)

    def __init__(
        self,
        model: Any,
        spec: dict[str, Any],
        class_weights: np.ndarray | None,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.model = model
        self.pooling = spec["pooling"]
        self.terms = loss_terms(spec, class_weights, device)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        targets = batch["targets"]
        return self.terms(head_outputs(self.model, batch, self.pooling), targets), len(targets)


# ---------------------------------------------------------------------------- initialisation


@torch.no_grad()
def init_head(
    model: Any,
    source: Any,
    data: Any,
    head_init: str,
    seed: int,
    class_weight: bool,
) -> None:
    """Initialise the task head: from the linear probe of the frozen embedding (LP-FT),
    or small random weights.

    LP-FT (Kumar et al., 2022) starts fine-tuning where the probe ends: the head is the
    probe's standardized logistic (or ridge) regression folded back to raw features
    (``W / sigma``, ``b - W mu / sigma``), so the first epochs adapt the backbone to a good
    head instead of distorting it to fit a random one; with a frozen backbone it is
    exactly the probe. ``data`` holds the spec, splits and targets
    (:class:`~healthfm.evaluate.task_data.TaskData`).
    """
    head = model.task_head
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    if head_init == "random":
        return
    if data.spec["task"] == "survival":
        raise ConfigError(
            "--head-init probe is not available for a survival head; use random",
            column="head_init",
        )
    spec = data.spec
    fit_idx = np.concatenate([data.splits["train"], data.splits["val"]])
    pooled = per_row(
        model,
        source,
        fit_idx,
        lambda batch: pooled_rows(model, batch, spec["pooling"]),
        model.dim,
    )
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
            seed=seed,
            class_weight="balanced" if class_weight else None,
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
