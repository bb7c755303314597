"""``healthfm tokenize``: a whole input into a token store (the model's tokenizer, or one
fitted on the input's train split)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from healthfm.fsutil import check_output_dir
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
    from healthfm.encoders import load_encoder

    modality = get_modality(modality) if isinstance(modality, str) else modality
    check_output_dir(out, "token store folder")  # before any work: never a user's folder
    options = modality.options(options)
    check_input_modality(modality, input_path, model=False)
    samples = modality.read(input_path, options)
    if model_dir is not None:
        tokenizer = load_encoder(model_dir, modality.name).tokenizer
    else:
        train = split_indices(modality.split(samples, salt, tuple(fractions)))["train"]
        tokenizer = modality.fit_tokenizer(samples, train, options)
    modality.check_input(samples, tokenizer)
    return modality.tokenize(tokenizer, samples, out)
