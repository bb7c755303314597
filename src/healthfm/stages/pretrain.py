"""``healthfm pretrain``: a model pretrained on the train split of an input, for any modality.

Read, split, fit the tokenizer (or image preprocessor) on the train split, build the
train and held-out batch sources (token stores, or tiles), configure the model from the
preset and the modality's defaults, train with the one trainer (one process, or every
rank under torchrun with DDP or FSDP2), write the model folder.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from healthfm.corpus import (
    CorpusSpec,
    SourceSpec,
    corpus_from_inputs,
    is_manifest,
    sampling_probabilities,
)
from healthfm.errors import ConfigError, DataError
from healthfm.fsutil import check_output_dir, check_run_dir, json_hash
from healthfm.modality import (
    DEFAULT_FRACTIONS,
    DEFAULT_SALT,
    Modality,
    Samples,
    check_input_modality,
    get_modality,
    split_indices,
)
from healthfm.model.config import ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.model.pretrained import save_pretrained
from healthfm.train.count_baseline import count_baseline
from healthfm.train.data import as_source
from healthfm.train.distributed import barrier, init_distributed
from healthfm.train.mixture import MixtureBatches, MixtureSource, sample_tokens
from healthfm.train.trainer import TrainConfig, Trainer

_LOG = logging.getLogger("healthfm")
#: Up to this many sample slots, the tokens each source gave are counted batch by batch.
EXACT_TOKEN_SLOTS = 4_000_000


def _input_paths(inputs: Any) -> list[Any]:
    """The plain paths among the inputs (for the modality sniff; globs and manifests are
    checked once expanded, by the readers)."""
    if isinstance(inputs, CorpusSpec):
        return [s.path for s in inputs.sources]
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    return [p for p in items if not is_manifest(p) and Path(str(p)).exists()]


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
    temperature: float = 1.0,
    held_out: tuple[str, ...] = (),
    overwrite: bool = False,
) -> Path:
    """Pretrain a model on the train split of an input and write the model folder.

    Parameters
    ----------
    modality
        The modality (or its name).
    input_path
        The input file or folder (table, FASTA, h5ad, MEDS folder, tiles, slides ...), or
        a corpus: several of them, globs, a manifest file or a
        :class:`~healthfm.corpus.CorpusSpec` (see :mod:`healthfm.corpus`).
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
    temperature
        Sampling temperature over a corpus' sources (:mod:`healthfm.corpus`).
    held_out
        Names of corpus sources held out whole (their samples give the held-out loss).
    overwrite
        Start afresh over a run folder holding an earlier run's checkpoints (without it,
        and without ``resume``, such a folder is refused: its checkpoints are kept).

    Under torchrun every rank calls this; rank 0 builds (or reuses) the batch sources while
    the others wait, then all train; only rank 0 writes the model folder.
    """
    modality = get_modality(modality) if isinstance(modality, str) else modality
    train_config = (train_config or TrainConfig()).validate()
    # Before any work: an --out that is a user's folder or file is refused, not replaced.
    out = check_output_dir(out, "model folder", inputs=tuple(_input_paths(input_path)))
    run_dir = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("the run folder exists and is a file", file=run_dir, column="run_dir")
    # An interrupted run is never discarded silently; a finished one's checkpoints may go.
    if check_run_dir(run_dir, resume, overwrite, out=out) and init_distributed().is_main:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for path in _input_paths(input_path):
        check_input_modality(modality, path, model=False)
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
            temperature,
            tuple(held_out),
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
    input_path: Any,
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
    temperature: float,
    held_out: tuple[str, ...],
) -> Path:
    corpus = corpus_from_inputs(
        input_path,
        temperature=temperature,
        held_out=held_out,
        expand=modality.pretraining.expand_input,
    )
    raw_options = modality.options(options)
    options = modality.pretraining.prepare_options(raw_options, run_dir)
    if train_config.truncate == TrainConfig.truncate and modality.truncate != train_config.truncate:
        # The modality's preference (causal timelines keep their most recent tokens).
        train_config = replace(train_config, truncate=modality.truncate)
    train_config = replace(train_config, **modality.pretraining.training_overrides(options))
    info = init_distributed()
    t0 = time.perf_counter()

    # Data: read and split every source; fit one tokenizer on the train splits only.
    sources = _read_sources(modality, corpus, raw_options, options, run_dir, salt, tuple(fractions))
    n_train = sum(len(s.splits["train"]) for s in sources)
    if n_train == 0:
        raise DataError(
            "the train split is empty (too few samples or groups)", file=sources[0].samples.source
        )
    tokenizer = modality.fit_corpus_tokenizer(
        [(s.samples, s.splits["train"]) for s in sources], options
    )

    _open_batch_sources(modality, tokenizer, sources, info)
    # What the trainer draws from: samples, or windows cut from a genome's records.
    n_items = sum(len(s.data["train"]) for s in sources)
    if n_items < train_config.batch_size:
        raise ConfigError(
            f"the train split has {n_items} samples, fewer than one batch of "
            f"{train_config.batch_size}; lower --batch-size",
            column="batch_size",
        )

    config = _model_config(modality, tokenizer, sources, preset, train_config, model_overrides)
    torch.manual_seed(train_config.seed)
    model = FoundationModel(config)

    if corpus.single:
        # One plain input: its store and the epoch plan, exactly as before corpora.
        train_data, val_data, batches = sources[0].data["train"], sources[0].data["val"], None
    else:
        train_data, val_data, batches = _mixture(corpus, sources, config, train_config)

    # Train.
    trainer = Trainer(
        model,
        train_data,
        train_config,
        run_dir,
        val_store=val_data if len(val_data) else None,
        augment=modality.pretraining.augmenter(tokenizer),
        dist_info=info,
        strategy=strategy,
        batches=batches,
    )
    summary = trainer.fit(resume=resume, stop_at=stop_at)

    # Write the model folder (gathering the weights is collective under FSDP).
    finished = summary["steps"] >= train_config.steps
    trained = trainer.export_model() if finished else None
    if info.is_main and finished:
        n_val = len(val_data) if len(val_data) else 0
        baseline = _count_baseline(modality, tokenizer, trainer, config, n_val)
        record = _corpus_record(corpus, sources, trainer, summary["steps"])
        _say_pretraining(summary, baseline, record)
        _save(
            modality, trained, out, tokenizer, config, preset, corpus, sources, record, summary,
            baseline, train_config, options, salt, fractions, n_train, strategy, t0,
        )  # fmt: skip
    barrier(info)  # the other ranks return once the model folder exists
    return out


def _open_batch_sources(modality: Modality, tokenizer: Any, sources: list, info: Any) -> None:
    # Each source's train and val batch sources: rank 0 first (it may write token stores),
    # then the others reuse them.
    for rank_turn in (True, False):
        if info.is_main == rank_turn:
            for source in sources:
                for name in ("train", "val"):
                    source.data[name] = modality.pretraining.batch_source(
                        tokenizer,
                        source.samples,
                        source.splits[name],
                        training=name == "train",
                        workdir=source.workdir / name,
                    )
        if info.distributed and rank_turn:
            barrier(info)


def _model_config(
    modality: Modality,
    tokenizer: Any,
    sources: list,
    preset: str,
    train_config: TrainConfig,
    model_overrides: dict[str, Any] | None,
) -> ModelConfig:
    # Model: the preset, the modality's defaults (the widest over sources), the overrides.
    defaults = _model_defaults(modality, tokenizer, sources)
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
    return config


def _save(
    modality: Modality,
    trained: Any,
    out: Path,
    tokenizer: Any,
    config: ModelConfig,
    preset: str,
    corpus: Any,
    sources: list,
    record: dict[str, Any],
    summary: dict[str, Any],
    baseline: Any,
    train_config: TrainConfig,
    options: Any,
    salt: str,
    fractions: Any,
    n_train: int,
    strategy: str,
    t0: float,
) -> None:
    # The model folder: weights, tokenizer, training_info.json and the model card.
    first = sources[0]
    save_pretrained(
        trained,
        out,
        tokenizer,
        info={
            **summary,
            "data_hash": first.samples.data_hash
            if corpus.single
            else json_hash([s["data_hash"] for s in record["sources"]]),
            "source": str(first.samples.source),
            "split_salt": salt,
            "split_source": modality.split_source(first.samples),
            "split_fractions": list(fractions),
            "n_train": n_train,
            "n_val": sum(len(s.splits["val"]) for s in sources),
            "train_config": json_safe(asdict(train_config)),
            "options": json_safe(options.to_dict()),
            "parameters": trained.num_parameters(),
            "total_seconds": time.perf_counter() - t0,
            "strategy": strategy,
            "corpus": record,
            "pretraining_baseline": baseline,
            **modality.pretraining.info(tokenizer, train_config, summary),
        },
        card=model_card(modality.name, preset, config, summary, record, baseline),
    )


@dataclass
class _Source:
    """One source of the run: its spec, samples, splits, work folder and batch sources."""

    spec: SourceSpec
    samples: Samples
    options: Any
    splits: dict[str, np.ndarray]
    workdir: Path
    data: dict[str, Any] = field(default_factory=dict)


def _read_sources(
    modality: Modality,
    corpus: CorpusSpec,
    raw_options: Any,
    options: Any,
    run_dir: Path,
    salt: str,
    fractions: tuple[float, float, float],
) -> list[_Source]:
    """Read and split every source (the readers are lazy: backed matrices, genome indexes,
    MEDS shards; nothing is concatenated). A corpus source's options are the run's with its
    own on top, prepared for its own work folder (slides' tiles never mix)."""
    out = []
    for i, spec in enumerate(corpus.sources):
        if corpus.single:
            opts = options
        else:
            workdir = run_dir / "sources" / f"{i:03d}-{_safe_name(spec.name)}"
            opts = modality.pretraining.prepare_options(
                modality.options({**raw_options.to_dict(), **spec.options}), workdir
            )
        samples = modality.read(spec.path, opts)
        if spec.split == "auto":
            names = modality.split(samples, salt, fractions)
        else:
            names = np.full(len(samples), spec.split)
        if corpus.single:
            workdir = run_dir / "stores"
        else:
            workdir = run_dir / "stores" / f"{i:03d}-{_safe_name(spec.name)}"
        out.append(_Source(spec, samples, opts, split_indices(np.asarray(names)), workdir))
        if not corpus.single:
            counts = {k: len(v) for k, v in out[-1].splits.items()}
            _LOG.info(
                "healthfm: source %s (%s): %d samples (train %d, val %d, test %d)",
                spec.name,
                spec.path,
                len(samples),
                counts["train"],
                counts["val"],
                counts["test"],
            )
    return out


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]


