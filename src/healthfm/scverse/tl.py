"""scanpy-style API: ``fit`` a cell model on an AnnData, ``tl.embed`` cells into ``obsm``.

>>> import scanpy as sc, healthfm.scverse as hsc
>>> model = hsc.fit(adata, out="pbmc_model", steps=300)          # counts in adata.X
>>> hsc.tl.embed(adata, model)                                    # adata.obsm["X_healthfm"]
>>> sc.pp.neighbors(adata, use_rep="X_healthfm"); sc.tl.umap(adata)

``fit`` runs the shared pretrain stage and ``embed`` the modality's own parts (the same
reader validation, tokenizer, trainer and token store as the CLI), so a model fitted here
embeds the same way from the command line. This module is a facade over the stages, so it
sits above them (outside the single-cell modality package, which never imports a stage).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError
from healthfm.model.heads import FoundationModel

__all__ = ["embed", "fit"]


def _modality():
    from healthfm.modality import get_modality

    return get_modality("singlecell")


def _load(model: FoundationModel | str | Path) -> FoundationModel:
    if not isinstance(model, str | Path):
        if getattr(model, "tokenizer", None) is None:
            raise ConfigError("the model has no tokenizer; load it with healthfm.load(folder)")
        if model.modality != "singlecell":
            raise ConfigError(f"a {model.modality!r} model cannot embed cells")
        return model
    from healthfm.encoders import split_spec
    from healthfm.loader import load_encoder

    if split_spec(model)[0] != "healthfm":  # NAME:DIR of a published model (geneformer:DIR)
        return load_encoder(model, modality="singlecell")
    from healthfm.loader import load

    return load(model, modality="singlecell")


def fit(
    adata: Any,
    out: str | Path | None = None,
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    total_column: str | None = None,
    tokenizer: str = "rank",
    max_length: int | None = None,
    preset: str = "tiny",
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    normalized: bool = False,
    **model_overrides: Any,
) -> FoundationModel:
    """Pretrain a cell model (masked gene modelling) on the train split of ``adata``.

    Parameters
    ----------
    adata
        An AnnData with raw counts in ``X`` (or ``layer``), or the path of an ``.h5ad``.
    out
        Model folder to write; a temporary folder (deleted after loading) when None.
    layer, gene_column, label_column, group_column, total_column, normalized
        Reader options (see :func:`healthfm.singlecell.read_h5ad`). Give ``label_column``
        if you will evaluate on the same data: the split is then stratified by label and
        the test cells are held out of pretraining.
    tokenizer
        ``"rank"`` (Geneformer) or ``"binned"`` (scGPT).
    max_length
        Tokens per cell including ``[CLS]`` (default: the longest training cell, <= 2048).
    preset, steps, batch_size, lr, seed
        Model size and optimisation.
    model_overrides
        Extra :class:`~healthfm.model.ModelConfig` fields.

    Returns
    -------
    FoundationModel
        The trained model, with ``model.tokenizer`` set.
    """
    from healthfm.loader import load
    from healthfm.stages.pretrain import pretrain
    from healthfm.train.trainer import TrainConfig

    options = {
        "layer": layer,
        "gene_column": gene_column,
        "label_column": label_column,
        "group_column": group_column,
        "total_column": total_column,
        "tokenizer": tokenizer,
        "max_length": max_length,
        "normalized": normalized,
    }
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 5),
        checkpoint_every=max(1, steps // 2),
        seed=seed,
    )
    with tempfile.TemporaryDirectory(prefix="healthfm-fit-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / "model"
        run_dir = Path(tmp) / "run"
        source = adata
        if not isinstance(adata, str | Path):
            # The pretrain stage reads files: hand it the AnnData as an .h5ad.
            source = Path(tmp) / "input.h5ad"
            adata.write_h5ad(source)
        pretrain(
            _modality(),
            source,
            target,
            options,
            preset=preset,
            train_config=config,
            run_dir=run_dir,
            model_overrides=model_overrides or None,
        )
        return load(target, modality="singlecell")


def embed(
    adata: Any,
    model: FoundationModel | str | Path,
    key_added: str = "X_healthfm",
    *,
    layer: str | None = None,
    gene_column: str | None = None,
    total_column: str | None = None,
    normalized: bool = False,
    pooling: str | None = None,
    batch_size: int = 128,
    bf16: bool = False,
    copy: bool = False,
) -> Any:
    """Embed every cell of ``adata`` with a cell model, scanpy style.

    Writes ``adata.obsm[key_added]`` (float32, cells × d_model) and the run parameters to
    ``adata.uns["healthfm"][key_added]`` (model hash, tokenizer, pooling, vocabulary
    coverage, cells/s).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` (or ``layer``).
    model
        A model folder or a loaded model.
    key_added
        ``obsm`` key.
    layer, gene_column, total_column, normalized
        Reader options; ``total_column`` defaults to the one the tokenizer was fitted with
        when ``adata.obs`` has it.
    pooling
        "mean" / "cls"; the model's default when None.
    batch_size, bf16
        Inference batch size and bf16 autocast.
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    AnnData or None
        The copy when ``copy=True``.
    """
    from healthfm.inference import embed_store

    t0 = time.perf_counter()
    model = _load(model)
    modality = _modality()
    tokenizer = model.tokenizer
    if total_column is None and getattr(tokenizer, "total_column", None) in adata.obs.columns:
        total_column = tokenizer.total_column
    adata = adata.copy() if copy else adata
    samples = modality.read(
        adata,
        {
            "layer": layer,
            "gene_column": gene_column,
            "total_column": total_column,
            "normalized": normalized,
        },
    )
    modality.check_input(samples, tokenizer)
    with tempfile.TemporaryDirectory(prefix="healthfm-embed-") as tmp:
        store = modality.tokenize(tokenizer, samples, Path(tmp) / "store")
        emb = embed_store(model, store, pooling, batch_size, bf16)
    seconds = time.perf_counter() - t0
    adata.obsm[key_added] = np.ascontiguousarray(emb, dtype=np.float32)
    info = adata.uns.get("healthfm", {})
    info = dict(info) if isinstance(info, dict) else {}
    info[key_added] = {
        "model_hash": str(getattr(model, "model_hash", "") or ""),
        "tokenizer": str(tokenizer.type),
        "tokenizer_hash": tokenizer.hash,
        "pooling": pooling or model.pooling,
        "preset": str(model.name or ""),
        "d_model": int(model.dim),
        "max_length": int(tokenizer.max_length),
        "layer": layer or "X",
        "gene_column": samples.info.get("gene_column") or "var_names",
        "total_column": total_column or "row sums",
        **{k: v for k, v in samples.info.get("coverage", {}).items()},
        "seconds": float(seconds),
        "cells_per_second": float(adata.n_obs / seconds) if seconds > 0 else float("nan"),
    }
    adata.uns["healthfm"] = info
    return adata if copy else None
