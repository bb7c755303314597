"""The shared pipeline: read → tokenize → pretrain → embed → evaluate, for any modality.

Every function here takes a :class:`~healthfm.modality.Modality` and never branches on
its name. The CLI and the demo are thin layers over these functions.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthfm.errors import ConfigError, DataError, ModelError
from healthfm.evaluate.embed import embed_store, save_embeddings
from healthfm.evaluate.finetune import evaluation_is_regression
from healthfm.evaluate.metrics import REGRESSION_METRICS, classification_metrics, regression_metrics
from healthfm.evaluate.probe import align_proba, fit_linear_probe, fit_ridge_probe
from healthfm.evaluate.results import ResultRow, format_table, rows_from_metrics, write_results
from healthfm.loader import load
from healthfm.modality import (
    Modality,
    Samples,
    get_modality,
    labels_as_targets,
    require_labels,
    split_indices,
)
from healthfm.model.config import ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.model.pretrained import save_pretrained
from healthfm.tokenizer import Tokenizer
from healthfm.tokens import TokenStore, write_store
from healthfm.train.distributed import barrier, init_distributed
from healthfm.train.trainer import TrainConfig, Trainer

log = logging.getLogger("healthfm")

DEFAULT_SALT = "healthfm"
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc"]


def split_samples(
    modality: Modality, samples: Samples, salt: str = DEFAULT_SALT, fractions=DEFAULT_FRACTIONS
) -> dict[str, np.ndarray]:
    """Train / val / test indices (by group hash unless the modality's data carry splits)."""
    return split_indices(modality.split(samples, salt, tuple(fractions)))


def tokenize_to_store(
    modality: Modality,
    tokenizer: Tokenizer,
    samples: Samples,
    out: str | Path,
    indices: np.ndarray | None = None,
) -> TokenStore:
    """Tokenize ``samples`` (or the chosen ``indices``) into a token store at ``out``."""
    extra = {
        "modality": modality.name,
        "source": str(samples.source),
        "data_hash": samples.data_hash,
    }
    return write_store(
        out, modality.encode(tokenizer, samples, indices), tokenizer.hash, tokenizer.fields, extra
    )


def tokenize(
    modality: Modality | str,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    model_dir: str | Path | None = None,
    salt: str = DEFAULT_SALT,
    fractions=DEFAULT_FRACTIONS,
) -> TokenStore:
    """Tokenize a whole input into a store.

    The tokenizer is the model's (``model_dir``) or one fitted on the input's train split.
    """
    modality = get_modality(modality) if isinstance(modality, str) else modality
    options = options or {}
    samples = modality.read(input_path, options)
    if model_dir is not None:
        tokenizer = load(model_dir, modality=modality.name).tokenizer
    else:
        tokenizer = modality.fit_tokenizer(
            samples, split_samples(modality, samples, salt, fractions)["train"], options
        )
    modality.check_input(samples, tokenizer)
    return tokenize_to_store(modality, tokenizer, samples, out)


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
        The input file (table, FASTA, h5ad, MEDS folder ...).
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
        Checkpoints, token stores and the JSONL log; ``<out>.run`` by default.
    salt, fractions
        The split: only the train split is used for pretraining, val for the held-out loss;
        evaluation later holds out the test split made with the same salt.
    model_overrides
        Extra :class:`ModelConfig` fields.
    stop_at
        Stop (checkpointed) at this step; resume later.
    strategy
        Under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 sharding).

    Under torchrun every rank calls this; rank 0 tokenizes (or reuses) the stores while
    the others wait, then all train; only rank 0 writes the model folder.
    """
    modality = get_modality(modality) if isinstance(modality, str) else modality
    options = options or {}
    train_config = train_config or TrainConfig()
    if train_config.truncate == TrainConfig.truncate and modality.truncate != train_config.truncate:
        # The modality's preference (causal timelines keep their most recent tokens).
        train_config = replace(train_config, truncate=modality.truncate)
    custom = modality.pretrain_command(
        Path(input_path),
        Path(out),
        options,
        preset=preset,
        train_config=train_config,
        resume=resume,
        run_dir=run_dir,
        salt=salt,
        fractions=fractions,
        model_overrides=model_overrides,
        stop_at=stop_at,
        strategy=strategy,
    )
    if custom is not None:
        return custom
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    info = init_distributed()
    t0 = time.perf_counter()
    samples = modality.read(input_path, options)
    splits = split_samples(modality, samples, salt, fractions)
    if len(splits["train"]) == 0:
        raise DataError("the train split is empty (too few samples or groups)", file=samples.source)
    tokenizer = modality.fit_tokenizer(samples, splits["train"], options)
    stores = {}
    if info.is_main:  # the others must not look while rank 0 may be replacing a stale store
        for name in ("train", "val"):
            path = run_dir / "stores" / name
            existing = _reuse_store(path, tokenizer.hash, samples.data_hash)
            stores[name] = existing or tokenize_to_store(
                modality, tokenizer, samples, path, splits[name]
            )
    if info.distributed:
        barrier(info)
        stores = {
            name: TokenStore(run_dir / "stores" / name, tokenizer.hash) for name in ("train", "val")
        }
    defaults = modality.model_defaults(tokenizer, samples)
    config = ModelConfig.from_preset(
        preset,
        modality=modality.name,
        vocab_size=tokenizer.vocab_size,
        objective=modality.objective,
        pooling=modality.default_pooling,
        **{**defaults, **(model_overrides or {})},
    )
    torch.manual_seed(train_config.seed)
    model = FoundationModel(config)
    trainer = Trainer(
        model,
        stores["train"],
        train_config,
        run_dir,
        val_store=stores["val"] if len(stores["val"]) else None,
        augment=modality.augmenter(tokenizer),
        dist_info=info,
        strategy=strategy,
    )
    summary = trainer.fit(resume=resume, stop_at=stop_at)
    finished = summary["steps"] >= train_config.steps
    trained = trainer.export_model() if finished else None  # collective under FSDP
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
                "split_fractions": list(fractions),
                "n_train": len(splits["train"]),
                "n_val": len(splits["val"]),
                "train_config": json_safe(asdict(train_config)),
                "parameters": trained.num_parameters(),
                "total_seconds": time.perf_counter() - t0,
                "strategy": strategy,
            },
        )
    barrier(info)  # the other ranks return once the model folder exists
    return out


def _reuse_store(path: Path, tokenizer_hash: str, data_hash: str) -> TokenStore | None:
    # Resuming re-reads the input but need not re-tokenize it.
    if not (path / "meta.json").exists():
        return None
    try:
        store = TokenStore(path, tokenizer_hash)
    except DataError:
        return None
    return store if store.meta.get("data_hash") == data_hash else None


def json_safe(obj: Any) -> Any:
    """Round-trip through JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(obj, default=str))