def _model_defaults(modality: Modality, tokenizer: Any, sources: list[_Source]) -> dict[str, Any]:
    """The modality's model defaults: one source's, or over several the widest context
    (every source's samples must fit) and the others' first values."""
    merged: dict[str, Any] = {}
    for source in sources:
        found = dict(modality.model_defaults(tokenizer, source.samples, source.options))
        for key, value in found.items():
            if key == "max_len" and key in merged:
                merged[key] = max(merged[key], value)
            elif key == "extra":
                merged["extra"] = {**value, **merged.get("extra", {})}
            else:
                merged.setdefault(key, value)
    return merged


def _mixture(
    corpus: CorpusSpec, sources: list[_Source], config: ModelConfig, train_config: TrainConfig
) -> tuple[MixtureSource, MixtureSource, MixtureBatches]:
    """The sources' batch sources end to end, and the weighted plan over their train
    samples (held-out: interleaved, so the first held-out batches cover every source)."""
    names = [s.spec.name for s in sources]
    wrap = lambda data, pack: as_source(data, config.max_len, train_config.truncate, pack)  # noqa: E731
    train = MixtureSource([wrap(s.data["train"], train_config.pack) for s in sources], names)
    val = MixtureSource([wrap(s.data["val"], False) for s in sources], names, interleave=True)
    probabilities = sampling_probabilities(
        train.sizes, [s.spec.weight for s in sources], corpus.temperature
    )
    for source, p in zip(sources, probabilities, strict=True):
        source.probability = float(p)
    batches = MixtureBatches(train.sizes, probabilities, train_config.batch_size, train_config.seed)
    _LOG.warning(
        "healthfm: corpus of %d sources, sampled %s (temperature %g)",
        len(sources),
        ", ".join(f"{n} {p:.1%}" for n, p in zip(names, probabilities, strict=True)),
        corpus.temperature,
    )
    return train, val, batches


