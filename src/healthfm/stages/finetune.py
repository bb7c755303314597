"""The fine-tuning stage: a pretrained model + labelled input → a fine-tuned model.

The base is a healthfm model folder or ``NAME:DIR`` of any registered encoder (a published
model), opened by :mod:`healthfm.loader`. Read top to bottom, :func:`finetune` loads the base
model, reads the input and builds the
task's rows and splits (:mod:`healthfm.evaluate.task_data`), puts a task head on the base
(:mod:`healthfm.evaluate.task_head`; LoRA adapters through :mod:`healthfm.evaluate.adapters`),
trains it with the one training loop (:class:`healthfm.train.trainer.Trainer`: epochs,
early stopping on the val loss, best-epoch restore, per-epoch checkpoints and exact resume,
DDP or FSDP under torchrun), scores the test split and writes the result through
:mod:`healthfm.loader`:

* full fine-tuning (and ``--lora --merge``): an ordinary model folder; ``config.json``
  records the head in ``extra["task_head"]`` (task, classes, pooling, target scaling) and
  ``model.safetensors`` holds ``task_head.weight`` / ``task_head.bias``, so
  :func:`healthfm.load` rebuilds it strictly and ``embed`` / ``evaluate`` accept it;
* ``--lora``: a standard ``peft`` adapter folder plus a reference to the base model
  (:func:`healthfm.loader.save_adapter`).

Another encoder gets its head through
:class:`~healthfm.evaluate.encoder_task.EncoderTaskModel` (on ``encoder.embed``); its full
fine-tuning writes the encoder's weights, the head and a reference to the base folder
(architecture and dictionaries), checked by hash on load
(:func:`healthfm.loader.save_finetuned_encoder`); its LoRA adapter names
the base as ``NAME:DIR``. ``--freeze-layers`` and the LoRA targets follow the layer rule of
:mod:`healthfm.evaluate.encoder_task`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthfm.encoders import split_spec
from healthfm.errors import ConfigError, ModelError
from healthfm.evaluate.encoder_task import bare_encoder, encoder_blocks, freeze_encoder_layers
from healthfm.evaluate.metrics import classification_metrics, regression_metrics
from healthfm.evaluate.task_data import TaskData, shared_task_input, task_data
from healthfm.evaluate.task_head import (
    TASKS,
    TaskLoss,
    init_head,
    loss_fn,
    normaliser,
    raw_outputs,
    to_scores,
    with_task_head,
)
from healthfm.fsutil import atomic_dir, check_output_dir, check_run_dir
from healthfm.loader import base_reference, open_base, read_training_info, save_adapter, save_model
from healthfm.modality import DEFAULT_FRACTIONS, DEFAULT_SALT, check_input_modality, get_modality
from healthfm.model.config import TASK_POOLINGS
from healthfm.model.heads import FoundationModel
from healthfm.stages.common import check_split_change, check_split_source, input_paths
from healthfm.train import distributed as D
from healthfm.train.data import LabelledSource, TaskEpochs
from healthfm.train.trainer import TrainConfig, Trainer

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]


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
        Pooling of token states for the head; the model's by default. "attention" learns
        it (:class:`~healthfm.model.heads.AttentionPool`, starting as the mean): for
        fixed-length sequences whose motifs sit at fixed positions.
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
    strategy: str = "ddp",
    overwrite: bool = False,
    accept_split_change: bool = False,
) -> FinetuneResult | None:
    """Fine-tune a model folder on the labelled input and write the result to ``out``.

    Parameters
    ----------
    model_dir
        The pretrained (or previously fine-tuned) model folder, or ``NAME:DIR`` of a
        registered encoder (``healthfm models``).
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
        an equal part of every batch; only rank 0 writes.
    strategy
        Under torchrun: "ddp" (replicas) or "fsdp" (FSDP2: parameters, gradients and
        optimizer state sharded over the processes).
    overwrite
        Start afresh over a run folder holding an earlier run's checkpoints (without it,
        and without ``resume``, such a folder is refused: its checkpoints are kept).
    accept_split_change
        Fine-tune on the model's own pretraining data with another split (refused without
        it); the written folder's provenance records ``split_change_accepted``.

    Returns
    -------
    FinetuneResult or None
        None when stopped by ``stop_at_epoch``.

    Raises
    ------
    ConfigError
        Bad settings (``--freeze-layers`` beyond the depth or on an encoder that exposes no
        blocks, unknown task ...).
    DataError
        No labels, one class, labels missing, an empty train split.
    ModelError
        Unreadable model folder.
    """
    _check_checkpointing(run_dir, resume, stop_at_epoch)
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    # Before any work: never a user's folder, nor the base or the data it reads.
    check_output_dir(out, "model folder", inputs=input_paths(model_dir, input_path))
    check_run_dir(run_dir, resume, overwrite, out=out)  # an interrupted run is kept
    base_spec = str(model_dir)
    model_dir, base = _open_base(base_spec, modality_name)
    dist_info = D.init_distributed(device)
    echo = echo and dist_info.is_main
    _validate(config, _depth(base), base.name)
    modality = get_modality(base.modality)
    options = modality.options(options)
    info = read_training_info(model_dir)
    salt = salt or info.get("split_salt", DEFAULT_SALT)
    fractions = tuple(fractions or info.get("split_fractions", DEFAULT_FRACTIONS))
    pooling = _pooling(base, config)
    check_input_modality(modality, input_path)
    samples = modality.read(input_path, options)
    check_split_source(model_dir, modality, samples)
    split_changed = check_split_change(
        model_dir, modality, samples, salt, fractions, options, accept_split_change
    )
    with contextlib.ExitStack() as stack:
        # The rows, their split and targets: the modality's own rows, or one per sample.
        task_input = modality.task_input(samples, options, base, salt, fractions)
        if task_input is None:
            task_input = shared_task_input(modality, samples, base, salt, fractions, stack)
        samples, source = task_input.samples, task_input.source
        data = task_data(samples, task_input.split_names, salt, fractions, config, pooling)
        model, peft_model = _task_model(base, source, data, config, dist_info.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if echo:
            print(
                f"fine-tuning ({config.method}, {data.spec['task']}): trainable parameters "
                f"{trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%)"
            )
        # Train: epochs of the train split, early stopping on the val loss.
        run = _run_fingerprint(data, config, source, str(base.model_hash))
        trainer = _trainer(model, source, data, config, dist_info, run_dir, strategy, echo, run)
        if not _train(trainer, resume, stop_at_epoch, echo):
            return None
        history, best_epoch, best_loss = trainer.history, trainer.best_at, trainer.best_loss
        model.eval()
        # Score the test split (every process: under FSDP each forward pass is collective).
        test_scores = _test_scores(model, source, data, pooling, config.bf16)
        # The plain trained model (gathered from the shards under FSDP, on rank 0).
        rebuilt: dict[str, Any] = {}
        final = trainer.export_model(lambda: _rebuild(base, data.spec, config, rebuilt))
        peft_model = rebuilt.get("peft", peft_model)
    test_metrics = _score(data, test_scores, n_boot, config.seed) if test_scores is not None else {}
    result = FinetuneResult(
        out=Path(out),
        method=config.method,
        task=data.spec["task"],
        best_epoch=best_epoch,
        epochs_run=len(history),
        best_val_loss=best_loss,
        trainable_parameters=trainable,
        total_parameters=total,
        wall_seconds=time.perf_counter() - t0,
        history=history,
        test_metrics=test_metrics,
        test_indices=data.splits["test"],
        test_scores=test_scores,
    )
    if not dist_info.is_main:  # one writer; the others wait until the folder is there
        D.barrier(dist_info)
        return None
    provenance = _provenance(
        result, config, base_spec, base, data, task_input.info, salt, fractions
    )
    if split_changed:  # a split other than the base's pretraining split, accepted knowingly
        provenance["split_change_accepted"] = split_changed
    _write(final, peft_model, result.out, base, base_spec, data.spec, config, info, provenance)
    if echo:
        _print_written(result)
    D.barrier(dist_info)
    return result


def _check_checkpointing(run_dir: Any, resume: bool, stop_at_epoch: int | None) -> None:
    if run_dir is None and (resume or stop_at_epoch is not None):
        raise ConfigError(
            "--resume and --stop-at-epoch need epoch checkpoints: drop --no-checkpoints "
            "(or give a run folder)",
            column="run_dir",
        )


def _task_model(
    base: Any, source: Any, data: TaskData, config: FinetuneConfig, device: torch.device
) -> tuple[Any, Any]:
    """The task model: the base's weights and a fresh head (seeded, then initialised as
    ``--head-init`` says), frozen where it is not trained; and its peft wrapper with LoRA
    (else None)."""
    torch.manual_seed(config.seed)
    model = with_task_head(base, data.spec).to(device)
    init_head(model, source, data, config.head_init, config.seed, config.class_weight)
    return model, _adapt(model, config)


def _test_scores(
    model: Any, source: Any, data: TaskData, pooling: str, bf16: bool
) -> np.ndarray | None:
    """The trained model's scores of the test rows (None: no test row)."""
    if not len(data.splits["test"]):
        return None
    raw = raw_outputs(model, source, data.splits["test"], pooling, bf16=bf16)
    return to_scores(raw, data.spec)


