"""What several stages share: the split a model folder records, fine-tuned folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from healthfm.errors import ConfigError, DataError
from healthfm.modality import DEFAULT_FRACTIONS, DEFAULT_SALT


def split_of_model(
    model_dir: Any, salt: str | None, fractions
) -> tuple[str, tuple[float, float, float]]:
    """The split to use: the given salt / fractions, else the model's, else the defaults."""
    # Function-level: the loader brings torch, which `healthfm tokenize` does not need.
    from healthfm.loader import read_training_info

    info = read_training_info(model_dir) if model_dir is not None else {}
    salt = salt or info.get("split_salt") or DEFAULT_SALT
    fractions = tuple(fractions or info.get("split_fractions") or DEFAULT_FRACTIONS)
    return salt, fractions


def split_of_models(
    models: list, salt: str | None, fractions
) -> tuple[str, tuple[float, float, float]]:
    """The split for several models: the one their pretraining recorded (so the test rows
    were held out from every one of them); two different recorded splits without an
    explicit ``salt`` are a ``ConfigError``. Published models record none."""
    from healthfm.loader import read_training_info

    recorded = {
        split_of_model(m, None, None)
        for m in models
        if read_training_info(m).get("split_salt") is not None
    }
    if salt is None and len(recorded) > 1:
        raise ConfigError(
            "the models were pretrained on different splits "
            f"({'; '.join(f'salt {s!r} {f}' for s, f in sorted(recorded))}); no test split is "
            "held out from all of them: pass --split-salt to choose one knowingly (with "
            "--accept-split-change, since the others were pretrained on part of its test split)"
        )
    if salt is None and recorded:
        salt, recorded_fractions = next(iter(recorded))
        fractions = fractions or recorded_fractions
    return split_of_model(None, salt, fractions)


def finetuned_folders(finetuned, model_dir: Any, model: Any) -> list:
    """The fine-tuned folders to score: ``finetuned``, plus ``model_dir`` when the evaluated
    model itself carries a task head."""
    own = model is not None and getattr(model, "task_head", None) is not None
    own_dir = model_dir if isinstance(model_dir, str | Path) else getattr(model, "folder", None)
    return [*finetuned, *([own_dir] if own and own_dir is not None else [])]