def _corpus_record(
    corpus: CorpusSpec, sources: list[_Source], trainer: Trainer, steps: int
) -> dict[str, Any]:
    """What ``training_info.json`` says of the corpus: each source's path, content hash,
    sizes, probability, and the samples and tokens it gave to the run's ``steps`` batches."""
    batches = trainer.batches
    train = trainer.train_store
    mixture = isinstance(batches, MixtureBatches)
    seen = batches.counts(steps) if mixture else None
    tokens = np.zeros(len(sources), dtype=np.int64)
    exact = True
    if mixture and steps * batches.batch_size <= EXACT_TOKEN_SLOTS:
        for position in range(steps):
            idx = batches.batch(position)
            counts = train.sample_tokens(idx)
            if counts is None:
                exact = False
                break
            owner, _ = train.locate(idx)
            tokens += np.bincount(owner, weights=counts, minlength=len(sources)).astype(np.int64)
    else:
        exact = False
    rows = []
    for i, source in enumerate(sources):
        n_seen = int(seen[i]) if seen is not None else min(steps * trainer.config.batch_size, 0)
        if not mixture:
            n_seen = steps * trainer.config.batch_size
        row = {
            **source.spec.record(),
            "source": str(source.samples.source),
            "data_hash": source.samples.data_hash,
            "n_samples": len(source.samples),
            "n_train": len(source.splits["train"]),
            "n_val": len(source.splits["val"]),
            "n_test": len(source.splits["test"]),
            "n_train_items": len(source.data["train"]),  # windows of a genome's records
            "probability": getattr(source, "probability", 1.0),
            "samples_seen": n_seen,
        }
        if exact and mixture:
            row["tokens_seen"] = int(tokens[i])
        else:
            per = sample_tokens(
                train.sources[i] if mixture else as_source(source.data["train"], None),
                np.arange(min(len(source.splits["train"]), 100_000)),
            )
            if per is not None and len(per):
                row["tokens_seen"] = round(float(per.mean()) * n_seen)
                row["tokens_seen_estimated"] = True
        rows.append(row)
    return {**corpus.record(), "sources": rows}