def _open_base(base_spec: str, modality_name: str | None) -> tuple[Path, Any]:
    """The base's folder and model: a healthfm folder of any kind, or ``NAME:DIR`` through
    the registry (:func:`healthfm.loader.open_base`); one without a tokenizer, or without a
    ``model_hash`` that the written folder could check it by, is refused."""
    base_name, model_dir = split_spec(base_spec)
    base = open_base(base_name, model_dir, modality_name)
    if base.tokenizer is None:
        raise ModelError("model folder has no tokenizer.json", file=model_dir)
    if base.model_hash is None:  # the written folders check their base by it
        raise ModelError(
            f"the encoder {base.name!r} has no model_hash (its loader sets none), so a "
            "fine-tuned folder could not check its base",
            file=model_dir,
        )
    return model_dir, base


def _print_written(result: FinetuneResult) -> None:
    """The one line that says what was written: best epoch, val loss, test metrics."""
    line = ", ".join(
        f"{k} {v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
        for k, v in result.test_metrics.items()
        if k in ("auroc", "balanced_accuracy", "r2", "rmse", "c_index")
    )
    print(
        f"wrote {result.out}: best epoch {result.best_epoch} of {result.epochs_run}, val loss "
        f"{result.best_val_loss:.4f}; test {line or '-'}; {result.wall_seconds:.1f} s"
    )


