"""``healthfm pretrain``: a model pretrained on the train split of an input, for any modality.

Read, split, fit the tokenizer (or image preprocessor) on the train split, build the
train and held-out batch sources (token stores, or tiles), configure the model from the
preset and the modality's defaults, train with the one trainer (one process, or every
rank under torchrun with DDP or FSDP2), write the model folder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from healthfm.errors import ConfigError, DataError
from healthfm.fsutil import check_output_dir
from healthfm.modality import (
    DEFAULT_FRACTIONS,
    DEFAULT_SALT,
    Modality,
    check_input_modality,
    get_modality,
    split_indices,
)
from healthfm.model.config import ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.model.pretrained import save_pretrained
from healthfm.train.distributed import barrier, init_distributed
from healthfm.train.trainer import TrainConfig, Trainer


def pretrain(
    modality: Modality | str,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    preset: str = "tiny",
    train_config: TrainConfig | None = None,
    resume: bool = False,
    run_dir: str | Path | None = None,
    salt: str = DEFAULT_SALT,
    fractions=DEFAULT_FRACTIONS,
    model_overrides: dict[str, Any] | None = None,
    stop_at: int | None = None,
    strategy: str = "ddp",
) -> Path:
    """Pretrain a model on the train split of an input and write the model folder.

    Parameters
    ----------
    modality
        The modality (or its name).
    input_path
        The input file or folder (table, FASTA, h5ad, MEDS folder, tiles, slides ...).
    out
        The model folder to write (``config.json``, ``model.safetensors``,
        ``tokenizer.json``, ``training_info.json``).
    options
        Modality reader / tokenizer options.
    preset
        Backbone size preset.
    train_config
        Optimisation settings.
    resume
        Continue from the latest checkpoint in the run folder.
    run_dir
        Checkpoints, token stores (or tiles) and the JSONL log; ``<out>.run`` by default.
    salt, fractions
        The split: only the train split is used for pretraining, val for the held-out loss;
        evaluation later holds out the test split made with the same salt.
    model_overrides
        Extra :class:`ModelConfig` fields (an ``extra`` dict is merged).
    stop_at
        Stop (checkpointed) at this step; resume later.
    strategy
        Under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 sharding).

    Under torchrun every rank calls this; rank 0 builds (or reuses) the batch sources while
    the others wait, then all train; only rank 0 writes the model folder.
    """
    modality = get_modality(modality) if isinstance(modality, str) else modality
    train_config = (train_config or TrainConfig()).validate()
    # Before any work: an --out that is a user's folder or file is refused, not replaced.
    out = check_output_dir(out, "model folder")
    run_dir = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("the run folder exists and is a file", file=run_dir, column="run_dir")
    check_input_modality(modality, input_path, model=False)
    new_run_dir = not run_dir.exists()
    try:
        return _pretrain(
            modality,
            input_path,
            out,
            options,
            preset,
            train_config,
            resume,
            run_dir,
            salt,
            fractions,
            model_overrides,
            stop_at,
            strategy,
        )
    except BaseException:
        # A run that failed before its first checkpoint leaves nothing behind (a run
        # folder it made for token stores or tiles); one with checkpoints is resumable.
        has_checkpoints = any((run_dir / "checkpoints").glob("step-*"))
        if new_run_dir and not has_checkpoints and init_distributed().is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _pretrain(
    modality: Modality,
    input_path: str | Path,
    out: Path,
    options: dict[str, Any] | None,
    preset: str,
    train_config: TrainConfig,
    resume: bool,
    run_dir: Path,
    salt: str,
    fractions,
    model_overrides: dict[str, Any] | None,
    stop_at: int | None,
    strategy: str,
) -> Path:
    options = modality.prepare_options(modality.options(options), run_dir)
    if train_config.truncate == TrainConfig.truncate and modality.truncate != train_config.truncate:
        # The modality's preference (causal timelines keep their most recent tokens).
        train_config = replace(train_config, truncate=modality.truncate)
    train_config = replace(train_config, **modality.training_overrides(options))
    info = init_distributed()
    t0 = time.perf_counter()

    # Data: read, split, fit the tokenizer on the train split only.
    samples = modality.read(input_path, options)
    splits = split_indices(modality.split(samples, salt, tuple(fractions)))
    if len(splits["train"]) == 0:
        raise DataError("the train split is empty (too few samples or groups)", file=samples.source)
    if len(splits["train"]) < train_config.batch_size:
        raise ConfigError(
            f"the train split has {len(splits['train'])} samples, fewer than one batch of "
            f"{train_config.batch_size}; lower --batch-size",
            column="batch_size",
        )
    tokenizer = modality.fit_tokenizer(samples, splits["train"], options)

    # Batch sources: rank 0 first (it may write token stores), then the others reuse them.
    sources: dict[str, Any] = {}
    for rank_turn in (True, False):
        if info.is_main == rank_turn:
            for name in ("train", "val"):
                sources[name] = modality.batch_source(
                    tokenizer,
                    samples,
                    splits[name],
                    training=name == "train",
                    workdir=run_dir / "stores" / name,
                )
        if info.distributed and rank_turn:
            barrier(info)

    # Model: the preset, the modality's defaults, the caller's overrides.
    defaults = dict(modality.model_defaults(tokenizer, samples, options))
    overrides = dict(model_overrides or {})
    extra = {**defaults.pop("extra", {}), **overrides.pop("extra", {})}
    config = ModelConfig.from_preset(
        preset,
        modality=modality.name,
        vocab_size=tokenizer.vocab_size,
        objective=modality.objective,
        pooling=modality.default_pooling,
        truncate=train_config.truncate,
        extra=extra,
        **{**defaults, **overrides},
    )
    torch.manual_seed(train_config.seed)
    model = FoundationModel(config)

    # Train.
    trainer = Trainer(
        model,
        sources["train"],
        train_config,
        run_dir,
        val_store=sources["val"] if len(sources["val"]) else None,
        augment=modality.augmenter(tokenizer),
        dist_info=info,
        strategy=strategy,
    )
    summary = trainer.fit(resume=resume, stop_at=stop_at)

    # Write the model folder (gathering the weights is collective under FSDP).
    finished = summary["steps"] >= train_config.steps
    trained = trainer.export_model() if finished else None
    if info.is_main and finished:
        save_pretrained(
            trained,
            out,
            tokenizer,
            info={
                **summary,
                "data_hash": samples.data_hash,
                "source": str(samples.source),
                "split_salt": salt,
                "split_source": modality.split_source(samples),
                "split_fractions": list(fractions),
                "n_train": len(splits["train"]),
                "n_val": len(splits["val"]),
                "train_config": json_safe(asdict(train_config)),
                "options": json_safe(options.to_dict()),
                "parameters": trained.num_parameters(),
                "total_seconds": time.perf_counter() - t0,
                "strategy": strategy,
                **modality.pretraining_info(tokenizer, train_config, summary),
            },
        )
    barrier(info)  # the other ranks return once the model folder exists
    return out


def json_safe(obj: Any) -> Any:
    """Round-trip through JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(obj, default=str))
