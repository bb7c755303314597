"""The token store: what training reads.

A store is a folder holding one flat binary array per field (``ids.bin`` int32, optional
``values.bin`` float32 and ``times.bin`` float64), an ``offsets.npy`` (int64, ``n + 1``
entries) marking where each sample starts, the sample keys (``keys.parquet``) and a
``meta.json`` (format version, tokenizer hash, counts, dtypes).

Reading memory-maps the arrays: sample ``i`` is the slice ``offsets[i]:offsets[i+1]`` of
each field, so random access is O(1) and memory does not grow with the store. A
:class:`TokenStore` pickles without its maps (they are reopened lazily), so DataLoader
workers and torchrun ranks share the same files safely.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from healthfm.errors import DataError
from healthfm.fsutil import apply_umask, check_output_dir, replace_dir, write_marker

STORE_FORMAT_VERSION = 1
FIELD_DTYPES: dict[str, np.dtype] = {
    "ids": np.dtype(np.int32),
    "values": np.dtype(np.float32),
    "times": np.dtype(np.float64),
}


@dataclass
class TokenChunk:
    """A batch of tokenized samples in flat (concatenated) form.

    Attributes
    ----------
    ids
        int32 token ids of all samples, concatenated.
    offsets
        int64 array of ``n + 1`` positions; sample ``i`` is ``ids[offsets[i]:offsets[i+1]]``.
    keys
        One key per sample (sequence id, subject id, cell barcode, tile id).
    values, times
        Optional float32 / float64 arrays aligned with ``ids`` (NaN where none).
    """

    ids: np.ndarray
    offsets: np.ndarray
    keys: Sequence[Any]
    values: np.ndarray | None = None
    times: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.values is not None:
            self.values = np.asarray(self.values, dtype=np.float32)
        if self.times is not None:
            self.times = np.asarray(self.times, dtype=np.float64)
        n = len(self.offsets) - 1
        if n != len(self.keys):
            raise ValueError(f"{n} samples by offsets but {len(self.keys)} keys")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError("offsets must start at 0 and end at len(ids)")
        for name in ("values", "times"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != len(self.ids):
                raise ValueError(f"{name} has {len(arr)} entries, ids has {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> dict[str, Any]:
        """Return sample ``i`` as a dict of arrays plus its key."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        out: dict[str, Any] = {"ids": self.ids[lo:hi], "key": self.keys[i]}
        if self.values is not None:
            out["values"] = self.values[lo:hi]
        if self.times is not None:
            out["times"] = self.times[lo:hi]
        return out