def _depth(base: Any) -> int | None:
    """Blocks of the base (None: an encoder that exposes none)."""
    if isinstance(base, FoundationModel):
        return base.config.n_layers
    blocks = encoder_blocks(bare_encoder(base))
    return len(blocks) if blocks else None


def _pooling(base: Any, config: FinetuneConfig) -> str:
    """The head's pooling: ``--pooling`` or the base's; one a published encoder does not
    offer is a ConfigError now, not after the data are read."""
    pooling = config.pooling or base.pooling
    check = getattr(bare_encoder(base), "check_pooling", None)
    return check(pooling) if check is not None else pooling


def _provenance(
    result: FinetuneResult,
    config: FinetuneConfig,
    base_spec: str,
    base: Any,
    data: TaskData,
    rows: dict[str, Any],
    salt: str,
    fractions: tuple[float, float, float],
) -> dict[str, Any]:
    """What the output folder records of the run (``training_info.json`` / the adapter's
    ``healthfm_adapter.json``)."""
    return {
        "finetune": {
            "method": config.method,
            "config": asdict(config),
            "base_model": base_reference(base_spec, base.model_hash, result.out)["spec"],
            "base_model_hash": base.model_hash,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "best_val_loss": result.best_val_loss,
            "history": result.history,
            "trainable_parameters": result.trainable_parameters,
            "total_parameters": result.total_parameters,
            "n_train": len(data.splits["train"]),
            "n_val": len(data.splits["val"]),
            "n_test": len(data.splits["test"]),
            "val_carved_from_train": data.val_from_train,
            "few_shot": config.few_shot,
            "rows": rows,
            "test_metrics": result.test_metrics,
            "wall_seconds": result.wall_seconds,
        },
        "data_hash": data.samples.data_hash,
        "source": str(data.samples.source),
        "split_salt": salt,
        "split_fractions": list(fractions),
    }


