"""``healthfm evaluate``: frozen features of every row, probed next to baselines, with CIs.

One flow for every modality: load the encoder, read the input, take the rows the task is
scored on and their split (:meth:`~healthfm.modality.Modality.evaluation_rows`), embed the
rows, compute the baselines on the same rows, run the modality's evaluation protocol
(the shared linear probe, or EHRSHOT's few-shot grid), add fine-tuned models' own
predictions and the protocol's extra rows, compare every model with the strongest
baseline on the same test rows (:mod:`healthfm.evaluate.paired`), write ``results.json``
(and the protocol's files) and ``report.html``, print the table and the verdicts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from healthfm.encoders import Encoder
from healthfm.errors import ConfigError
from healthfm.evaluate.controls import UNTRAINED, choose_pooling, control_features
from healthfm.evaluate.finetuned import evaluation_is_regression, finetuned_rows
from healthfm.evaluate.paired import compare_result
from healthfm.evaluate.progress import Progress, format_seconds, progress_enabled
from healthfm.evaluate.protocol import ProbeProtocol
from healthfm.evaluate.results import ResultRow, write_results
from healthfm.fsutil import check_output_parent, owned_outputs
from healthfm.loader import load_encoder, read_training_info
from healthfm.modality import (
    DEFAULT_FRACTIONS,
    DEFAULT_SALT,
    EvaluationRows,
    Features,
    Modality,
    TaskRule,
    check_input_modality,
    get_modality,
    split_indices,
)
from healthfm.report import write_run_report
from healthfm.stages.common import (
    check_split_change,
    check_split_source,
    finetuned_folders,
    split_of_models,
)


def evaluate(
    model_dir: str | Path | Encoder | list | tuple | None,
    input_path: str | Path,
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    modality_name: str | None = None,
    seeds=None,
    n_boot: int = 1000,
    pooling: str | None = None,
    batch_size: int = 128,
    salt: str | None = None,
    fractions=None,
    task: str | None = None,
    include_baselines: bool = True,
    echo: bool = True,
    finetuned=(),
    controls: bool = True,
    progress: bool | None = None,
    accept_split_change: bool = False,
) -> list[ResultRow]:
    """Probe a model's embeddings next to the modality's baselines on the same rows.

    Parameters
    ----------
    model_dir
        A model folder, a LoRA adapter folder, ``NAME:DIR`` of a registered encoder, a
        loaded :class:`~healthfm.encoders.Encoder`, a list of these (every model is probed
        on the same rows and splits, next to the same baselines), or None (baselines
        only; then ``modality_name`` is needed).
    input_path
        Labelled input, read by the modality with ``options``.
    out_dir
        Folder for ``results.json`` (and the protocol's files).
    seeds
        Probe seeds; the protocol's default (3, or 5 for EHRSHOT and eva) when None.
    n_boot
        Bootstrap resamples (of groups: sequences, donors, subjects, source images).
    pooling, batch_size
        Embedding pooling (the model's by default; ``"auto"``: the best of the encoder's
        poolings by the validation split's score, :func:`~healthfm.evaluate.controls.choose_pooling`)
        and inference batch size.
    salt, fractions
        The split: the model's (``training_info.json``) by default, so the test rows are
        the ones held out from pretraining.
    task
        Task name in the rows (default: from the input and label column).
    include_baselines, echo
        Whether to run the baselines; print the table.
    controls
        Add the model's controls (:mod:`healthfm.evaluate.controls`): the same
        architecture untrained, and the model ⊕ the strongest baseline (chosen on val).
    finetuned
        Fine-tuned model / LoRA adapter folders whose own task-head predictions are scored
        on the same test rows (a fine-tuned ``model_dir`` adds its own).
    progress
        Report on stderr what is being done (the plan, each embedding and baseline, then a
        counter of probe fits with an ETA: a bar on a terminal, a line every 20 s
        otherwise). Default: with ``echo``, unless ``HEALTHFM_PROGRESS=0``.
    accept_split_change
        Score a model on its own pretraining data with a split other than the one it was
        pretrained with (salt, fractions, group column, split file); refused without it
        (:func:`~healthfm.stages.common.check_split_change`); every row then records it in
        ``split_change_accepted``.

    Returns
    -------
    list of ResultRow
        The methods' rows; ``out_dir/results.json`` holds them and the paired
        differences (``row_type: "delta"``, :mod:`healthfm.evaluate.paired`).
    """
    t0 = time.perf_counter()
    out_dir = check_output_parent(out_dir, "evaluate --out folder")  # not a file: it gets files
    with owned_outputs(out_dir, "the evaluate --out folder") as outputs:
        outputs.claim(out_dir / "results.json")  # before any work: never a user's file
    specs = list(model_dir) if isinstance(model_dir, list | tuple) else [model_dir]
    specs = [m for m in specs if m is not None]
    encoders = [load_encoder(m, modality_name) for m in specs]
    modality = _one_modality(encoders, modality_name)
    options = modality.options(options)
    salt, fractions = split_of_models(encoders, salt, fractions)
    ft_dirs = list(finetuned)
    for spec, encoder in zip(specs, encoders, strict=True):
        ft_dirs += finetuned_folders((), spec, encoder)
    if not encoders and not include_baselines and not ft_dirs:
        raise ConfigError("nothing to evaluate: no model, no --finetuned and --no-baselines")

    # The rows the task is scored on, their split and targets.
    check_input_modality(modality, input_path, model=bool(encoders))
    samples = modality.read(input_path, options)
    changed = _check_splits(
        specs, encoders, modality, samples, salt, fractions, options, accept_split_change
    )
    rows = modality.evaluation_rows(samples, options, salt, fractions, task_rule(ft_dirs))
    if task:
        rows.task = task
    protocol = _protocol(modality, options, rows, echo)
    seeds = list(seeds) if seeds else list(protocol.seeds)
    report = _plan(rows, encoders, include_baselines, controls, seeds, echo, progress)

    # Features of every row: the model's embedding, then the baselines'.
    features: dict[str, Features] = {}
    hashes: dict[str, str | None] = {}  # a model's method name (before "+") → its hash
    model_methods = _embed_models(
        modality, specs, encoders, samples, rows, pooling, batch_size, features, hashes, report
    )
    if include_baselines:
        _add_baselines(modality, samples, rows, features, report)
    if controls:  # what pretraining bought, and what each model adds to the baseline
        _add_controls(modality, model_methods, samples, rows, features, batch_size, report)

    # The protocol, fine-tuned models' own predictions, the protocol's extra rows.
    # One model: every row carries its hash (as before); several: each model's rows get
    # their own below, baselines none.
    model_hash = getattr(encoders[0], "model_hash", None) if len(encoders) == 1 else None
    result = protocol.run(features, rows, seeds, n_boot, model_hash, modality.name, progress=report)
    report.close()
    _add_more_rows(
        modality,
        protocol,
        result,
        features,
        samples,
        rows,
        ft_dirs,
        seeds,
        n_boot,
        batch_size,
        salt,
        fractions,
        model_hash,
    )

    # Paired differences to the strongest baseline: delta rows ("A − B") and verdicts.
    comparison = compare_result(result, rows, protocol, n_boot, model_hash, modality.name)
    _stamp_rows(result.rows + comparison.rows, hashes, changed)
    report.say(
        f"probes done in {format_seconds(time.perf_counter() - t0)}; writing the results and the report"
    )
    written = _write_outputs(
        out_dir, protocol, result, comparison, features, rows, specs, seeds, n_boot, t0
    )
    if echo:
        _echo(features, model_methods, protocol, result, rows, comparison, out_dir, written, t0)
    return result.rows


def _add_more_rows(
    modality: Modality,
    protocol: Any,
    result: Any,
    features: dict[str, Features],
    samples: Any,
    rows: EvaluationRows,
    ft_dirs: list,
    seeds: list,
    n_boot: int,
    batch_size: int,
    salt: str,
    fractions: Any,
    model_hash: str | None,
) -> None:
    # Fine-tuned models' own predictions on the test rows, and the protocol's extra rows.
    if ft_dirs:
        ft_rows, ft_scores = finetuned_rows(
            ft_dirs,
            modality,
            samples,
            rows,
            rows.options,
            protocol,
            n_boot,
            batch_size,
            salt,
            fractions,
        )
        result.rows += ft_rows
        result.scores.update(ft_scores)
    extra_rows = getattr(protocol, "extra_rows", None)
    if extra_rows is not None and not rows.regression and not rows.survival:
        # k-NN and clustering rows score classes
        result.rows += extra_rows(
            {
                "features": features,
                "y": rows.y,
                "classes": rows.classes,
                "splits": split_indices(rows.split),
                "seeds": seeds,
                "n_boot": n_boot,
                "task": rows.task,
                "samples": samples,
                "model_hash": model_hash,
            }
        )


def task_rule(finetuned: list) -> TaskRule:
    """The rule :meth:`~healthfm.modality.Modality.evaluation_rows` tells a regression by:
    the fine-tuned models' task when any are scored, else the labels' own
    (:func:`~healthfm.evaluate.finetuned.evaluation_is_regression`)."""
    folders = list(finetuned)
    return TaskRule(
        regression=lambda labels, categorical: evaluation_is_regression(
            labels, folders, categorical
        ),
        finetuned=bool(folders),
    )


def _check_splits(
    specs: list,
    encoders: list,
    modality: Modality,
    samples: Any,
    salt: str,
    fractions: Any,
    options: Any,
    accept_split_change: bool,
) -> list[str]:
    # Each model's split against the input's; the accepted changes (a split other than
    # the model's on its own data), one line per model and field.
    changed: list[str] = []
    for spec, encoder in zip(specs, encoders, strict=True):
        check_split_source(encoder, modality, samples)
        fields = check_split_change(
            encoder, modality, samples, salt, fractions, options, accept_split_change
        )
        changed += [f"{spec}: {f}" for f in fields]
    return changed


def _one_modality(encoders: list, modality_name: str | None) -> Modality:
    # The one modality every model takes (or the named one when there is no model).
    if not encoders and modality_name is None:
        raise ConfigError("evaluate needs a model folder or a modality")
    kinds = sorted({e.modality for e in encoders})
    if len(kinds) > 1:
        raise ConfigError(f"the models take different modalities ({', '.join(kinds)})")
    return get_modality(kinds[0] if encoders else modality_name)


def _protocol(modality: Modality, options: Any, rows: EvaluationRows, echo: bool) -> Any:
    # The modality's protocol (the shared linear probe by default); a time-to-event task
    # runs the Cox probe and survival metrics.
    protocol = modality.evaluation_protocol(options) or ProbeProtocol()
    if rows.survival:
        from healthfm.evaluate.survival import describe_rows, survival_protocol

        protocol = survival_protocol(protocol)
        if echo:
            print(describe_rows(rows))
    return protocol


def _plan(
    rows: EvaluationRows,
    encoders: list,
    include_baselines: bool,
    controls: bool,
    seeds: list,
    echo: bool,
    progress: bool | None,
) -> Progress:
    # The progress reporter, after it has said what the run will do.
    report = Progress(
        "evaluate",
        enabled=progress_enabled(progress)
        if progress is not None
        else echo and progress_enabled(None),
    )
    n_test = int((rows.split == "test").sum())
    report.say(
        f"plan: {rows.task}, {len(rows.y)} rows ({n_test} test), "
        f"{len(encoders)} model(s){' + baselines' if include_baselines else ''}"
        f"{' + controls' if controls and encoders else ''}, seeds {seeds}"
    )
    return report


def _embed_models(
    modality: Modality,
    specs: list,
    encoders: list,
    samples: Any,
    rows: EvaluationRows,
    pooling: str | None,
    batch_size: int,
    features: dict[str, Features],
    hashes: dict[str, str | None],
    report: Progress,
) -> list[tuple[str, str, Any]]:
    # Every model's features of every row, added to ``features`` (and its hash to
    # ``hashes``); returns (method, its untrained control's name, encoder) per model.
    model_methods: list[tuple[str, str, Any]] = []
    for spec, encoder in zip(specs, encoders, strict=True):
        t = time.perf_counter()
        chosen: dict[str, Any] = {}
        if pooling == "auto":  # chosen on the validation split only
            used, pool_scores, emb = choose_pooling(
                modality, encoder, samples, rows, pooling_candidates(modality, encoder), batch_size
            )
            chosen = {"pooling_selected_on": "val", "pooling_val_scores": pool_scores}
        else:
            emb = modality.embedding.embed_rows(encoder, samples, rows, pooling, batch_size)
            used = pooling or encoder.pooling
        name, untrained = _method_name(
            modality, encoder, spec, used, rows.regression, features, rows.survival
        )
        origin = pretrained_on(read_training_info(encoder))
        features[name] = Features(
            emb,
            baseline=False,
            extra={"pooling": used, **chosen, **({"pretrained_on": origin} if origin else {})},
            seconds=time.perf_counter() - t,
        )
        report.say(f"embedded {name}: {emb.shape[1]} features in {_took(t)}")
        hashes[name.split("+")[0]] = getattr(encoder, "model_hash", None)
        model_methods.append((name, untrained, encoder))
    return model_methods


def pooling_candidates(modality: Modality, encoder: Any) -> tuple[str, ...]:
    """The poolings ``--pooling auto`` tries: a published encoder's own, else the
    modality's :attr:`~healthfm.modality.Modality.poolings`."""
    offered = getattr(encoder, "poolings", None)
    return tuple(offered) if offered else tuple(modality.poolings)


def _add_baselines(
    modality: Modality,
    samples: Any,
    rows: EvaluationRows,
    features: dict[str, Features],
    report: Progress,
) -> None:
    report.say("baselines ...")
    baselines = modality.baseline_features(samples, rows)
    if rows.survival:  # every baseline's features under the Cox probe
        from healthfm.evaluate.survival import survival_features

        baselines = survival_features(baselines)
    for name, feats in baselines.items():
        # The same features under a ridge probe for a regression: say so in the name.
        features[name.replace("+logreg", "+ridge") if rows.regression else name] = feats
        report.say(
            f"baseline {name}: {feats.X.shape[1]} features in {format_seconds(feats.seconds)}"
        )


def _add_controls(
    modality: Modality,
    model_methods: list[tuple[str, str, Any]],
    samples: Any,
    rows: EvaluationRows,
    features: dict[str, Features],
    batch_size: int,
    report: Progress,
) -> None:
    for method, untrained, encoder in model_methods:
        t = time.perf_counter()
        used = features[method].extra["pooling"]
        features.update(
            control_features(
                modality,
                encoder,
                samples,
                rows,
                features,
                method,
                used,
                batch_size,
                untrained_name=untrained,
            )
        )
        report.say(f"controls of {method} in {_took(t)}")


def _stamp_rows(rows: list[ResultRow], hashes: dict[str, str | None], changed: list[str]) -> None:
    # Each model's rows carry its hash (the untrained control's weights are not the
    # model's); with an accepted split change, every row says its test split may hold
    # pretraining samples.
    for row in rows:
        if not row.is_baseline and row.method.split("+")[0] in hashes:
            row.model_hash = hashes[row.method.split("+")[0]]
    for r in rows:
        if r.extra.get("control") == UNTRAINED:
            r.model_hash = None
    if changed:
        for row in rows:
            row.extra["split_change_accepted"] = "; ".join(changed)


def _write_outputs(
    out_dir: Path,
    protocol: Any,
    result: Any,
    comparison: Any,
    features: dict[str, Features],
    rows: EvaluationRows,
    specs: list,
    seeds: list,
    n_boot: int,
    t0: float,
) -> list[Path]:
    # Outputs: only files healthfm wrote there are replaced; each is listed in the marker.
    with owned_outputs(out_dir, "the evaluate --out folder"):
        write_results(out_dir / "results.json", result.rows + comparison.rows)
        written = protocol.write_outputs(
            out_dir,
            result,
            rows,
            {"seeds": seeds, "n_boot": n_boot, "total_seconds": time.perf_counter() - t0},
        )
        written.append(
            write_run_report(out_dir, features, rows, result, comparison, specs, seeds, n_boot)
        )
    return written


def _echo(
    features: dict[str, Features],
    model_methods: list[tuple[str, str, Any]],
    protocol: Any,
    result: Any,
    rows: EvaluationRows,
    comparison: Any,
    out_dir: Path,
    written: list[Path],
    t0: float,
) -> None:
    for method, _, _encoder in model_methods:
        origin = features[method].extra.get("pretrained_on")
        if origin:
            print(f"{method.split('+')[0]}: pretrained on {origin}")
    print(protocol.table(result.rows, rows))
    print(comparison.text())
    extra = "".join(f", {p}" for p in written)
    print(f"results: {out_dir / 'results.json'}{extra}  ({time.perf_counter() - t0:.1f} s)")


def pretrained_on(info: dict[str, Any]) -> str | None:
    """What a healthfm model was pretrained on, in words for result rows: its corpus'
    sources, or its one input (None for a published model, which records none)."""
    sources = (info.get("corpus") or {}).get("sources") or []
    if len(sources) > 1:
        names = [s.get("name", "?") for s in sources]
        shown = ", ".join(names[:6]) + (f", … ({len(names)} sources)" if len(names) > 6 else "")
        held = [s.get("name") for s in sources if s.get("split") == "val"]
        return f"corpus {shown}" + (f" (held out: {', '.join(held)})" if held else "")
    if info.get("source"):
        return f"{Path(str(info['source'])).name} (its train split)"
    return None


def _took(t: float) -> str:
    return format_seconds(time.perf_counter() - t)


def _method_name(
    modality: Modality,
    encoder: Encoder,
    spec: Any,
    pooling: str,
    regression: bool,
    taken: dict[str, Any],
    survival: bool = False,
) -> tuple[str, str]:
    # "tiny-mean+logreg" and its untrained control's "tiny-untrained-mean+logreg"; two
    # models of the same name are told apart by their folders ("tiny@other-mean+logreg").
    probe = "cox" if survival else "ridge" if regression else "logreg"
    # The modality's template names healthfm's own pretraining ("tiny-mae-cls+logreg"); a
    # published model is named by its entry alone ("phikon-cls+logreg").
    template = (
        modality.embedding_method if hasattr(encoder, "config") else Modality.embedding_method
    )

    def named(preset: str) -> tuple[str, str]:
        return (
            template.format(preset=preset, pooling=pooling, probe=probe),
            template.format(preset=f"{preset}-untrained", pooling=pooling, probe=probe),
        )

    name, control = named(encoder.name)
    if name in taken:
        folder = getattr(encoder, "folder", None) or Path(str(spec).partition(":")[2] or spec)
        preset = f"{encoder.name}@{Path(folder).name}"
        name, control = named(preset)
        n = 2
        while name in taken:
            name, control = named(f"{preset}#{n}")
            n += 1
    return name, control


__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_SALT", "evaluate"]