class TokenStoreWriter:
    """Stream :class:`TokenChunk` objects into a new token store.

    The store is built in a temporary folder next to ``path`` and renamed into place by
    :meth:`close`; if anything fails (or the writer is used as a context manager and an
    exception escapes), no partial store is left behind.

    Parameters
    ----------
    path
        The store folder to create (replaced as a whole if it exists).
    tokenizer_hash
        Hash of the tokenizer that produced the tokens; readers check it.
    fields
        Which optional fields the store has, among ``"values"`` and ``"times"``.
    extra_meta
        Free-form JSON-serialisable information kept in ``meta.json``.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer_hash: str,
        fields: Sequence[str] = (),
        extra_meta: dict[str, Any] | None = None,
    ) -> None:
        unknown = set(fields) - {"values", "times"}
        if unknown:
            raise ValueError(f"unknown token-store fields {sorted(unknown)}")
        self.path = Path(path)
        self.tokenizer_hash = tokenizer_hash
        self.fields = ["ids", *[f for f in ("values", "times") if f in fields]]
        self.extra_meta = extra_meta or {}
        # Before any work: a user's folder (or file) at the path is never replaced.
        check_output_dir(self.path, "token store folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
        self._files = {f: open(self._tmp / f"{f}.bin", "wb") for f in self.fields}
        self._offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._keys: list[Any] = []
        self._n_tokens = 0
        self._closed = False

    def write(self, chunk: TokenChunk) -> None:
        """Append a chunk of samples."""
        for field in self.fields:
            arr = getattr(chunk, field)
            if arr is None:
                raise ValueError(f"store has field {field!r} but the chunk has none")
            self._files[field].write(np.ascontiguousarray(arr, FIELD_DTYPES[field]).tobytes())
        self._offsets.append(chunk.offsets[1:] + self._n_tokens)
        self._keys.extend(chunk.keys)
        self._n_tokens += len(chunk.ids)

    def close(self) -> Path:
        """Finish the store and move it into place; return its path."""
        if self._closed:
            return self.path
        for handle in self._files.values():
            handle.close()
        offsets = np.concatenate(self._offsets)
        np.save(self._tmp / "offsets.npy", offsets)
        keys = pa.array(self._keys)
        pq.write_table(pa.table({"key": keys}), self._tmp / "keys.parquet")
        lengths = np.diff(offsets)
        meta = {
            "format_version": STORE_FORMAT_VERSION,
            "tokenizer_hash": self.tokenizer_hash,
            "n_samples": len(self._keys),
            "n_tokens": int(self._n_tokens),
            "max_length": int(lengths.max()) if len(lengths) else 0,
            "fields": {f: FIELD_DTYPES[f].name for f in self.fields},
            **self.extra_meta,
        }
        (self._tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # The marker without a manifest: readers check meta.json, hashing gigabytes of
        # token ids on every open would cost more than it protects.
        write_marker(self._tmp, "token_store", manifest=False)
        apply_umask(self._tmp)
        try:
            replace_dir(self._tmp, self.path)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        for handle in self._files.values():
            handle.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenStore:
    """Read-only, memory-mapped access to a token store folder.

    Parameters
    ----------
    path
        The store folder.
    tokenizer_hash
        If given, the hash the store must have been written with; a mismatch is a
        :class:`~healthfm.errors.DataError` (tokens from another tokenizer mean nothing
        to this model).
    """

    def __init__(self, path: str | Path, tokenizer_hash: str | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError("not a token store: meta.json is missing", file=self.path)
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"meta.json is not valid JSON: {exc}", file=meta_path) from exc
        version = self.meta.get("format_version")
        if not isinstance(version, int) or version > STORE_FORMAT_VERSION:
            raise DataError(
                f"token store format {version!r} is newer than this healthfm reads "
                f"({STORE_FORMAT_VERSION})",
                file=meta_path,
                column="format_version",
            )
        if tokenizer_hash is not None and self.meta.get("tokenizer_hash") != tokenizer_hash:
            raise DataError(
                "token store was written by another tokenizer (hash "
                f"{str(self.meta.get('tokenizer_hash'))[:12]}… != expected {tokenizer_hash[:12]}…); "
                "re-tokenize the data with this model's tokenizer",
                file=self.path,
                column="tokenizer_hash",
            )
        self.fields: list[str] = list(self.meta["fields"])
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        n = self.meta["n_samples"]
        if len(self.offsets) != n + 1 or int(self.offsets[-1]) != self.meta["n_tokens"]:
            raise DataError(
                "offsets.npy does not match meta.json (truncated store?)", file=self.path
            )
        for field in self.fields:
            size = (self.path / f"{field}.bin").stat().st_size
            expected = self.meta["n_tokens"] * FIELD_DTYPES[field].itemsize
            if size != expected:
                raise DataError(
                    f"{field}.bin has {size} bytes, expected {expected} (truncated store?)",
                    file=self.path / f"{field}.bin",
                )
        self._maps: dict[str, np.ndarray] | None = None
        self._keys: list[Any] | None = None

    # Memory maps are reopened lazily in each process instead of being pickled (pickling a
    # np.memmap copies its data).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        state["offsets"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")

    @property
    def tokenizer_hash(self) -> str:
        """Hash of the tokenizer that wrote the store."""
        return self.meta["tokenizer_hash"]

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """The memory-mapped field arrays, opened on first use in this process."""
        if self._maps is None:
            n_tokens = self.meta["n_tokens"]
            self._maps = {
                f: (
                    np.memmap(self.path / f"{f}.bin", dtype=FIELD_DTYPES[f], mode="r")
                    if n_tokens
                    else np.zeros(0, FIELD_DTYPES[f])
                )
                for f in self.fields
            }
        return self._maps

    @property
    def keys(self) -> list[Any]:
        """The sample keys, in store order."""
        if self._keys is None:
            self._keys = pq.read_table(self.path / "keys.parquet").column("key").to_pylist()
        return self._keys

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of every sample (int64)."""
        return np.diff(np.asarray(self.offsets))

    def __len__(self) -> int:
        return int(self.meta["n_samples"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n}")
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {f: np.array(m[lo:hi]) for f, m in self.maps.items()}

    def __repr__(self) -> str:
        return (
            f"TokenStore({str(self.path)!r}, samples={len(self)}, "
            f"tokens={self.meta['n_tokens']}, fields={self.fields})"
        )


def write_store(
    path: str | Path,
    chunks,
    tokenizer_hash: str,
    fields: Sequence[str] = (),
    extra_meta: dict[str, Any] | None = None,
) -> TokenStore:
    """Write an iterable of :class:`TokenChunk` to ``path`` atomically and open it."""
    with TokenStoreWriter(path, tokenizer_hash, fields, extra_meta) as writer:
        for chunk in chunks:
            writer.write(chunk)
    return TokenStore(path, tokenizer_hash)