def _adapt(model: Any, config: FinetuneConfig) -> Any:
    """Freeze what is not trained; with LoRA, wrap the model in peft (returned; else None)."""
    if isinstance(model, FoundationModel):
        # The pretraining head is unused by the task loss: never train it.
        for p in model.head.parameters():
            p.requires_grad_(False)
        if config.freeze_layers > 0:
            for p in model.backbone.embed.parameters():
                p.requires_grad_(False)
            for block in model.backbone.blocks[: config.freeze_layers]:
                for p in block.parameters():
                    p.requires_grad_(False)
    else:  # another encoder: its input embedder and first blocks (encoder_task's rule)
        freeze_encoder_layers(model.encoder, config.freeze_layers)
    if not config.lora:
        return None
    from healthfm.evaluate.adapters import add_lora

    return add_lora(
        model,
        config.lora_rank,
        config.lora_alpha or 2.0 * config.lora_rank,
        config.lora_dropout,
        first_layer=config.freeze_layers,
    )


def _rebuild(base: Any, spec: dict[str, Any], config: FinetuneConfig, out: dict[str, Any]) -> Any:
    """A fresh task model of the same layout (weights to be loaded), its peft wrapper in
    ``out["peft"]``: what a sharded run's gathered weights are put into."""
    model = with_task_head(base, spec)
    out["peft"] = _adapt(model, config)
    return model


def _trainer(
    model: Any,
    source: Any,
    data: TaskData,
    config: FinetuneConfig,
    info: D.DistInfo,
    run_dir: str | Path | None,
    strategy: str,
    echo: bool,
    run: str,
) -> Trainer:
    """The trainer of a task: epochs over the train split in batches of ``batch_size``
    (each split over the processes), the head's loss normalised by the whole batch,
    the val loss after every epoch, early stopping and per-epoch checkpoints (resumed
    only by the same ``run``: data, rows, targets, splits and settings)."""
    spec, device = data.spec, info.device
    plan = TaskEpochs(
        data.splits["train"],
        config.batch_size,
        config.seed,
        first_epoch=1,
        # Rows that can share a forward pass (one subject's labels) next to each other.
        group_order=getattr(source, "group_order", None),
    )
    steps = plan.steps_per_epoch * config.epochs
    train_config = TrainConfig(
        steps=steps,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.learning_rate(),
        weight_decay=config.weight_decay,
        betas=(0.9, 0.98),
        fused=None,
        warmup_steps=max(1, int(config.warmup_fraction * steps)),
        min_lr_ratio=0.1,
        grad_clip=config.grad_clip,
        bf16=config.bf16,
        seed=config.seed,
        eval_every=1,
        checkpoint_every=1,
        keep_checkpoints=1,
        patience=config.patience,
        progress=echo and sys.stderr.isatty(),
    )
    val_idx = data.splits["val"]
    val_targets = torch.from_numpy(data.targets[val_idx]).to(device)
    val_loss_of = loss_fn(spec, data.class_weights, device)

    def val_loss() -> float:
        raw = raw_outputs(model, source, val_idx, spec["pooling"], bf16=config.bf16)
        with torch.no_grad():
            val = val_loss_of(torch.from_numpy(raw).to(device), val_targets)
            # Every process computes it; averaging makes the early-stopping decision (and
            # so the collective calls that follow) identical on all of them.
            return float(D.all_reduce_mean(val.detach().float().reshape(1), info))

    def report(row: dict[str, Any]) -> None:
        if echo:
            print(
                f"  epoch {row['epoch']:>3}: train loss {row['train_loss']:.4f}, "
                f"val loss {row['val_loss']:.4f}"
            )

    return Trainer(
        model,
        LabelledSource(source, data.targets),
        train_config,
        run_dir,
        dist_info=info,
        strategy=strategy,
        loss=TaskLoss(model, spec, data.class_weights, device),
        batches=plan,
        evaluate=val_loss,
        normaliser=lambda rows: normaliser(spec, data.class_weights, data.targets[rows]),
        identity={"run": run},
        name="finetune",
        on_epoch_end=report,
    )


