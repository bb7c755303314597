"""Load a model folder of any modality: ``healthfm.load``.

:mod:`healthfm.model` knows no modality, yet a model folder may need one: the modality's
package registers the objective (pathology's "mae") and the tokenizer type its
``config.json`` and ``tokenizer.json`` name. This module sits above both: it reads the
config, imports the modality it names, then loads the folder strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from healthfm.modality import get_modality, modality_names
from healthfm.model.pretrained import load as load_registered
from healthfm.model.pretrained import read_config


def load(
    name_or_path: str | Path, modality: str | None = None, path: str | Path | None = None
) -> Any:
    """Load a model folder written by :func:`healthfm.save_pretrained`, or, with ``path``,
    a registered published model from its authors' folder.

    >>> healthfm.load("runs/dna-tiny")                        # doctest: +SKIP
    >>> healthfm.load("geneformer", path="Geneformer/gf-6L")  # doctest: +SKIP

    Parameters
    ----------
    name_or_path
        The model folder; or, when ``path`` is given, the registry name
        (``healthfm models`` lists them).
    modality
        If given, the modality the caller expects; a model of another modality is a
        :class:`~healthfm.errors.ModelError`.
    path
        The published model's folder.

    Returns
    -------
    FoundationModel or Encoder
        In eval mode; a healthfm folder's model has ``.tokenizer`` (or None), ``.folder``
        and ``.model_hash`` set.
    """
    if path is not None:
        from healthfm.encoders import load_encoder

        return load_encoder(f"{name_or_path}:{path}", modality)
    path = name_or_path
    config = read_config(path)
    # Import the model's modality, which registers its objectives and tokenizers. A model of
    # a name no modality carries (tests, or objectives registered by the caller) loads
    # as is; a model of another modality than the expected one is refused by the load.
    if (modality is None or modality == config.modality) and config.modality in modality_names():
        get_modality(config.modality)
    return load_registered(path, modality=modality)
