"""``healthfm embed``: one vector per sample (or per label row, per tile) of an input.

Load the encoder, then for each of the modality's embedding inputs (the input itself, or
one slide at a time): embed its samples with the encoder and write them in the modality's
format (parquet or ``.npy``, ``.h5ad`` with ``obsm``, MEDS label rows, Trident HDF5).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from healthfm.encoders import Encoder, describe, load_encoder
from healthfm.modality import check_input_modality, get_modality
from healthfm.stages.common import check_output_file


def embed(
    model_dir: str | Path | Encoder,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    pooling: str | None = None,
    batch_size: int = 128,
    bf16: bool = False,
    modality_name: str | None = None,
    echo: bool = False,
) -> Path:
    """Embed every sample of an input with an encoder and write the embeddings.

    Parameters
    ----------
    model_dir
        A model folder, a LoRA adapter folder, ``NAME:DIR`` of a registered encoder, or
        a loaded :class:`~healthfm.encoders.Encoder`.
    input_path
        The input, read by the encoder's modality with ``options``.
    out
        Output file or folder (its form is the modality's: ``.parquet``, ``.npy``,
        ``.h5ad``, a folder of per-slide HDF5 files ...).
    pooling, batch_size, bf16
        Pooling (the encoder's by default), inference batch size, bf16 autocast.
    modality_name
        The modality the caller expects (checked against the encoder).
    echo
        Print a final line: how many vectors, how fast, where.

    Returns
    -------
    Path
        What was written.
    """
    check_output_file(out, input_path)
    encoder = load_encoder(model_dir, modality_name)
    modality = get_modality(encoder.modality)
    options = modality.options(options)
    check_input_modality(modality, input_path)
    attrs = {**describe(encoder), "pooling": pooling or encoder.pooling}
    t0, count = time.perf_counter(), 0
    for samples, target in modality.embedding_inputs(input_path, options, Path(out), encoder):
        try:
            embeddings = modality.embed_samples(
                encoder, samples, options, pooling, batch_size, bf16
            )
            modality.write_embeddings(target, samples, embeddings, attrs, options)
        except BaseException:
            # Files the modality wrote for this input on the way (a slide's tile file and
            # thumbnails) are not left behind by a failed embedding.
            for path in samples.info.get("written", []):
                Path(path).unlink(missing_ok=True)
            raise
        count += len(embeddings)
    if echo:
        seconds = time.perf_counter() - t0
        print(
            f"embedded {count:,} rows with {encoder.name} in {seconds:.1f} s "
            f"({count / max(seconds, 1e-9):,.1f}/s, read and tokenize included): {out}"
        )
    return Path(out)
