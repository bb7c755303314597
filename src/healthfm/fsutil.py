"""File-system helpers: content hashes, atomic writes and what healthfm may replace.

Nothing healthfm writes is ever left half-written: files and folders are written under a
temporary name in the same directory, flushed to disk, then renamed into place.

Nothing healthfm did not write is ever replaced: every folder it writes holds a marker,
``.healthfm.json`` (what wrote it, and the SHA-256 of each file: a model folder's
checksums are verified when it is loaded). An ``--out`` that exists is replaced only when
it is empty, holds that marker, or has the layout an earlier healthfm version wrote
(:data:`LEGACY_LAYOUTS`); a user's folder or file is refused with a
:class:`~healthfm.errors.ConfigError` before any work starts.

Outputs get the permissions the process umask gives (``mkstemp`` / ``mkdtemp`` make
private 0600 / 0700 entries; they are widened to ``0666 & ~umask`` / ``0777 & ~umask``),
so a colleague on a shared machine reads a model folder as they would any other file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from healthfm.errors import ConfigError, ModelError

#: The marker (and manifest) file of every folder healthfm writes.
MARKER_NAME = ".healthfm.json"
MARKER_FORMAT = 1
#: Files that identify a folder written by a healthfm version without the marker: a model
#: folder, a token store, a training checkpoint, a LoRA adapter folder.
LEGACY_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("config.json", "model.safetensors"),
    ("meta.json", "offsets.npy", "keys.parquet"),
    ("trainer_state.json", "model.safetensors"),
    ("adapter_config.json", "healthfm_adapter.json"),
)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(sha256_file(child).encode())
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal objects give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_hash(obj: Any) -> str:
    """Hex SHA-256 of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def current_umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything below it) the umask's permissions.

    ``mkstemp`` / ``mkdtemp`` (and some writers, e.g. safetensors) create private
    entries; an output should be as readable as anything else the user creates.
    """
    path = Path(path)
    mask = current_umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_symlink():
            continue
        mode = 0o777 if entry.is_dir() else 0o666
        # Keep an executable bit a writer set on purpose.
        if not entry.is_dir() and entry.stat().st_mode & 0o100:
            mode = 0o777
        with contextlib.suppress(OSError):
            os.chmod(entry, mode & ~mask)


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``.healthfm.json`` marker, or None when it has none (or it is unreadable)."""
    path = Path(folder) / MARKER_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "healthfm" in data else None


def is_healthfm_output(path: str | Path) -> bool:
    """Whether ``path`` is a folder healthfm wrote: its marker, or an earlier layout."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER_NAME).is_file():
        return True
    return any(all((path / name).exists() for name in layout) for layout in LEGACY_LAYOUTS)


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Refuse an output folder healthfm may not replace; return it as a Path.

    It may be absent, an empty folder, or a folder healthfm wrote (see the module
    docstring). Called before any work, so a refused run costs nothing.

    Raises
    ------
    ConfigError
        ``path`` is an existing file, or a non-empty folder healthfm did not write.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"the {what} is a broken symbolic link", file=path, column="out")
    if not path.exists():
        return path
    if not path.is_dir():
        raise ConfigError(
            f"the {what} exists and is a file; healthfm writes a folder here and never "
            "replaces a file it did not write (remove it or choose another --out)",
            file=path,
            column="out",
        )
    if is_healthfm_output(path) or not any(path.iterdir()):
        return path
    raise ConfigError(
        f"the {what} exists, is not empty and was not written by healthfm (it has no "
        f"{MARKER_NAME}); healthfm replaces only its own outputs (remove it or choose "
        "another --out)",
        file=path,
        column="out",
    )


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Refuse an output file path that is an existing folder; return it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"the {what} is an existing folder; give a file name", file=path, column="out"
        )
    return path


def check_output_parent(path: str | Path, what: str = "output folder") -> Path:
    """Refuse a folder that files are written into when it is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"the {what} exists and is a file; give a folder", file=path, column="out"
        )
    return path


def write_marker(folder: Path, kind: str, manifest: bool) -> None:
    """Write ``folder``'s marker: the kind of output, the healthfm version and (with
    ``manifest``) the SHA-256 of every file."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("healthfm")
    except PackageNotFoundError:  # a source tree that is not installed
        release = "0+unknown"
    files = {}
    if manifest:
        files = {
            str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER_NAME
        }
    marker = {"healthfm": MARKER_FORMAT, "kind": kind, "healthfm_version": release}
    if manifest:
        marker["sha256"] = files
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def verify_manifest(
    folder: str | Path, known: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Check every file listed in ``folder``'s marker against its SHA-256.

    Parameters
    ----------
    folder
        A folder healthfm wrote.
    known
        Digests the caller computed already (file name → hex), not read again.

    Returns
    -------
    dict or None
        The marker, or None when the folder has none (written by an earlier version).

    Raises
    ------
    ModelError
        A listed file is missing or its content changed (bit flip, truncation, edit).
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        if (folder / MARKER_NAME).exists():
            raise ModelError(f"{MARKER_NAME} is damaged", file=folder / MARKER_NAME)
        return None
    sums = marker.get("sha256") or {}
    if not isinstance(sums, dict):
        raise ModelError("the checksums are not a mapping", file=folder / MARKER_NAME)
    for name, digest in sums.items():
        file = folder / name
        if not file.is_file():
            raise ModelError(f"file {name} listed in {MARKER_NAME} is missing", file=file)
        actual = (known or {}).get(name) or sha256_file(file)
        if actual != digest:
            raise ModelError(
                "file is corrupt or was modified: its SHA-256 differs from the one recorded "
                f"when the folder was written ({MARKER_NAME})",
                file=file,
            )
    return marker


def _fsync_dir(path: Path) -> None:
    # Persist the rename itself; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write (by any library) that becomes ``path``
    only when the block ends without error: fsync, then rename; removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path`` and the folders themselves."""
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    for folder in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        _fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(final: str | Path, kind: str = "folder", manifest: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``final`` only on success.

    ``final`` must pass :func:`check_output_dir` (absent, empty, or healthfm's own); it is
    then replaced as a whole. On any exception the temporary folder is removed and
    ``final`` is left as it was. The folder gets its marker (``kind``, and with
    ``manifest`` the SHA-256 of every file) and the umask's permissions.
    """
    final = check_output_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        write_marker(tmp, kind, manifest)
        apply_umask(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it to ``final``, replacing a folder healthfm may replace."""
    fsync_tree(tmp)
    check_output_dir(final)  # again: it may have appeared while the work ran
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
