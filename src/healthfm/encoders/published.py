"""What every published model's loader shares: safe reading of the authors' files, strict
weight loading with messages that name the file and tensor, a content hash of the folder,
and :class:`PublishedEncoder`, the base of the native re-implementations.

Nothing here executes code from a model folder: weights are read from safetensors or with
``torch.load(weights_only=True)``, pickled dictionaries with :func:`safe_unpickle` (plain
containers, strings, numbers and numpy scalars only), and ``trust_remote_code`` is never
set anywhere in healthfm.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthfm.errors import ConfigError, ModelError

# What a pickled dictionary may reconstruct: containers and numpy scalars/arrays of plain
# dtypes. numpy's own pickles name these (module, name) pairs; anything else (os.system,
# builtins.eval, a class of the author's package) is refused before it is called.
_PICKLE_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("_codecs", "encode"),  # bytes pickled by protocol 2
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise ModelError(
            f"refusing to unpickle {module}.{name}: a dictionary file may hold only "
            "containers, strings and numbers (this one wants to run code)",
            file=self._path,
        )


def safe_unpickle(path: str | Path) -> Any:
    """Read a pickled dictionary without running code from it.

    Parameters
    ----------
    path
        The pickle file (Geneformer's token and median dictionaries, ...).

    Raises
    ------
    ModelError
        When the file is missing or corrupt, or asks for anything but plain containers,
        strings, numbers and numpy scalars.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError("file not found", file=path)
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, path).load()
    except ModelError:
        raise
    except Exception as exc:  # truncated or not a pickle
        raise ModelError(f"not a readable pickle ({type(exc).__name__}: {exc})", file=path) from exc


def read_json(path: str | Path) -> Any:
    """A JSON file of a model folder; missing or malformed is a ``ModelError``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("file not found", file=path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"not valid JSON ({exc})", file=path) from exc


def find_file(folder: Path, names: Iterable[str], what: str) -> Path:
    """The first of ``names`` present in ``folder`` (a ``ModelError`` naming them all)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{what}: model folder does not exist", file=folder)
    names = list(names)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{what}: the folder holds none of {', '.join(names)}", file=folder)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch pickle read with
    ``weights_only=True`` (a plain state dict, or one nested under ``state_dict``/``model``).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            from healthfm.model.pretrained import torch_load_tensors

            state = torch_load_tensors(path)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            file=path,
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ModelError("weights file does not hold a state dict of tensors", file=path)
    return dict(state)


def load_weights(
    module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, ignore=()
) -> None:
    """Copy ``state`` into ``module`` strictly: every parameter present with its shape.

    Parameters
    ----------
    ignore
        Prefixes of checkpoint keys the encoder does not use (pretraining heads).

    Raises
    ------
    ModelError
        Naming the file and the first missing, unexpected or mis-shaped tensors.
    """
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise ModelError(
            "weights do not fit this architecture (a folder of another model?): "
            + "; ".join(problems),
            file=path,
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def folder_hash(files: Iterable[Path]) -> str:
    """SHA-256 over the named files of a folder (their names and bytes), for provenance."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in files):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def content_hash(tokenizer: Any) -> str:
    """SHA-256 of a published tokenizer's settings and its dictionaries' contents, without
    the paths it read them from (``config["files"]``): the same folder copied elsewhere
    hashes the same."""
    from healthfm.fsutil import json_hash

    data = tokenizer.to_dict()
    data["config"] = {k: v for k, v in data["config"].items() if k != "files"}
    return json_hash(data)


class PublishedEncoder(nn.Module):
    """Base of healthfm's native implementations of published models (an
    :class:`~healthfm.encoders.Encoder`).

    A subclass builds its network from the authors' configuration, implements
    :meth:`forward_features` (token states of a collated batch, whose ``ids`` are the
    tokenizer's ids with healthfm's pad id at padded positions and ``attention_mask``
    True at real tokens), and overrides :meth:`embed` where its authors pool otherwise.
    """

    #: Which end of a too-long sample is kept (embedding's collate reads it).
    truncate: str = "head"
    #: Poolings this encoder offers (its authors' first).
    poolings: tuple[str, ...] = ("mean", "cls")

    def __init__(
        self,
        name: str,
        modality: str,
        dim: int,
        pooling: str,
        max_len: int,
        tokenizer: Any,
        folder: Path,
        model_hash: str | None,
    ) -> None:
        super().__init__()
        self.name = name
        self.modality = modality
        self.dim = int(dim)
        self.pooling = pooling
        self.max_len = int(max_len)
        self.tokenizer = tokenizer
        self.folder = Path(folder)
        self.model_hash = model_hash

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token states ``(B, T, dim)``."""
        raise NotImplementedError

    def check_pooling(self, pooling: str | None) -> str:
        """The pooling to use: ``pooling`` or the default; one not offered is a ConfigError."""
        pooling = pooling or self.pooling
        if pooling not in self.poolings:
            raise ConfigError(f"{self.name} pools by {', '.join(self.poolings)}, not {pooling!r}")
        return pooling

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """Pooled vectors ``(B, dim)``: mean over real tokens, or the first token."""
        from healthfm.model.heads import pool

        pooling = self.check_pooling(pooling)
        return pool(self.forward_features(batch), batch.get("attention_mask"), pooling)

    def untrained(self, seed: int = 0) -> PublishedEncoder:
        """The same architecture with fresh random weights (seeded): the control that says
        what pretraining bought. Every submodule with ``reset_parameters`` is re-drawn;
        subclasses with parameters of their own override :meth:`reset_own_parameters`."""
        import copy

        clone = copy.deepcopy(self)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in clone.modules():
                if module is not clone and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            clone.reset_own_parameters()
        clone.name = f"{self.name}-untrained"
        clone.model_hash = None
        return clone.eval()

    def reset_own_parameters(self) -> None:
        """Re-draw parameters held directly (CLS tokens, position tables); none here."""
