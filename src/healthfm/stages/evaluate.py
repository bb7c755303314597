"""``healthfm evaluate``: frozen features of every row, probed next to baselines, with CIs.

One flow for every modality: load the encoder, read the input, take the rows the task is
scored on and their split (:meth:`~healthfm.modality.Modality.evaluation_rows`), embed the
rows, compute the baselines on the same rows, run the modality's evaluation protocol
(the shared linear probe, or EHRSHOT's few-shot grid), add fine-tuned models' own
predictions and the modality's extra evaluations, write ``results.json`` (and the
protocol's files), print the table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from healthfm.encoders import Encoder, load_encoder
from healthfm.errors import ConfigError
from healthfm.evaluate.controls import UNTRAINED, choose_pooling, control_features
from healthfm.evaluate.results import ResultRow, write_results
from healthfm.modality import (
    DEFAULT_FRACTIONS,
    DEFAULT_SALT,
    Features,
    Modality,
    get_modality,
    split_indices,
)
from healthfm.stages.common import finetuned_folders, split_of_model


def evaluate(
    model_dir: str | Path | Encoder | None,
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
) -> list[ResultRow]:
    """Probe a model's embeddings next to the modality's baselines on the same rows.

    Parameters
    ----------
    model_dir
        A model folder, a LoRA adapter folder, ``NAME:DIR`` of a registered encoder, a
        loaded :class:`~healthfm.encoders.Encoder`, or None (baselines only; then
        ``modality_name`` is needed).
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

    Returns
    -------
    list of ResultRow
        Also written to ``out_dir/results.json``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    encoder = load_encoder(model_dir, modality_name) if model_dir is not None else None
    if encoder is None and modality_name is None:
        raise ConfigError("evaluate needs a model folder or a modality")
    modality: Modality = get_modality(encoder.modality if encoder else modality_name)
    options = modality.options(options)
    salt, fractions = split_of_model(model_dir, salt, fractions)
    ft_dirs = finetuned_folders(finetuned, model_dir, encoder)
    if encoder is None and not include_baselines and not ft_dirs:
        raise ConfigError("nothing to evaluate: no model, no --finetuned and --no-baselines")

    # The rows the task is scored on, their split and targets.
    samples = modality.read(input_path, options)
    rows = modality.evaluation_rows(samples, options, salt, fractions, ft_dirs)
    if task:
        rows.task = task
    protocol = modality.evaluation_protocol(options)
    seeds = list(seeds) if seeds else list(protocol.seeds)

    # Features of every row: the model's embedding, then the baselines'.
    features: dict[str, Features] = {}
    model_method = None
    if encoder is not None:
        t = time.perf_counter()
        chosen: dict[str, Any] = {}
        if pooling == "auto":  # chosen on the validation split only
            pooling, pool_scores, emb = choose_pooling(
                modality, encoder, samples, rows, modality.pooling_candidates(encoder), batch_size
            )
            chosen = {"pooling_selected_on": "val", "pooling_val_scores": pool_scores}
        else:
            emb = modality.embed_rows(encoder, samples, rows, pooling, batch_size)
        used = pooling or encoder.pooling
        model_method = modality.embedding_method.format(
            preset=encoder.name, pooling=used, probe="ridge" if rows.regression else "logreg"
        )
        features[model_method] = Features(
            emb, baseline=False, extra={"pooling": used, **chosen}, seconds=time.perf_counter() - t
        )
    if include_baselines:
        for name, feats in modality.baseline_features(samples, rows).items():
            # The same features under a ridge probe for a regression: say so in the name.
            features[name.replace("+logreg", "+ridge") if rows.regression else name] = feats
    if controls and model_method is not None:
        used = features[model_method].extra["pooling"]
        features.update(
            control_features(
                modality, encoder, samples, rows, features, model_method, used, batch_size
            )
        )

    # The protocol, fine-tuned models' own predictions, the modality's extra evaluations.
    model_hash = getattr(encoder, "model_hash", None)
    result = protocol.run(features, rows, seeds, n_boot, model_hash, modality.name)
    if ft_dirs:
        ft_rows, ft_scores = modality.finetuned_rows(
            ft_dirs,
            samples,
            rows,
            protocol.reported(rows.regression, len(rows.classes)),
            n_boot,
            batch_size,
            salt,
            fractions,
        )
        result.rows += ft_rows
        result.scores.update(ft_scores)
    if not rows.regression:  # k-NN and clustering rows score classes
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

    for r in result.rows:  # the untrained control's weights are not the model's
        if r.extra.get("control") == UNTRAINED:
            r.model_hash = None

    # Outputs.
    write_results(out_dir / "results.json", result.rows)
    written = protocol.write_outputs(
        out_dir,
        result,
        rows,
        {"seeds": seeds, "n_boot": n_boot, "total_seconds": time.perf_counter() - t0},
    )
    if echo:
        print(protocol.table(result.rows, rows))
        extra = "".join(f", {p}" for p in written)
        print(f"results: {out_dir / 'results.json'}{extra}  ({time.perf_counter() - t0:.1f} s)")
    return result.rows


__all__ = ["DEFAULT_FRACTIONS", "DEFAULT_SALT", "evaluate"]