def is_healthfm_file(path: str | Path) -> bool:
    """Whether an existing file is one ``healthfm embed`` writes (so it may replace it):
    embeddings parquet (``key`` + ``embedding``), ``.npy`` with its ``.keys.parquet``, an
    ``.h5ad`` with ``obsm/X_healthfm``, a tile ``.h5`` with ``coords``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = set(pq.read_schema(path).names)
            return {"key", "embedding"} <= names or "healthfm" in names
        if suffix == ".npy":
            return path.with_suffix(".keys.parquet").is_file()
        if suffix in (".h5ad", ".h5"):
            import h5py

            with h5py.File(path, "r") as handle:
                return "obsm/X_healthfm" in handle if suffix == ".h5ad" else "coords" in handle
    except Exception:  # unreadable: not ours, so never replaced
        return False
    return False


def input_paths(*inputs: Any) -> tuple[Path, ...]:
    """The paths a command reads, for :func:`healthfm.fsutil.check_not_input`: plain
    paths, lists of them, and the folder of a ``NAME:DIR`` model spec (in-memory inputs and
    ``None`` are skipped)."""
    from healthfm.encoders.base import split_spec

    found: list[Path] = []
    for item in inputs:
        if isinstance(item, list | tuple):
            found.extend(input_paths(*item))
        elif isinstance(item, str | Path) and str(item):
            try:
                found.append(Path(split_spec(item)[1]))
            except ConfigError:  # an unknown NAME: the path as given
                found.append(Path(item))
        elif getattr(item, "folder", None) is not None:  # a loaded encoder
            found.append(Path(item.folder))
        elif getattr(item, "sources", None) is not None:  # a corpus
            found.extend(input_paths(*[getattr(s, "path", None) for s in item.sources]))
    return tuple(found)


#: Output suffixes that name a file: such an --out that is an existing folder is refused.
FILE_SUFFIXES = (".parquet", ".npy", ".h5ad", ".csv", ".json", ".html")


def check_output_file(
    out: str | Path, input_path: str | Path | None = None, model: Any = None
) -> Path:
    """Refuse an output file path healthfm may not write: an input (the data, the model
    folder, whatever path or link leads to it), a folder where a file is named, or an
    existing file it did not write (a folder output, e.g. per-slide HDF5, passes).

    Raises
    ------
    ConfigError
        Naming the path and what to do.
    """
    from healthfm.fsutil import check_not_input, check_path_text

    out = Path(out)
    check_path_text(out)
    # An in-memory AnnData or encoder is no path; the model folder is an input too.
    check_not_input(out, input_paths(input_path, model), "--out")
    if out.is_dir() and out.suffix.lower() in FILE_SUFFIXES:
        raise ConfigError(
            f"--out names a {out.suffix} file but is an existing folder; give a file name "
            "(healthfm never replaces a folder with a file)",
            file=out,
            column="out",
        )
    if out.is_file() and not is_healthfm_file(out):
        raise ConfigError(
            "the output file exists and is not one healthfm wrote; healthfm replaces only its "
            "own outputs (remove it or choose another --out)",
            file=out,
            column="out",
        )
    return out


def _pretraining_match(info: dict[str, Any], samples: Any) -> int | None:
    """Which pretraining source ``samples`` is (0 for a single-source model, the corpus
    index otherwise), by content hash or by the same path; None for data the model never
    trained on (a transfer evaluation), or a corpus source held out whole."""
    import os

    def same_place(recorded: Any) -> bool:
        if not recorded or not isinstance(samples.source, str | Path):
            return False
        a, b = str(recorded), str(samples.source)
        return a == b or (
            os.path.isabs(a) and os.path.realpath(a) == os.path.realpath(os.path.abspath(b))
        )

    current = getattr(samples, "data_hash", None)
    corpus = (info.get("corpus") or {}).get("sources") or []
    for i, source in enumerate(corpus):
        hit = (current and source.get("data_hash") == current) or same_place(source.get("source"))
        if hit:
            return None if source.get("split") == "val" else i
    if len(corpus) <= 1:
        hit = (current and info.get("data_hash") == current) or same_place(info.get("source"))
        return 0 if hit else None
    return None


def split_changes(
    model_dir: Any,
    modality: Any,
    samples: Any,
    salt: str | None,
    fractions: Any,
    options: Any = None,
) -> list[tuple[str, Any, Any]]:
    """How the split used now differs from the one the model was pretrained with, on the
    same data: ``(field, recorded, now)`` for the split file's SHA-256, the salt, the
    fractions and the group column. Empty for other data (transfer) and published models."""
    if model_dir is None:
        return []
    from healthfm.loader import read_training_info

    info = read_training_info(model_dir)
    if not info or "split_salt" not in info:
        return []
    index = _pretraining_match(info, samples)
    if index is None:
        return []
    changes = []
    recorded = info.get("split_source") or {"source": "hash"}
    now = modality.split_source(samples)
    by_file = now.get("source", "hash") != "hash"
    if index == 0 and recorded.get("source", "hash") != "hash":
        if now.get("sha256") and now.get("sha256") != recorded.get("sha256"):
            changes.append(
                (f"split_source ({recorded['source']} SHA-256)", recorded.get("sha256"),
                 now.get("sha256"))
            )  # fmt: skip
    elif index == 0 and by_file:
        changes.append(("split_source", "hash", now.get("source")))
    if not by_file:
        if salt is not None and salt != info.get("split_salt"):
            changes.append(("split_salt", info.get("split_salt"), salt))
        own = info.get("split_fractions")
        if fractions is not None and own is not None:
            if [round(float(f), 9) for f in fractions] != [round(float(f), 9) for f in own]:
                changes.append(("split_fractions", list(own), list(fractions)))
        group_now = (getattr(samples, "info", None) or {}).get("group_column")
        if group_now is None and options is not None:
            group_now = getattr(options, "group_column", None)
        group_then = (info.get("options") or {}).get("group_column")
        if "group_column" in (info.get("options") or {}) and group_now != group_then:
            changes.append(("group_column", group_then, group_now))
    return changes


def check_split_change(
    model_dir: Any,
    modality: Any,
    samples: Any,
    salt: str | None,
    fractions: Any,
    options: Any = None,
    accept: bool = False,
) -> list[str]:
    """Refuse a split that differs from the model's pretraining split on the same data
    (its test split would hold samples the model was pretrained on), naming the field;
    with ``accept``, return the changed fields (the caller records them in its rows).

    Raises
    ------
    ConfigError
        Naming the field, both values and ``--accept-split-change``.
    """
    changes = split_changes(model_dir, modality, samples, salt, fractions, options)
    if not changes or accept:
        return [name for name, _, _ in changes]
    name, then, now = changes[0]
    field = name.split(" ")[0]
    fix = {
        "split_salt": f"--split-salt {then}",
        "group_column": f"--group-column {then}" if then else "no --group-column",
        "split_fractions": "the model's fractions",
    }.get(field, "the split file it recorded")
    raise ConfigError(
        f"the model was pretrained on this data with {name} {then!r}, this run uses {now!r}: "
        f"its test split would hold samples the model was pretrained on; use {fix}, or pass "
        "--accept-split-change to score it knowingly (the results then record it)",
        file=getattr(samples, "source", None) if isinstance(samples.source, str | Path) else None,
        column=name.split(" ")[0],
    )


def check_split_source(model_dir: Any, modality: Any, samples: Any) -> None:
    """Refuse to hash-split data whose model was pretrained on the data's own split file.

    A model pretrained on a MEDS folder's ``subject_splits.parquet`` trained on its
    ``train`` subjects; the same data without that file would be hash-split, and most
    "held-out" subjects would be ones the model saw. The model folder records its split
    source (``training_info.json``: ``split_source``); when the input lacks it, refuse.

    Raises
    ------
    DataError
        Naming the missing split file and the model's record of it.
    """
    if model_dir is None:
        return
    from healthfm.loader import read_training_info

    recorded = read_training_info(model_dir).get("split_source") or {}
    source = recorded.get("source")
    if not source or source == "hash":
        return
    current = modality.split_source(samples)
    if current.get("source") == source:
        return
    raise DataError(
        f"the model was pretrained with the split of {source} (SHA-256 "
        f"{str(recorded.get('sha256', '?'))[:12]}…) but this input has no {source}: a hash "
        "split would put subjects the model was pretrained on into the test split; put the "
        f"file back (or write one for this data) so the held-out subjects stay held out",
        file=Path(str(samples.source)) / source,
    )