def load_for(modality_name: str | None, model_dir: str | Path) -> tuple[FoundationModel, Modality]:
    """Load a model folder (or a LoRA adapter folder, onto its base) and its modality,
    checking they agree."""
    from healthfm.evaluate.adapters import is_adapter, load_adapter

    if is_adapter(model_dir):
        model = load_adapter(model_dir)
        if modality_name is not None and model.config.modality != modality_name:
            raise ModelError(
                f"this adapter's base model is a {model.config.modality!r} model, not "
                f"{modality_name!r}",
                file=model_dir,
            )
    else:
        model = load(model_dir, modality=modality_name)
    if model.tokenizer is None:
        raise ModelError("model folder has no tokenizer.json", file=model_dir)
    return model, get_modality(model.config.modality)


def embed(
    model_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    pooling: str | None = None,
    batch_size: int = 128,
    bf16: bool = False,
    modality_name: str | None = None,
) -> Path:
    """Embed every sample of an input with a model; write parquet or .npy (+ keys)."""
    model, modality = load_for(modality_name, model_dir)
    custom = modality.embed_command(
        model,
        Path(input_path),
        Path(out),
        options or {},
        pooling=pooling,
        batch_size=batch_size,
        bf16=bf16,
    )
    if custom is not None:
        return custom
    samples = modality.read(input_path, options or {})
    modality.check_input(samples, model.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        store = tokenize_to_store(modality, model.tokenizer, samples, Path(tmp) / "store")
        emb = embed_store(model, store, pooling, batch_size, bf16)
    columns = {"label": samples.labels.tolist()} if samples.labels is not None else None
    return save_embeddings(
        out, samples.keys.tolist(), emb, columns if Path(out).suffix == ".parquet" else None
    )


def probe_and_score(
    X: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    n_classes: int,
    groups: np.ndarray,
    seed: int,
    n_boot: int = 1000,
    regression: bool = False,
):
    """Fit the linear probe (C tuned on val) and score it on test with bootstrap CIs.

    ``y`` holds class indices ``0 .. n_classes - 1``, or numeric targets when
    ``regression`` (a ridge probe, alpha tuned on val by RMSE); the bootstrap resamples
    ``groups`` (identical sequences, a donor's cells, a source image), not rows.

    Returns
    -------
    tuple
        The probe result (:class:`~healthfm.evaluate.probe.ProbeResult` or
        :class:`~healthfm.evaluate.probe.RidgeProbeResult`), ``{metric: MetricCI}`` and
        the probe's extra result fields (the chosen penalty).
    """
    test_groups = np.asarray(groups)[test_idx].astype(str)
    if regression:
        ridge = fit_ridge_probe(X[train_idx], y[train_idx], X[val_idx], y[val_idx], X[test_idx])
        metrics = regression_metrics(
            y[test_idx], ridge.pred, n_boot=n_boot, seed=seed, groups=test_groups
        )
        return ridge, metrics, {"best_alpha": ridge.best_alpha, "val_rmse": ridge.val_score}
    probe = fit_linear_probe(
        X[train_idx], y[train_idx], X[val_idx], y[val_idx], X[test_idx], seed=seed
    )
    scores = align_proba(probe.proba, probe.classes, np.arange(n_classes))
    metrics = classification_metrics(
        y[test_idx], scores, n_boot=n_boot, seed=seed, groups=test_groups
    )
    return probe, metrics, {"best_C": float(probe.best_C), "n_classes": n_classes}


def probe_split(
    pool_idx: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float = 0.125
) -> tuple[np.ndarray, np.ndarray]:
    """Split the non-test pool into probe-train / probe-val by group, differently per seed."""
    pool_groups = np.asarray(groups)[pool_idx].astype(str)
    uniq, inverse = np.unique(pool_groups, return_inverse=True)
    rng = np.random.default_rng([seed, 7919])
    is_val_group = rng.random(len(uniq)) < val_fraction
    is_val = is_val_group[inverse]
    return pool_idx[~is_val], pool_idx[is_val]


def evaluate(
    model_dir: str | Path | None,
    input_path: str | Path,
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    modality_name: str | None = None,
    seeds=(0, 1, 2),
    n_boot: int = 1000,
    pooling: str | None = None,
    batch_size: int = 128,
    salt: str | None = None,
    fractions=None,
    task: str | None = None,
    include_baselines: bool = True,
    echo: bool = True,
    finetuned=(),
) -> list[ResultRow]:
    """Linear probe of the model's embeddings next to the modality's baselines.

    ``finetuned``: fine-tuned model folders / LoRA adapter folders (``healthfm finetune``)
    whose own task-head predictions are scored on the same test split, as rows named
    ``<preset>-finetune-<full|lora|lora-merged>``; a fine-tuned ``model_dir`` adds its own.

    The test split is fixed by the group hash (the same one pretraining held out when the
    model was pretrained on this input); for each seed the remaining pool is split anew
    into probe-train and probe-val (by group), C is tuned on probe-val, the probe is refit
    on probe-train + probe-val, and scored on test with 95% bootstrap CIs. Baselines get
    exactly the same splits.

    Returns
    -------
    list of ResultRow
        Also written to ``out_dir/results.json``; the table is printed when ``echo``.
    """
    t0 = time.perf_counter()
    options = options or {}
    model = None
    if model_dir is not None:
        model, modality = load_for(modality_name, model_dir)
        info = _training_info(Path(model_dir))
        salt = salt or info.get("split_salt", DEFAULT_SALT)
        fractions = fractions or tuple(info.get("split_fractions", DEFAULT_FRACTIONS))
    else:
        if modality_name is None:
            raise ConfigError("evaluate needs a model folder or a modality")
        modality = get_modality(modality_name)
    salt = salt or DEFAULT_SALT
    fractions = fractions or DEFAULT_FRACTIONS
    custom = modality.evaluate_command(
        model_dir,
        Path(input_path),
        Path(out_dir),
        options,
        seeds=seeds,
        n_boot=n_boot,
        pooling=pooling,
        batch_size=batch_size,
        salt=salt,
        fractions=fractions,
        include_baselines=include_baselines,
        echo=echo,
        finetuned=list(finetuned),
    )
    if custom is not None:
        return custom
    samples = modality.read(input_path, options)
    split_names = modality.split(samples, salt, tuple(fractions))
    splits = split_indices(split_names)
    labels = require_labels(samples, np.where(split_names == "val", "train", split_names))
    test_idx = splits["test"]
    pool_idx = np.concatenate([splits["train"], splits["val"]])
    # The task of the fine-tuned models scored, else finetune's rule on the labels (many
    # distinct numbers → regression).
    ft_dirs = finetuned_folders(finetuned, model_dir, model)
    regression = evaluation_is_regression(
        labels[pool_idx], ft_dirs, bool(samples.info.get("categorical_labels"))
    )
    if regression:
        classes, y = np.array([]), labels_as_targets(samples, labels)
    else:
        classes, y = np.unique(labels, return_inverse=True)
    task = task or f"{Path(input_path).stem}:{samples.label_column}"
    features: dict[str, tuple[np.ndarray, bool, dict]] = {}
    timings: dict[str, float] = {}
    if model is not None:
        t = time.perf_counter()
        modality.check_input(samples, model.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            store = tokenize_to_store(modality, model.tokenizer, samples, Path(tmp) / "store")
            emb = embed_store(model, store, pooling, batch_size)
        name = f"{model.config.preset or 'model'}-{pooling or model.config.pooling}+logreg"
        features[name] = (emb, False, {"pooling": pooling or model.config.pooling})
        timings[name] = time.perf_counter() - t
    if include_baselines:
        for name, featurize in modality.baselines().items():
            t = time.perf_counter()
            features[name] = (np.asarray(featurize(samples, pool_idx), dtype=np.float32), True, {})
            timings[name] = time.perf_counter() - t
    model_hash = getattr(model, "model_hash", None)

    def pool_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
        tr_idx, va_idx = probe_split(pool_idx, samples.groups, seed)
        if len(np.unique(y[va_idx])) < 2:
            va_idx, tr_idx = tr_idx[: max(1, len(tr_idx) // 8)], tr_idx[max(1, len(tr_idx) // 8) :]
        return tr_idx, va_idx

    metrics = list(REGRESSION_METRICS) if regression else CLASSIFICATION_METRICS
    if regression:  # the same features under a ridge probe: say so in the method names
        features = {k.replace("+logreg", "+ridge"): v for k, v in features.items()}
        timings = {k.replace("+logreg", "+ridge"): v for k, v in timings.items()}
    rows = probe_rows(
        features,
        timings,
        y,
        len(classes),
        test_idx,
        samples,
        seeds,
        pool_split,
        task,
        n_boot,
        model_hash,
        {"modality": modality.name, "task_type": "regression" if regression else "classification"},
        metrics=metrics,
        regression=regression,
    )
    if ft_dirs:
        from healthfm.evaluate.finetune import finetuned_rows

        rows.extend(
            finetuned_rows(
                ft_dirs,
                modality,
                samples,
                test_idx,
                classes,
                task,
                n_boot=n_boot,
                batch_size=batch_size,
                metrics=metrics,
                salt=salt,
                fractions=tuple(fractions),
            )
        )
    rows.extend(
        modality.extra_evaluations(
            {
                "features": features,
                "y": y,
                "classes": classes,
                "splits": splits,
                "seeds": list(seeds),
                "n_boot": n_boot,
                "task": task,
                "samples": samples,
                "model_hash": model_hash,
            }
        )
        if not regression  # k-NN and clustering rows score classes
        else []
    )
    out_dir = Path(out_dir)
    write_results(out_dir / "results.json", rows)
    if echo:
        dicts = [r.to_dict() for r in rows]
        print(format_table([d for d in dicts if d["metric"] in metrics], metrics))
        # Rows of other metrics from extra_evaluations (clustering ARI/NMI ...) get their own table.
        other = [d for d in dicts if d["metric"] not in metrics]
        if other:
            print(format_table(other))
        print(f"results: {out_dir / 'results.json'}  ({time.perf_counter() - t0:.1f} s)")
    return rows


def probe_rows(
    features: dict[str, tuple[np.ndarray, bool, dict]],
    seconds: dict[str, float],
    y: np.ndarray,
    n_classes: int,
    test_idx: np.ndarray,
    samples: Samples,
    seeds,
    pool_split,
    task: str,
    n_boot: int,
    model_hash: str | None,
    extra: dict[str, Any],
    metrics: list[str] = CLASSIFICATION_METRICS,
    regression: bool = False,
) -> list[ResultRow]:
    """Probe every feature set for every seed on the same splits; one row per metric.

    Parameters
    ----------
    features
        Method → (features of every sample, is_baseline, extra fields of its rows).
    seconds
        Method → seconds spent computing its features (added to each row's wall time).
    y, n_classes, test_idx
        Class index per sample (the target when ``regression``), number of classes, the
        fixed test split.
    samples
        The evaluated samples (``groups`` are the bootstrap unit, ``data_hash`` provenance).
    seeds, pool_split
        Probe seeds and ``pool_split(seed) -> (probe-train, probe-val)`` indices.
    task, n_boot, model_hash, extra
        Row task name, bootstrap resamples, model hash, fields added to every row.
    metrics
        The metrics reported (one row each).
    regression
        Ridge probes scored by regression metrics instead of logistic probes.
    """
    rows: list[ResultRow] = []
    for seed in seeds:
        tr_idx, va_idx = pool_split(seed)
        for method, (X, is_baseline, method_extra) in features.items():
            t = time.perf_counter()
            _, scored, probe_extra = probe_and_score(
                X, y, tr_idx, va_idx, test_idx, n_classes, samples.groups, seed, n_boot, regression
            )
            rows += rows_from_metrics(
                scored,
                names=list(metrics),
                task=task,
                method=method,
                is_baseline=is_baseline,
                n_test=len(test_idx),
                seed=seed,
                model_hash=model_hash,
                data_hash=samples.data_hash,
                wall_seconds=seconds.get(method, 0.0) + (time.perf_counter() - t),
                extra={
                    "n_train": len(tr_idx),
                    "n_val": len(va_idx),
                    **probe_extra,
                    **extra,
                    **method_extra,
                },
            )
    return rows


def finetuned_folders(finetuned, model_dir, model) -> list:
    """The fine-tuned folders to score: ``finetuned``, plus ``model_dir`` when the evaluated
    model itself carries a task head."""
    own = model is not None and getattr(model, "task_head", None) is not None
    return [*finetuned, *([model_dir] if own else [])]


def _training_info(model_dir: Path) -> dict[str, Any]:
    import json

    from healthfm.evaluate.adapters import BASE_REF

    # A LoRA adapter folder records the split of its base model in its reference file.
    for name in ("training_info.json", BASE_REF):
        path = model_dir / name
        if path.exists():
            return json.loads(path.read_text())
    return {}