def _count_baseline(
    modality: Modality, tokenizer: Any, trainer: Trainer, config: ModelConfig, n_val: int
) -> dict[str, Any] | None:
    """The count baseline's held-out loss on the held-out samples the trainer scored."""
    if not n_val or trainer.val_store is None:
        return None
    n_scored = min(n_val, trainer.config.eval_batches * trainer.micro_batch_size)
    found = modality.pretraining.count_baseline(
        tokenizer, trainer.train_store, trainer.val_store, n_scored
    )
    if found is None:
        found = count_baseline(
            trainer.train_store,
            trainer.val_store,
            config.objective,
            config.vocab_size,
            n_scored,
            seed=trainer.config.seed,
        )
    return json_safe(found) if found is not None else None


def _say_pretraining(
    summary: dict[str, Any], baseline: dict[str, Any] | None, record: dict[str, Any]
) -> None:
    """One line: the held-out loss beside the count baseline's, and the corpus' mix."""
    val = summary.get("val_loss")
    if val is not None and baseline is not None:
        verdict = "below" if val < baseline["loss"] else "NOT below"
        print(
            f"pretrain: held-out loss {val:.4f} nats/token vs {baseline['name']} count "
            f"baseline {baseline['loss']:.4f} ({baseline['what']}): {verdict} the baseline",
            file=sys.stderr,
            flush=True,
        )
    if len(record["sources"]) > 1:
        parts = ", ".join(
            f"{s['name']} {s['samples_seen']:,} samples"
            + (f" / {s['tokens_seen']:,} tokens" if "tokens_seen" in s else "")
            for s in record["sources"]
        )
        print(f"pretrain: seen per source: {parts}", file=sys.stderr, flush=True)


def model_card(
    modality: str,
    preset: str,
    config: ModelConfig,
    summary: dict[str, Any],
    corpus: dict[str, Any],
    baseline: dict[str, Any] | None,
) -> str:
    """The model folder's ``README.md``: what the model is and what it was pretrained on."""
    lines = [
        f"# healthfm {modality} model ({preset})",
        "",
        f"A {config.objective} {modality} model with {config.n_layers} layers, width "
        f"{config.d_model}, context {config.max_len}, pretrained with healthfm for "
        f"{summary['steps']} steps.",
        "",
        "## Pretraining corpus",
        "",
        f"Sampling temperature {corpus['temperature']:g}.",
        "",
        "| source | path | SHA-256 | samples (train / val / test) | probability | samples seen | tokens seen |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for s in corpus["sources"]:
        tokens = f"{s['tokens_seen']:,}" if "tokens_seen" in s else "?"
        if s.get("tokens_seen_estimated"):
            tokens = "≈ " + tokens
        lines.append(
            f"| {s['name']} | `{s['path']}` | `{str(s['data_hash'])[:16]}…` | "
            f"{s['n_samples']:,} ({s['n_train']:,} / {s['n_val']:,} / {s['n_test']:,}) | "
            f"{s['probability']:.3f} | {s['samples_seen']:,} | {tokens} |"
        )
    lines += ["", "## Held-out pretraining loss", ""]
    val = summary.get("val_loss")
    if val is None:
        lines.append("No held-out samples: no held-out loss.")
    else:
        lines.append(f"Held-out loss: {val:.4f} nats per token.")
        if baseline is not None:
            lines.append(
                f"Count baseline ({baseline['name']}: {baseline['what']}), same held-out "
                f"samples: {baseline['loss']:.4f} nats per token."
            )
    lines += [
        "",
        "Evaluate it with `healthfm evaluate MODEL TASK_INPUT`: its scores are printed next "
        "to baselines, the untrained architecture and bootstrap confidence intervals.",
        "",
    ]
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """Round-trip through JSON (tuples become lists)."""
    import json

    return json.loads(json.dumps(obj, default=str))