def _train(trainer: Trainer, resume: bool, stop_at_epoch: int | None, echo: bool) -> bool:
    """Run the trainer: a fresh run first drops an earlier run's checkpoints, a resumed one
    continues from the latest. False when it stopped at ``stop_at_epoch`` (checkpointed)."""
    has_run_dir = trainer.run_dir is not None
    if has_run_dir and not resume and trainer.discard_checkpoints() and echo:
        print(f"  removed the checkpoints of an earlier run in {trainer.checkpoint_root}")
    if resume and trainer.resume():
        if echo:
            epoch = trainer.step // trainer.batches.steps_per_epoch
            print(f"  resumed after epoch {epoch} from {trainer.last_checkpoint}")
    elif resume and echo:
        print(f"  no checkpoint in {trainer.checkpoint_root}: starting from epoch 1")
    trainer.fit(stop_at=stop_at_epoch)
    if trainer.step < trainer.config.steps and not trainer.early_stopped:
        if echo:
            print(
                f"stopped after epoch {stop_at_epoch}; checkpoint in {trainer.run_dir} "
                "(continue with --resume)"
            )
        return False
    return True


def _write(
    final: Any,
    peft_model: Any,
    out: Path,
    base: Any,
    base_spec: str,
    spec: dict[str, Any],
    config: FinetuneConfig,
    info: dict[str, Any],
    provenance: dict[str, Any],
) -> None:
    """Write the adapter folder (LoRA) or the model folder (full, or LoRA merged), atomically:
    a healthfm model folder for a healthfm base, a fine-tuned encoder's folder (weights,
    head, base reference) for any other."""
    final.to("cpu")
    if peft_model is not None and not config.merge:
        with atomic_dir(out, kind="lora_adapter") as tmp_out:
            save_adapter(
                peft_model,
                tmp_out,
                base_spec,
                base.model_hash,
                {"task_head": spec, "modality": base.modality, **provenance},
            )
        return
    if peft_model is not None:
        final = peft_model.merge_and_unload()
    for p in final.parameters():
        p.requires_grad_(False)
    info = {**{k: v for k, v in info.items() if k not in provenance}, **provenance}
    save_model(final, out, base, base_spec, info)


def _validate(config: FinetuneConfig, n_layers: int | None, encoder_name: str) -> None:
    if config.task is not None and config.task not in TASKS:
        raise ConfigError(f"--task must be one of {TASKS}, not {config.task!r}", column="task")
    if n_layers is None:  # an encoder without blocks: whole, or LoRA on its layer lists
        if config.freeze_layers != 0:
            raise ConfigError(
                f"--freeze-layers needs the encoder's blocks, and {encoder_name!r} exposes none "
                "(neither `blocks` nor `layer_groups()`); fine-tune it whole, or with --lora",
                column="freeze_layers",
            )
    elif not 0 <= config.freeze_layers <= n_layers:
        raise ConfigError(
            f"--freeze-layers {config.freeze_layers} is outside 0..{n_layers} (the model has {n_layers} blocks)",
            column="freeze_layers",
        )
    elif config.lora and config.freeze_layers >= n_layers:
        raise ConfigError(
            f"--freeze-layers {config.freeze_layers} leaves no block for LoRA (depth {n_layers})",
            column="freeze_layers",
        )
    if config.merge and not config.lora:
        raise ConfigError("--merge only applies to --lora", column="merge")
    for name in ("epochs", "batch_size", "lora_rank"):
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1", column=name)
    if config.pooling is not None and config.pooling not in TASK_POOLINGS:
        raise ConfigError(
            f"--pooling must be one of {', '.join(TASK_POOLINGS)} for a task head, not "
            f"{config.pooling!r}",
            column="pooling",
        )
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


def _run_fingerprint(data: TaskData, config: FinetuneConfig, source: Any, base_hash: str) -> str:
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


def _score(
    data: TaskData, scores: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    test_idx = data.splits["test"]
    # Resample groups (identical sequences, a donor's cells), as evaluate does.
    groups = np.asarray(data.samples.groups)[test_idx].astype(str)
    if data.spec["task"] == "survival":  # Harrell's / Uno's C, td-AUROC of the risks
        from healthfm.evaluate.survival import survival_metrics

        time, event = data.targets[:, 0].astype(np.float64), data.targets[:, 1] > 0
        fit = data.splits["train"]
        metrics = survival_metrics(
            time[test_idx],
            event[test_idx],
            scores,
            train_time=time[fit],
            train_event=event[fit],
            n_boot=n_boot,
            seed=seed,
            groups=groups,
        )
    elif data.spec["task"] == "regression":
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
