"""``healthfm tokenize``: a whole input into a token store (the model's tokenizer, or one
fitted on the input's train split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from healthfm.corpus import CorpusSpec, corpus_from_inputs
from healthfm.fsutil import atomic_dir, check_output_dir, confined
from healthfm.modality import (
    DEFAULT_FRACTIONS,
    DEFAULT_SALT,
    Modality,
    check_input_modality,
    get_modality,
    split_indices,
)
from healthfm.tokens import TokenStore


def tokenize(
    modality: Modality | str,
    input_path: Any,
    out: str | Path,
    options: dict[str, Any] | None = None,
    model_dir: str | Path | None = None,
    salt: str = DEFAULT_SALT,
    fractions=DEFAULT_FRACTIONS,
) -> TokenStore:
    """Tokenize a whole input into a store.

    The tokenizer is the model's (``model_dir``) or one fitted on the input's train split.
    A corpus (several inputs, globs or a manifest: :mod:`healthfm.corpus`) gets one
    tokenizer fitted on every source's train split and one store per source,
    ``out/<name>``; the first store is returned.
    """
    modality = get_modality(modality) if isinstance(modality, str) else modality
    from healthfm.stages.common import input_paths

    # Before any work: never a user's folder, nor an input (the data, the --model folder).
    check_output_dir(out, "token store folder", inputs=input_paths(input_path, model_dir))
    options = modality.options(options)
    corpus = corpus_from_inputs(input_path, expand=modality.pretraining.expand_input)
    if not corpus.single:
        return _tokenize_corpus(modality, corpus, Path(out), options, model_dir, salt, fractions)
    check_input_modality(modality, input_path, model=False)
    samples = modality.read(input_path, options)
    if model_dir is not None:
        from healthfm.loader import load_encoder

        tokenizer = load_encoder(model_dir, modality.name).tokenizer
    else:
        train = split_indices(modality.split(samples, salt, tuple(fractions)))["train"]
        tokenizer = modality.fit_tokenizer(samples, train, options)
    modality.check_input(samples, tokenizer)
    return modality.tokenize(tokenizer, samples, out)


def _tokenize_corpus(
    modality: Modality,
    corpus: CorpusSpec,
    out: Path,
    options: Any,
    model_dir: str | Path | None,
    salt: str,
    fractions,
) -> TokenStore:
    from healthfm.loader import load_encoder

    parts = []
    for spec in corpus.sources:
        check_input_modality(modality, spec.path, model=False)
        opts = modality.options({**options.to_dict(), **spec.options}) if spec.options else options
        samples = modality.read(spec.path, opts)
        if spec.split == "auto":
            names = np.asarray(modality.split(samples, salt, tuple(fractions)))
        else:
            names = np.full(len(samples), spec.split)
        parts.append((spec, samples, split_indices(names)["train"]))
    if model_dir is not None:
        tokenizer = load_encoder(model_dir, modality.name).tokenizer
    else:
        tokenizer = modality.fit_corpus_tokenizer([(s, t) for _, s, t in parts], options)
    stores = []
    # One folder holding a store per source, written whole or not at all.
    with atomic_dir(out, kind="token_stores", manifest=False) as tmp:
        for spec, samples, _ in parts:
            modality.check_input(samples, tokenizer)
            # A source name from a manifest is data: its store stays inside --out.
            where = confined(
                tmp, spec.name, "corpus source name", file=corpus.manifest, column="name"
            )
            stores.append(modality.tokenize(tokenizer, samples, where).path.name)
    return TokenStore(out / stores[0])
