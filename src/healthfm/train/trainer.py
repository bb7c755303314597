"""The training loop: one loop for pretraining, fine-tuning and the slide-level MIL head.

What is trained is a *loss module*: ``forward(batch) -> (loss, n)``. Pretraining wraps a
:class:`FoundationModel` in :class:`PretrainingLoss` (masked or next-token targets are
made per micro-batch by :mod:`healthfm.train.objectives`); fine-tuning passes a task-head
loss (:class:`healthfm.evaluate.task_head.TaskLoss`), the MIL head its own
(:mod:`healthfm.pathology.mil`). Around it everything exists once: AdamW over parameter
groups, linear warm-up then cosine (or constant) learning rate, gradient accumulation,
clipping, bf16 autocast, a *batch plan* (which rows make each global batch; each batch is
cut into one part per accumulation micro-step and process), held-out evaluation with
optional early stopping and best-weights restore, a progress bar, a JSONL log, atomic
checkpoints and exact resume (the bar, the log and the ETA lines are
:mod:`healthfm.train.progress`; the checkpoint files :mod:`healthfm.train.checkpoint`). Single process by default; under torchrun each rank trains
on its part of every global batch, replicated (DDP) or sharded (FSDP2), see
:mod:`healthfm.train.distributed`.

Interruption: on SIGTERM or SIGUSR1 (what cluster schedulers send before killing a job)
the loop finishes the current step, saves a checkpoint and raises
:class:`~healthfm.errors.TrainingInterrupted` (the CLI exits 128 + the signal number,
saying how to resume). Checkpoints come every ``checkpoint_every`` steps *and* every
``checkpoint_minutes`` of wall time, so a kill loses at most that much work. The run
prints its plan (steps × batch × context = tokens) and, as it goes, its throughput and
ETA, to stderr and to ``train_log.jsonl``, with or without a terminal.

A run counts optimizer steps, or epochs (``TrainConfig.epochs``): then the held-out
evaluation, early stopping and checkpoints come at epoch ends, checkpoints are numbered by
epoch, and each epoch adds a row (epoch, mean train loss, val loss) to ``history``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthfm.errors import CheckpointError, ConfigError, TrainingInterrupted
from healthfm.fsutil import json_hash
from healthfm.model.heads import FoundationModel
from healthfm.tokens import TokenStore
from healthfm.train import distributed as D
from healthfm.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    split_best,
    with_best,
)
from healthfm.train.data import (
    BatchSource,
    EpochBatches,
    SourceBatches,
    TaskEpochs,
    as_source,
    seed_of,
)
from healthfm.train.objectives import prepare
from healthfm.train.progress import LOG_NAME, TrainProgress, plan_line, truncate_log

SCHEDULES = ("cosine", "constant")
#: Signals that checkpoint and stop a run (schedulers send them before a kill).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings.

    Attributes
    ----------
    steps
        Optimizer steps (with ``epochs``: set to epochs × the plan's steps per epoch).
    batch_size
        Global batch size: samples per optimizer step, summed over processes and
        accumulation micro-steps (so it stays the same whatever the process count).
    micro_batch_size
        Samples per forward pass on one process; ``None`` means the whole per-process
        share of the batch (no accumulation).
    lr, weight_decay, betas, fused
        AdamW settings (by default no weight decay on biases, norms and embeddings);
        ``fused`` is AdamW's flag: False the single-tensor kernels, None torch's default
        (foreach on GPU).
    warmup_steps, min_lr_ratio, schedule
        Linear warm-up, then "cosine" decay to ``lr * min_lr_ratio`` or a "constant" rate.
    grad_clip
        Maximum global gradient norm (0 disables).
    bf16
        bf16 autocast for the forward pass.
    mask_prob
        Fraction of tokens masked by the masked-token objective.
    eval_every, eval_batches
        Held-out evaluation every N steps (epochs) over the first M batches of the
        validation store (the pretraining loss; a caller's ``evaluate`` hook decides itself).
    checkpoint_every, keep_checkpoints
        Save every N steps (epochs), and at the end; keep the last K.
    checkpoint_minutes
        Also save when this many minutes passed since the last save (at a step, or with
        ``epochs`` an epoch end); None or 0: only by count.
    report
        Print the plan, throughput and ETA to stderr (the log file gets them always).
    log_every
        Steps between JSONL log rows.
    seed
        Seeds data order and masking; the caller seeds initialization.
    num_workers
        DataLoader workers.
    truncate
        "head" or "tail": which end of a too-long sample to keep.
    progress
        Show a progress bar (default: only when stderr is a terminal).
    pack
        Pack the samples of each micro-batch into rows of ``max_len`` tokens with a
        block-diagonal attention mask (token stores only) instead of padding each sample
        to the longest one: the same samples and targets, far fewer pad tokens when
        lengths are skewed.
    epochs
        Count epochs instead of steps (see the module docstring); None: steps.
    patience
        Early stopping: stop after this many held-out evaluations without a better value
        (by more than 1e-6) and restore the best weights at the end; None: never.
    """

    steps: int = 1000
    batch_size: int = 64
    micro_batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    mask_prob: float = 0.15
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 500
    checkpoint_minutes: float | None = 30.0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    truncate: str = "head"
    progress: bool | None = None
    pack: bool = False
    epochs: int | None = None
    patience: int | None = None
    schedule: str = "cosine"
    fused: bool | None = False
    report: bool = True

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first setting out of range; return self.

        Run before any work (no run folder, no token store is written for a bad setting).
        """
        at_least = {
            "steps": 1,
            "batch_size": 1,
            "warmup_steps": 0,
            "eval_every": 0,
            "eval_batches": 1,
            "checkpoint_every": 0,
            "keep_checkpoints": 0,
            "log_every": 1,
            "num_workers": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be an integer of at least {low}, not {value!r}",
                    column=name,
                )
        for name in ("micro_batch_size", "epochs", "patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | np.integer) or value < 1):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be at least 1, not {value!r}", column=name
                )
        try:
            lr = float(self.lr)
        except (TypeError, ValueError):
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"--lr must be a positive number, not {self.lr!r}", column="lr")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a non-negative number, not {value!r}",
                    column=name,
                )
        if self.checkpoint_minutes is not None and not (
            math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0
        ):
            raise ConfigError(
                f"--checkpoint-minutes must be a non-negative number, not {self.checkpoint_minutes!r}",
                column="checkpoint_minutes",
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(
                f"mask_prob must be in (0, 1), not {self.mask_prob}", column="mask_prob"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}", column="min_lr_ratio"
            )
        if self.truncate not in ("head", "tail"):
            raise ConfigError(
                f"truncate must be 'head' or 'tail', not {self.truncate!r}", column="truncate"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}", column="schedule"
            )
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


def _generator(*parts: int) -> torch.Generator:
    # One reproducible stream per (seed, stream, step, part): masks do not depend on
    # process count.
    return torch.Generator().manual_seed(seed_of(*parts))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms and token embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "embed.tokens" not in name else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class PretrainingLoss(torch.nn.Module):
    """Module whose forward is the pretraining loss.

    DDP synchronises gradients only through its wrapped module's ``forward``, so the
    loss (not the hidden states) must be what that forward returns.
    """

    #: Methods of the inner model that FSDP must treat as forward passes.
    fsdp_methods = ("pretraining_loss",)

    def __init__(self, model: FoundationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.model.pretraining_loss(batch)


class Trainer:
    """Train a model: pretraining by default; any loss module, batch plan and evaluation.

    Parameters
    ----------
    model
        The model whose weights are trained (seed it before building it), e.g. a
        :class:`FoundationModel`; checkpoints, the optimizer and FSDP work on it.
    train_store
        Training data: a token store or any :class:`~healthfm.train.data.BatchSource`.
    config
        :class:`TrainConfig`.
    run_dir
        Folder for ``checkpoints/`` and ``train_log.jsonl``; None: neither.
    val_store
        Held-out data (store or source) for the pretraining held-out loss, or None.
    augment
        Optional ``f(batch, generator) -> batch`` applied before the objective.
    dist_info
        Process placement; read from the environment when None.
    strategy
        "ddp" (replicas) or "fsdp" (FSDP2 sharding of parameters, gradients and optimizer
        state); only matters under torchrun. Checkpoints are the same either way.
    loss
        The loss module (``forward(batch) -> (loss, n)``, holding ``model`` as ``.model``);
        default :class:`PretrainingLoss`, whose batches get the objective's targets.
    batches
        The batch plan; default :class:`~healthfm.train.data.EpochBatches` over the source.
    evaluate
        ``f() -> float | None``: the held-out value (lower is better) for the log and early
        stopping; default the mean loss over the first ``eval_batches`` of ``val_store``.
    groups
        ``f(model) -> AdamW parameter groups``; default :func:`param_groups`.
    normaliser
        ``f(rows of a global batch) -> float``: the loss module returns *sums* of per-row
        terms and each part's loss is divided by the whole batch's normaliser (so the
        processes' averaged gradient is the one-process gradient). None: the loss module
        returns means, averaged over parts.
    identity
        What a checkpoint must match to be resumed; default the model config hash, the
        source fingerprint, the batch size and the seed.
    name
        Label of the progress bar.
    on_epoch_end
        ``f(history_row)`` after each epoch's evaluation (main process only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_store: TokenStore | BatchSource,
        config: TrainConfig,
        run_dir: str | Path | None,
        val_store: TokenStore | BatchSource | None = None,
        augment=None,
        dist_info: D.DistInfo | None = None,
        strategy: str = "ddp",
        *,
        loss: torch.nn.Module | None = None,
        batches: EpochBatches | TaskEpochs | None = None,
        evaluate: Callable[[], float | None] | None = None,
        groups: Callable[[torch.nn.Module], list[dict[str, Any]]] | None = None,
        normaliser: Callable[[np.ndarray], float] | None = None,
        identity: dict[str, Any] | None = None,
        name: str = "pretrain",
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        config.validate()
        self.info = dist_info or D.init_distributed()
        self.model = model.to(self.info.device)
        model_config = getattr(model, "config", None)
        max_len = getattr(model_config, "max_len", None)
        self.train_store = as_source(train_store, max_len, config.truncate, pack=config.pack)
        self.val_store = (
            as_source(val_store, max_len, config.truncate) if val_store is not None else None
        )
        self.augment = augment
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if strategy not in D.STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose one of {D.STRATEGIES}")
        if config.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {config.schedule!r}; choose one of {SCHEDULES}")
        self.strategy = strategy
        # Pretraining makes each micro-batch's targets from the model's objective.
        self.objective = model_config.objective if loss is None else None
        if config.pack and (loss is not None or getattr(model, "_loss_fn", None) is not None):
            raise ConfigError(
                f"packing needs a token-level objective (masked or causal), not {getattr(model_config, 'objective', None)!r}"
            )
        self.batches = batches or EpochBatches(len(train_store), config.batch_size, config.seed)
        world = self.info.world_size
        micro = config.micro_batch_size or max(1, config.batch_size // world)
        if self.batches.equal_parts and config.batch_size % (micro * world):
            raise ConfigError(
                f"batch size {config.batch_size} is not a multiple of micro batch {micro} × {world} processes"
            )
        self.micro_batch_size = micro
        self.accumulation = max(1, config.batch_size // (micro * world))
        if config.epochs is not None:
            config = replace(config, steps=config.epochs * self.batches.steps_per_epoch)
        self.config = config
        self.normaliser = normaliser
        self._evaluate = evaluate
        self.name = name
        self.on_epoch_end = on_epoch_end
        # FSDP replaces the parameters by sharded ones: build the optimizer afterwards.
        self.wrapped = D.wrap_model(loss or PretrainingLoss(self.model), self.info, strategy)
        self.optimizer = torch.optim.AdamW(
            (groups or (lambda m: param_groups(m, config.weight_decay)))(self.model),
            lr=config.lr,
            betas=config.betas,
            fused=config.fused,
        )
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        # Checkpoints hold only the trained weights when some are frozen (LoRA: cheap).
        some_frozen = len(self.trainable) < len(list(self.model.parameters()))
        self.frozen = (
            sorted(set(self.model.state_dict()) - set(self.trainable)) if some_frozen else []
        )
        self.step = 0
        self.position = 0
        self._prefetch = None
        self.history: list[dict[str, Any]] = []
        self.best_loss, self.best_at, self.since_best = math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.early_stopped = False
        self.last_checkpoint: Path | None = None
        self._signal: int | None = None
        self._last_save = time.monotonic()
        self.identity = identity or {
            "model_config_hash": json_hash(model_config.to_dict()) if model_config else None,
            "tokenizer_hash": self.train_store.fingerprint,
            "batch_size": config.batch_size,
            "seed": config.seed,
        }

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps``; with ``resume``, continue from the latest checkpoint.

        ``stop_at`` ends this call early at that step (epoch), after checkpointing it, as
        a job with a time limit would; a later ``fit(resume=True)`` continues exactly.

        Returns
        -------
        dict
            Summary: steps, final train and val loss, tokens/s, wall seconds (and, counting
            epochs, the history and the best epoch).
        """
        resumed = self.resume() if resume else False
        if self.run_dir is not None and self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._stop_signals():
            return self._fit(resumed, stop_at)

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training: SIGTERM / SIGUSR1 ask the loop to checkpoint and stop."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only note it: the loop saves at the end of the current step (a consistent state).
        self._signal = signum

    def _stop_now(self, at_end: bool) -> tuple[bool, bool]:
        """(signalled, checkpoint due by time), agreed by every rank (one tiny all-reduce
        per step under torchrun: each rank must take the same decision, or collectives hang)."""
        minutes = self.config.checkpoint_minutes
        timed = bool(minutes and at_end and time.monotonic() - self._last_save >= minutes * 60.0)
        flags = torch.tensor(
            [float(self._signal is not None), float(timed)],
            dtype=torch.float64,
            device=self.info.device,
        )
        if self.info.distributed:
            flags = D.all_reduce_sum(flags, self.info)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _say(self, text: str) -> None:
        """A line for the user on stderr (main process), flushed: a batch job's log file
        gets it as a terminal would (the progress bar is off without a terminal). The
        JSONL log's step rows carry the same numbers (``steps_per_s``, ``eta_s``)."""
        if self.info.is_main and self.config.report:
            print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def plan(self) -> dict[str, Any]:
        """Steps, global batch and context of the run, and the token slots they make."""
        context = getattr(getattr(self.model, "config", None), "max_len", None)
        steps = self.config.steps - self.step
        plan = {"steps": steps, "batch_size": self.config.batch_size, "context": context}
        if context:
            plan["tokens"] = int(steps * self.config.batch_size * context)
        return plan

    def _fit(self, resumed: bool, stop_at: int | None) -> dict[str, Any]:
        cfg = self.config
        self.model.train()
        per_epoch = self.batches.steps_per_epoch if cfg.epochs is not None else None
        end = cfg.steps if stop_at is None else min(stop_at * (per_epoch or 1), cfg.steps)
        progress = self._progress(end)
        self._say(
            plan_line(
                self.plan(),
                cfg.checkpoint_every,
                cfg.checkpoint_minutes,
                self.checkpoint_root if self.run_dir is not None else None,
            )
        )
        self._last_save = time.monotonic()
        epoch_loss, epoch_rows = 0.0, 0
        val_loss = None
        loader = self._worker_loader(end) if cfg.num_workers > 0 else None
        self._prefetch = iter(loader) if loader is not None else None
        while self.step < end and not self.early_stopped:
            result = self.train_step()
            progress.step_done(self.step, result)
            epoch_loss += result["loss"] * result["rows"]
            epoch_rows += result["rows"]
            # Evaluation and checkpoints count steps, or epochs at epoch ends.
            if per_epoch is None:
                count, at_end = self.step, True
            else:
                count, at_end = self.step // per_epoch, self.step % per_epoch == 0
            evaluated = None
            if (
                at_end
                and cfg.eval_every
                and (count % cfg.eval_every == 0 or self.step == cfg.steps)
            ):
                val_loss = evaluated = self._held_out_step(count)
            if per_epoch is not None and at_end:
                self._end_epoch(count, epoch_loss / max(epoch_rows, 1), evaluated)
                epoch_loss, epoch_rows = 0.0, 0
            self._checkpoint_if_due(count, at_end, end, progress)
        progress.close()
        self._prefetch = None
        del loader  # stops the workers
        if self.step >= cfg.steps or self.early_stopped:
            self.restore_best()
        return self._summary(resumed, progress, val_loss)

    def _progress(self, end: int) -> TrainProgress:
        """The bar, log window and ETA lines of a ``fit`` call from this step to ``end``."""
        cfg = self.config
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        return TrainProgress(
            self._say,
            self._log,
            cfg.lr_at,
            name=self.name,
            steps=cfg.steps,
            first_step=self.step,
            end=end,
            log_every=cfg.log_every,
            show_bar=bool(show and self.info.is_main),
            on_cpu=self.info.device.type == "cpu",
        )

    def _held_out_step(self, count: int) -> float | None:
        """The held-out value at step (epoch) ``count``: logged, and fed to early stopping."""
        value = self.evaluate()
        if value is not None:
            self._log({"step": self.step, "val_loss": value})
            self._early_stopping(value, count)
        return value

    def _end_epoch(self, epoch: int, train_loss: float, val_loss: float | None) -> None:
        """Add epoch ``epoch``'s row to ``history`` and hand it to ``on_epoch_end``."""
        row = {"epoch": epoch, "train_loss": train_loss}
        row["val_loss"] = val_loss
        self.history.append(row)
        if self.on_epoch_end is not None and self.info.is_main:
            self.on_epoch_end(row)

    def _checkpoint_if_due(
        self, count: int, at_end: bool, end: int, progress: TrainProgress
    ) -> None:
        """Save when a count, the clock, the run's end, early stopping or a signal says so;
        after a signal, stop with :class:`TrainingInterrupted`."""
        cfg = self.config
        signalled, timed = self._stop_now(at_end)
        due = cfg.checkpoint_every and count % cfg.checkpoint_every == 0
        if signalled or (
            at_end and (due or timed or self.step in (cfg.steps, end) or self.early_stopped)
        ):
            self.save()
        if signalled:
            progress.close()
            self._prefetch = None
            name = signal.Signals(self._signal).name if self._signal else "a stop signal"
            where = self.last_checkpoint or self.run_dir
            self._say(f"{name} received: checkpointed step {self.step} in {where}")
            raise TrainingInterrupted(
                f"stopped by {name} after step {self.step} of {cfg.steps}; the checkpoint "
                "is saved: run the same command with --resume to continue",
                file=where,
                signal=self._signal or 0,
            )

    def _summary(
        self, resumed: bool, progress: TrainProgress, val_loss: float | None
    ) -> dict[str, Any]:
        """What ``fit`` returns (see there)."""
        wall = progress.wall_seconds()
        summary = {
            "steps": self.step,
            "resumed": resumed,
            "train_loss": progress.last_loss,
            "val_loss": val_loss,
            "tokens_per_s": progress.tokens_total / wall if wall > 0 else None,
            "wall_seconds": wall,
            "world_size": self.info.world_size,
        }
        if self.config.epochs is not None:
            summary.update(
                epochs_run=len(self.history),
                history=self.history,
                best_epoch=self.best_at,
                best_val_loss=self.best_loss,
                early_stopped=self.early_stopped,
            )
        return summary

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: every micro-batch of this rank, clipping, AdamW, then step += 1.

        Returns
        -------
        dict
            ``loss`` (the global batch's loss: mean over parts, or the normalised sum),
            ``tokens`` (real tokens of the whole global batch, all ranks), ``rows`` (rows
            of the global batch) and ``grad_norm`` (before clipping).
        """
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        rows, parts = self._parts(self.position)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        tokens = 0
        for micro, (part, indices, scale) in enumerate(parts):
            batch = self._micro_batch(self.step, part, indices)
            sync = micro == self.accumulation - 1
            # Gradients are reduced across ranks only on the last micro-step.
            ctx = contextlib.nullcontext() if sync else D.no_grad_sync(self.wrapped, self.info)
            with ctx:
                with self._autocast():
                    loss, _ = self.wrapped(batch)
                if scale is not None:
                    loss = loss * scale
                (loss / self.accumulation).backward()
            step_loss += loss.detach().double() / self.accumulation
            tokens += _n_tokens(batch)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if cfg.grad_clip > 0
            else torch.tensor(float("nan"))
        )
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += 1
        local = torch.stack(
            [step_loss, torch.tensor(float(tokens), dtype=torch.float64, device=self.info.device)]
        )
        sums = D.all_reduce_sum(local, self.info)
        return {
            "loss": float(sums[0]) / self.info.world_size,
            "tokens": int(sums[1]),
            "rows": len(rows),
            "grad_norm": float(grad_norm),
        }

    def _parts(
        self, position: int
    ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, float | None]]]:
        """The global batch at ``position``, and this rank's parts: (part, rows, loss scale).

        Part ``micro * world + rank`` is this rank's rows of micro-step ``micro``. With a
        normaliser every part's summed loss is scaled by ``n_parts / normaliser(batch)``:
        DDP and accumulation then average the parts into the whole batch's loss. A part
        without rows (more parts than rows) still runs forward and backward on the first
        row with scale zero: every rank must take part in the gradient reduction.
        """
        batch = self.batches.batch(position)
        world, rank = self.info.world_size, self.info.rank
        n_parts = self.accumulation * world
        scale = None
        if self.normaliser is not None:
            scale = float(n_parts) / max(self.normaliser(batch), 1e-12)
        parts = []
        for micro in range(self.accumulation):
            part = micro * world + rank
            rows = np.array_split(batch, n_parts)[part]
            if len(rows) == 0:
                parts.append((part, batch[:1], 0.0))
            else:
                parts.append((part, rows, scale))
        return batch, parts

    def _micro_batch(self, step: int, part: int, indices: np.ndarray) -> dict[str, torch.Tensor]:
        gen = _generator(self.config.seed, 1, step, part)
        if self._prefetch is not None:
            batch = next(self._prefetch)  # built by a DataLoader worker from the same plan
        else:
            # Its own stream (not ``gen``): identical whether a worker builds it or not.
            source_gen = torch.Generator().manual_seed(self.batches.source_seed(step, part))
            batch = self.train_store.batch(indices, source_gen)
        if self.augment is not None:
            batch = self.augment(batch, gen)
        if self.objective is not None:
            config = self.model.config
            batch = prepare(batch, self.objective, gen, config.vocab_size, self.config.mask_prob)
        return self._to_device(batch)

    def _worker_loader(self, end: int) -> torch.utils.data.DataLoader:
        """Batches of steps ``self.step .. end`` built in ``num_workers`` DataLoader workers.

        The plan (indices and generator seed of every micro-batch, in the order the loop
        consumes them) is fixed up front from the step and data position, so batches and
        augmentations are the same as without workers, and a resumed run continues exactly.
        """
        plan = []
        for offset, step in enumerate(range(self.step, end)):
            for part, indices, _ in self._parts(self.position + offset)[1]:
                plan.append((indices, self.batches.source_seed(step, part)))
        return torch.utils.data.DataLoader(
            SourceBatches(self.train_store),
            sampler=plan,
            batch_size=None,
            num_workers=self.config.num_workers,
            prefetch_factor=4,
        )

    def _autocast(self):
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}

    def _log(self, row: dict[str, Any]) -> None:
        if self.info.is_main and self.run_dir is not None:
            with open(self.run_dir / LOG_NAME, "a") as handle:
                handle.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float | None:
        """The held-out value: the ``evaluate`` hook, or :meth:`held_out_loss`."""
        return self._evaluate() if self._evaluate is not None else self.held_out_loss()

    @torch.no_grad()
    def held_out_loss(self) -> float | None:
        """Mean held-out loss over the first ``eval_batches`` batches of the val store."""
        if self.val_store is None or len(self.val_store) == 0:
            return None
        self.model.eval()
        total, count = 0.0, 0
        size = self.micro_batch_size
        world, rank = self.info.world_size, self.info.rank
        n_batches = min(self.config.eval_batches, math.ceil(len(self.val_store) / size))
        # Batches are dealt round-robin; under FSDP every rank must run as many forward
        # passes as the others (each one all-gathers), so a rank without a batch runs
        # batch 0 again and gives it zero weight.
        sharded = D.is_sharded(self.model)
        for r in range(math.ceil(n_batches / world)):
            b = r * world + rank
            if b >= n_batches and not sharded:
                continue
            weight = 1.0 if b < n_batches else 0.0
            b = b if b < n_batches else 0
            idx = np.arange(b * size, min((b + 1) * size, len(self.val_store)))
            batch = self.val_store.batch(idx, None)
            if self.objective is not None:
                gen = _generator(self.config.seed, 2, b)
                config = self.model.config
                batch = prepare(
                    batch, self.objective, gen, config.vocab_size, self.config.mask_prob
                )
            with self._autocast():
                # Sharded: through the FSDP hooks; otherwise the bare module (no DDP hooks).
                module = self.wrapped if sharded else D.unwrap(self.wrapped)
                loss, n = module(self._to_device(batch))
            total += float(loss) * n * weight
            count += n * weight
        sums = D.all_reduce_sum(
            torch.tensor([total, float(count)], dtype=torch.float64, device=self.info.device),
            self.info,
        )
        self.model.train()
        return float(sums[0] / sums[1]) if sums[1] > 0 else None

    def _early_stopping(self, value: float, count: int) -> None:
        # Every rank computes the same value, so every rank takes the same decision.
        if self.config.patience is None:
            return
        if value < self.best_loss - 1e-6:
            self.best_loss, self.best_at, self.since_best = value, count, 0
            # Only trainable tensors change: keep copies of those (cheap for LoRA).
            self.best_state = {n: p.detach().clone() for n, p in self.trainable.items()}
        else:
            self.since_best += 1
            self.early_stopped = self.since_best >= self.config.patience

    @torch.no_grad()
    def restore_best(self) -> None:
        """Put the best evaluation's weights back (runs with early stopping)."""
        for name, value in (self.best_state or {}).items():
            self.trainable[name].copy_(value)

    # ------------------------------------------------------------------ state
    @property
    def checkpoint_root(self) -> Path:
        """Where checkpoints go."""
        if self.run_dir is None:
            raise ConfigError("this run has no run folder for checkpoints", column="run_dir")
        return self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        """Checkpoint the current step (epoch); nothing without a run folder.

        Every rank takes part (sharded states are gathered); only the main rank writes,
        full tensors keyed by parameter name, so any process count can load it.
        """
        if self.run_dir is None:
            return None
        path = None
        model_state = D.full_model_state(self.model, self.info)
        if self.frozen:
            model_state = {n: v for n, v in model_state.items() if n in self.trainable}
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer, self.info)
        # Every rank gathers the best weights too (a collective under FSDP): not inside
        # the main-only branch below, where rank 1 would wait at the barrier forever.
        tensors = with_best(model_state, self.best_state)
        rng_states = D.gather_objects(torch.get_rng_state(), self.info)
        if self.info.is_main:
            state = {
                **self.identity,
                "position": self.position,
                "optimizer_step": self.step,
                "world_size": self.info.world_size,
                "strategy": self.strategy,
                "train_config": _jsonable(asdict(self.config)),
                "weights": "trainable" if self.frozen else "all",
            }
            number = self.step
            if self.config.epochs is not None:
                number = self.step // self.batches.steps_per_epoch
                state.update(epoch=number, history=self.history)
            if self.config.patience is not None:
                state.update(
                    best_loss=self.best_loss, best_at=self.best_at, since_best=self.since_best
                )
            path = save_checkpoint(
                self.checkpoint_root,
                number,
                tensors,
                optimizer_state,
                state,
                keep=self.config.keep_checkpoints,
                rng_states=rng_states,
            )
            self.last_checkpoint = path
        self._last_save = time.monotonic()
        D.barrier(self.info)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; False if there is none."""
        if path is None:
            path = latest_checkpoint(self.checkpoint_root, self.info)
            if path is None:
                return False
        ckpt = load_checkpoint(path, expect=self.identity)
        state = ckpt["state"]
        weights, best = split_best(ckpt["model"])
        try:
            D.load_full_state(
                self.model,
                self.optimizer,
                weights,
                ckpt["optimizer"],
                may_lack=self.frozen if state.get("weights") == "trainable" else (),
            )
            self.best_state = {n: D.like(v, self.trainable[n]) for n, v in best.items()} or None
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not fit this model: {exc}", file=path) from exc
        restore_rng(ckpt["rng"], self.info)
        self.step = int(state.get("optimizer_step", state["step"]))
        self.position = int(state["position"])
        self.history = list(state.get("history", []))
        self.best_loss = float(state.get("best_loss", math.inf))
        self.best_at = int(state.get("best_at", 0))
        self.since_best = int(state.get("since_best", 0))
        patience = self.config.patience
        self.early_stopped = patience is not None and self.since_best >= patience
        self.last_checkpoint = Path(path)
        if self.info.is_main and self.run_dir is not None:
            truncate_log(self.run_dir / LOG_NAME, self.step)
        return True

    def discard_checkpoints(self) -> list[Path]:
        """Remove the checkpoints of an earlier run (a fresh run must never resume them)."""
        found = checkpoint_dirs(self.checkpoint_root) if self.run_dir is not None else []
        if found and self.info.is_main:
            for old in found:
                shutil.rmtree(old)
        D.barrier(self.info)
        return found

    def export_model(self, build: Callable[[], torch.nn.Module] | None = None):
        """The trained model as a plain (unsharded, unwrapped) module, for saving.

        Collective under FSDP: every rank calls it; the main rank gets a fresh model from
        ``build()`` (default: a :class:`FoundationModel` of the same config) holding the
        gathered weights, the others None. Without FSDP it is the model itself.
        """
        if not D.is_sharded(self.model):
            return self.model
        state = D.full_model_state(self.model, self.info)
        if not self.info.is_main:
            return None
        plain = build() if build is not None else FoundationModel(self.model.config)
        plain.load_state_dict(state, strict=True)
        return plain


def _n_tokens(batch: dict[str, torch.Tensor]) -> int:
    # Real tokens of a token batch; rows of any other batch.
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return len(next(iter(batch.values())))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
