"""``healthfm evaluate``: frozen features of every row, probed next to baselines, with CIs.

One flow for every modality: load the encoder, read the input, take the rows the task is
scored on and their split (:meth:`~healthfm.modality.Modality.evaluation_rows`), embed the
rows, compute the baselines on the same rows, run the modality's evaluation protocol
(the shared linear probe, or EHRSHOT's few-shot grid), add fine-tuned models' own
predictions and the modality's extra evaluations, compare every model with the strongest
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
from healthfm.evaluate.finetuned import finetuned_rows
from healthfm.evaluate.paired import compare_result
from healthfm.evaluate.progress import Progress, format_seconds, progress_enabled
from healthfm.evaluate.results import ResultRow, write_results
from healthfm.fsutil import check_output_parent, owned_outputs
from healthfm.loader import load_encoder, read_training_info
from healthfm.modality import (
    DEFAULT_FRACTIONS,
    DEFAULT_SALT,
    Features,
    Modality,
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
    if not encoders and modality_name is None:
        raise ConfigError("evaluate needs a model folder or a modality")
    kinds = sorted({e.modality for e in encoders})
    if len(kinds) > 1:
        raise ConfigError(f"the models take different modalities ({', '.join(kinds)})")
    modality: Modality = get_modality(kinds[0] if encoders else modality_name)
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
    changed: list[str] = []  # a split other than the model's on its own data, accepted
    for spec, encoder in zip(specs, encoders, strict=True):
        check_split_source(encoder, modality, samples)
        fields = check_split_change(
            encoder, modality, samples, salt, fractions, options, accept_split_change
        )
        changed += [f"{spec}: {f}" for f in fields]
    rows = modality.evaluation_rows(samples, options, salt, fractions, ft_dirs)
    if task:
        rows.task = task
    protocol = modality.evaluation_protocol(options)
    if rows.survival:  # time-to-event: the Cox probe and survival metrics
        from healthfm.evaluate.survival import describe_rows, survival_protocol

        protocol = survival_protocol(protocol)
        if echo:
            print(describe_rows(rows))
    seeds = list(seeds) if seeds else list(protocol.seeds)
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

    # Features of every row: the model's embedding, then the baselines'.
    features: dict[str, Features] = {}
    hashes: dict[str, str | None] = {}  # a model's method name (before "+") → its hash
    model_methods: list[tuple[str, str, Any]] = []  # (method, its control, encoder)
    for spec, encoder in zip(specs, encoders, strict=True):
        t = time.perf_counter()
        chosen: dict[str, Any] = {}
        if pooling == "auto":  # chosen on the validation split only
            used, pool_scores, emb = choose_pooling(
                modality, encoder, samples, rows, modality.pooling_candidates(encoder), batch_size
            )
            chosen = {"pooling_selected_on": "val", "pooling_val_scores": pool_scores}
        else:
            emb = modality.embed_rows(encoder, samples, rows, pooling, batch_size)
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
    if include_baselines:
        t = time.perf_counter()
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
    if controls:  # what pretraining bought, and what each model adds to the baseline
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

    # The protocol, fine-tuned models' own predictions, the modality's extra evaluations.
    # One model: every row carries its hash (as before); several: each model's rows get
    # their own below, baselines none.
    model_hash = getattr(encoders[0], "model_hash", None) if len(encoders) == 1 else None
    result = protocol.run(features, rows, seeds, n_boot, model_hash, modality.name, progress=report)
    report.close()
    if ft_dirs:
        ft_rows, ft_scores = finetuned_rows(
            ft_dirs, modality, samples, rows, options, protocol, n_boot, batch_size, salt, fractions
        )
        result.rows += ft_rows
        result.scores.update(ft_scores)
    if not rows.regression and not rows.survival:  # k-NN and clustering rows score classes
        result.rows += modality.extra_evaluations(
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

    # Paired differences to the strongest baseline: delta rows ("A − B") and verdicts.
    comparison = compare_result(result, rows, protocol, n_boot, model_hash, modality.name)
    for row in result.rows + comparison.rows:
        if not row.is_baseline and row.method.split("+")[0] in hashes:
            row.model_hash = hashes[row.method.split("+")[0]]
    for r in result.rows + comparison.rows:  # the untrained control's weights are not the model's
        if r.extra.get("control") == UNTRAINED:
            r.model_hash = None

    report.say(
        f"probes done in {format_seconds(time.perf_counter() - t0)}; writing the results and the report"
    )
    if changed:  # every row says its test split may hold pretraining samples
        for row in result.rows + comparison.rows:
            row.extra["split_change_accepted"] = "; ".join(changed)
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
    if echo:
        for method, _, _encoder in model_methods:
            origin = features[method].extra.get("pretrained_on")
            if origin:
                print(f"{method.split('+')[0]}: pretrained on {origin}")
        print(protocol.table(result.rows, rows))
        print(comparison.text())
        extra = "".join(f", {p}" for p in written)
        print(f"results: {out_dir / 'results.json'}{extra}  ({time.perf_counter() - t0:.1f} s)")
    return result.rows


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
