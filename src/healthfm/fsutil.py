"""File-system helpers: content hashes, atomic writes and what healthfm may replace.

Nothing healthfm writes is ever left half-written: files and folders are written under a
temporary name in the same directory, flushed to disk, then renamed into place.

Nothing healthfm did not write is ever replaced: every folder it writes holds a marker,
``.healthfm.json`` (what wrote it, the list of files it wrote and, for model folders, the
SHA-256 of each: verified when it is loaded). An ``--out`` that exists is replaced only
when it is empty or holds that marker *and* every file in it is one the marker lists: a
folder that merely looks like a model folder (``config.json`` + ``model.safetensors``, a
downloaded Hugging Face model) is a user's folder, and a user's own file put inside a
healthfm folder makes the folder refused, naming that file. Files healthfm writes into a
folder it does not own (``evaluate``'s results, ``tile``'s manifest, ``report``'s HTML)
are recorded in that folder's marker (kind ``outputs``) and replaced only when listed
there (:func:`owned_outputs`, :func:`claim_output_file`). Refusals are a :class:`~healthfm.errors.ConfigError`
before any work starts.

Paths built from data values (slide ids, image names, a tile file's ``source``) go through
:func:`confined`: resolved, and refused unless they stay inside their folder. An output is
never an input (:func:`check_not_input`); one ``--out`` is written by one run at a time
(:func:`output_lock`).

Outputs get the permissions the process umask gives (``mkstemp`` / ``mkdtemp`` make
private 0600 / 0700 entries; they are widened to ``0666 & ~umask`` / ``0777 & ~umask``),
so a colleague on a shared machine reads a model folder as they would any other file.
"""

from __future__ import annotations

import contextlib
import contextvars
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
#: The marker kind of a folder healthfm writes files into without owning the folder
#: (``evaluate --out``, ``tile --out``, the folder of ``report --out``): it lists only the
#: files healthfm wrote there.
OUTPUTS_KIND = "outputs"


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


def marker_files(marker: dict[str, Any] | None) -> set[str] | None:
    """The files a marker lists (relative paths), or None when it lists none (a marker
    written before healthfm recorded its files)."""
    if marker is None:
        return None
    listed = marker.get("files")
    if listed is None and isinstance(marker.get("sha256"), dict):
        listed = list(marker["sha256"])
    if not isinstance(listed, list | dict):
        return None
    return {str(name) for name in listed}


def foreign_files(folder: str | Path) -> list[Path]:
    """Files (and links) in ``folder`` that its marker does not list: not healthfm's.

    Every entry is foreign when the folder has no marker or its marker lists no files.
    """
    folder = Path(folder)
    listed = marker_files(read_marker(folder)) or set()
    found = []
    for entry in sorted(folder.rglob("*")):
        if entry.name == MARKER_NAME and entry.parent == folder:
            continue
        if entry.is_dir() and not entry.is_symlink():
            continue
        if str(entry.relative_to(folder)) not in listed:
            found.append(entry)
    return found


def is_healthfm_output(path: str | Path) -> bool:
    """Whether ``path`` is a folder healthfm wrote and may replace: its marker lists every
    file in it. A folder's layout (``config.json`` + ``model.safetensors`` ...) never
    counts: a downloaded model folder looks the same."""
    path = Path(path)
    if not path.is_dir() or read_marker(path) is None:
        return False
    return marker_files(read_marker(path)) is not None and not foreign_files(path)


def check_output_dir(path: str | Path, what: str = "output folder", inputs: tuple = ()) -> Path:
    """Refuse an output folder healthfm may not replace; return it as a Path.

    It may be absent, an empty folder, or a folder healthfm wrote whose marker lists every
    file in it (see the module docstring); it is never one of ``inputs`` nor holds one.
    Called before any work, so a refused run costs nothing.

    Raises
    ------
    ConfigError
        ``path`` is an existing file, a folder healthfm did not write, a healthfm folder
        holding a file it did not write (named), or an input of the command.
    """
    path = Path(path)
    check_path_text(path)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"the {what} is a broken symbolic link", file=path, column="out")
    check_not_input(path, inputs, what)
    if not path.exists():
        return path
    if not path.is_dir():
        raise ConfigError(
            f"the {what} exists and is a file; healthfm writes a folder here and never "
            "replaces a file it did not write (remove it or choose another --out)",
            file=path,
            column="out",
        )
    if not any(path.iterdir()):
        return path
    marker = read_marker(path)
    if marker is None or marker_files(marker) is None:
        raise ConfigError(
            f"the {what} exists, is not empty and was not written by healthfm (it has no "
            f"{MARKER_NAME} listing its files); healthfm replaces only its own outputs "
            "(remove it or choose another --out)",
            file=path,
            column="out",
        )
    if marker.get("kind") == OUTPUTS_KIND:
        raise ConfigError(
            f"the {what} is a folder of results healthfm wrote files into, not a folder it "
            "wrote as a whole (choose another --out)",
            file=path,
            column="out",
        )
    foreign = foreign_files(path)
    if foreign:
        raise ConfigError(
            f"the {what} was written by healthfm but holds {len(foreign)} file(s) it did not "
            f"write, first {str(foreign[0].relative_to(path))!r}; healthfm never deletes a file "
            "it did not write (move it out, or choose another --out)",
            file=foreign[0],
            column="out",
        )
    return path


def _resolved(path: str | Path) -> Path:
    # Absolute, symlinks followed as far as they exist (a missing tail is kept as given).
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_input(out: str | Path, inputs, what: str = "output") -> None:
    """Refuse an output that is one of the command's inputs, holds one, or lies inside
    an input folder healthfm wrote (a model folder), whatever path or symbolic link leads
    to it.

    Raises
    ------
    ConfigError
        Naming the output and the input.
    """
    if inputs is None or isinstance(inputs, str | Path):
        inputs = () if inputs is None else (inputs,)
    target = _resolved(out)
    for given in inputs:
        if not isinstance(given, str | Path) or not str(given):
            continue
        source = _resolved(given)
        # Into an input folder only where it is one healthfm wrote (a model folder: a new
        # file there would be one its marker does not list); a data folder may hold results.
        into = source.is_dir() and read_marker(source) is not None and _within(target, source)
        if _within(source, target) or into:
            relation = (
                "is the input itself"
                if source == target
                else "holds the input"
                if _within(source, target)
                else "lies inside the input folder"
            )
            raise ConfigError(
                f"the {what} {relation} ({given}); healthfm never writes over or into what "
                "a command reads (choose another --out)",
                file=out,
                column="out",
            )


def check_path_text(path: str | Path) -> None:
    """Refuse a path that cannot be written to this file system's names (e.g. bytes that
    are not UTF-8 on a UTF-8 system: Python keeps them as surrogates)."""
    text = os.fspath(path)
    try:
        os.fsencode(text)
        text.encode("utf-8")
    except UnicodeError:
        raise ConfigError(
            "the path is not valid text (bytes that are not UTF-8); rename it",
            file=text.encode("utf-8", "backslashreplace").decode(),
            column="out",
        ) from None


def confined(
    base: str | Path,
    relative: Any,
    what: str = "path",
    *,
    file: str | Path | None = None,
    column: str | None = None,
    row: int | str | None = None,
) -> Path:
    """``base / relative`` for a path taken from data, refused unless it stays inside
    ``base`` once resolved (``..``, an absolute path or a symbolic link leading out).

    Parameters
    ----------
    base
        The folder the data's paths are relative to.
    relative
        The data value (a slide id, an image name, a tile file's ``source``).
    what
        What the value is, for the message.
    file, column, row
        Where the value came from.

    Raises
    ------
    DataError
        Naming the value, and the file, column and row it came from.
    """
    from healthfm.errors import DataError

    text = os.fspath(relative) if isinstance(relative, str | Path) else str(relative)
    where = {"file": file, "column": column, "row": row}
    if not text or "\x00" in text:
        raise DataError(f"the {what} {text!r} is not a usable file name", **where)
    if os.path.isabs(text):
        raise DataError(
            f"the {what} {text!r} is an absolute path; healthfm reads and writes only inside "
            f"{base}",
            **where,
        )
    root = _resolved(base)
    joined = Path(base) / text
    if not _within(_resolved(joined), root):
        raise DataError(
            f"the {what} {text!r} leads outside {base} ('..' or a symbolic link); healthfm "
            "reads and writes only inside it",
            **where,
        )
    return joined


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
    """Write ``folder``'s marker: the kind of output, the healthfm version, the files it
    holds and (with ``manifest``) the SHA-256 of every file."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("healthfm")
    except PackageNotFoundError:  # a source tree that is not installed
        release = "0+unknown"
    names = [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if (p.is_file() or p.is_symlink()) and p.relative_to(folder) != Path(MARKER_NAME)
    ]
    marker = {"healthfm": MARKER_FORMAT, "kind": kind, "healthfm_version": release}
    # Every file it wrote is listed: only those are ever replaced (check_output_dir).
    marker["files"] = names
    if manifest:
        marker["sha256"] = {name: sha256_file(folder / name) for name in names}
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
    ledger = _claim(path)
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
        _record(ledger, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write (by any library) that becomes ``path``
    only when the block ends without error: fsync, then rename; removed on failure."""
    path = Path(path)
    ledger = _claim(path)
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
        _record(ledger, path)
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


# ---------------------------------------------------------------- files in others' folders
def claim_output_file(path: str | Path, what: str = "output file", ours=None) -> Path:
    """Check that healthfm may write ``path``, a file in a folder it does not own.

    It may be absent, or a file healthfm wrote there earlier: listed in the folder's
    marker (:func:`owned_outputs`), or recognised by ``ours(path)`` (a format only
    healthfm writes, e.g. the report's generator tag). A folder, a link or a user's file
    is refused.

    Raises
    ------
    ConfigError
        Naming the file.
    """
    path = Path(path)
    check_path_text(path)
    if path.is_dir():
        raise ConfigError(
            f"the {what} is an existing folder; give a file name", file=path, column="out"
        )
    if not path.exists() and not path.is_symlink():
        return path
    listed = marker_files(read_marker(path.parent)) or set()
    if path.is_symlink() or (path.name not in listed and not (ours and ours(path))):
        raise ConfigError(
            f"the {what} exists and was not written by healthfm; healthfm replaces only "
            "its own outputs (remove it or choose another --out)",
            file=path,
            column="out",
        )
    return path


# ---------------------------------------------------------------- writable, free space
#: Free space an output location must have before a run starts, at least.
MIN_FREE_BYTES = 16 << 20


def check_writable(
    path: str | Path, what: str = "output", need_bytes: int = MIN_FREE_BYTES
) -> None:
    """Refuse, before any work, an output whose folder cannot be written or is (nearly)
    full: a clear message instead of an ``OSError`` after hours of work.

    ``path`` is the output (a file or folder, existing or not); its nearest existing
    ancestor is checked by writing and removing a small probe file.

    Raises
    ------
    ConfigError
        Naming the folder, and whether it is read-only or full.
    """
    path = _resolved(path)
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"the {what}'s folder is a file", file=parent, column="out")
    try:
        fd, probe = tempfile.mkstemp(prefix=".healthfm-probe.", dir=parent)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the {what} here ({exc.strerror or exc}): the folder is read-only, "
            "not yours, or full; choose another --out",
            file=parent,
            column="out",
        ) from None
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < need_bytes:
        raise ConfigError(
            f"the {what}'s file system is full ({free / 2**20:.1f} MiB free, at least "
            f"{need_bytes / 2**20:.0f} MiB needed); free space or choose another --out",
            file=parent,
            column="out",
        )


def explain_os_error(exc: OSError, what: str = "output") -> ConfigError:
    """An ``OSError`` met while writing, as one clear error naming the file."""
    import errno

    reason = {
        errno.ENOSPC: "the file system is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }.get(exc.errno, exc.strerror or str(exc))
    return ConfigError(f"could not write the {what}: {reason}", file=exc.filename, column="out")


# ---------------------------------------------------------------- one run per output
def lock_path(out: str | Path) -> Path:
    """The lock file of an output: ``.NAME.healthfm.lock`` beside it."""
    out = _resolved(out)
    return out.with_name(f".{out.name}.healthfm.lock")


@contextlib.contextmanager
def output_lock(out: str | Path, what: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` while a run writes it: a second run on the same
    output fails at once, naming the first (pid, host, start time).

    ``fcntl.flock`` on :func:`lock_path` (released by the kernel when the process dies, so
    a ``kill -9`` never leaves a stale lock); the file is removed when the run ends. Under
    torchrun only rank 0 takes it. Where ``flock`` is unavailable, runs are not locked.

    Raises
    ------
    ConfigError
        Another run holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield Path(out)
        return
    if os.environ.get("RANK", "0") != "0":
        yield Path(out)
        return
    import socket
    import time

    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            try:
                first = json.loads(holder)
                who = (
                    f"pid {first.get('pid')} on {first.get('host')}, started "
                    f"{first.get('started')}: {first.get('command')}"
                )
            except ValueError:
                who = "another process"
            raise ConfigError(
                f"another healthfm run is writing this output ({who}); wait for it to end "
                "or choose another --out",
                file=out,
                column="out",
            ) from None
        # The file may have been removed by the run that just ended: lock the live one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    import sys

    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["healthfm", *sys.argv[1:]])[:500],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    try:
        yield Path(out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------- run folders
def check_run_dir(
    run_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    what: str = "run folder",
    out: str | Path | None = None,
) -> bool:
    """Refuse to start afresh over a run folder holding the checkpoints of an interrupted
    run, unless ``resume`` (continue it) or ``overwrite`` (discard it knowingly) is given.

    A run that finished wrote its result, ``out`` (a folder with healthfm's marker, written
    after its last checkpoint): its checkpoints are no unfinished work, and a new run may
    start afresh over them.

    Returns
    -------
    bool
        Whether a fresh start should discard the checkpoints there (``overwrite``, or a
        finished run's).

    Raises
    ------
    ConfigError
        Naming the run folder and the two flags.
    """
    if run_dir is None or resume:
        return False
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir()] if root.is_dir() else []
    if not found or overwrite:
        return bool(found)
    latest = max(p.stat().st_mtime for p in found)
    result = Path(out) / MARKER_NAME if out is not None else None
    if result is not None and result.is_file() and result.stat().st_mtime >= latest:
        return True  # finished: its model folder was written after its last checkpoint
    found = sorted((p.name for p in found), key=lambda n: (len(n), n))
    if found:
        raise ConfigError(
            f"the {what} holds the checkpoints of an earlier run ({len(found)}, latest "
            f"{found[-1]}); add --resume to continue it, or --overwrite to discard them",
            file=run_dir,
            column="run_dir",
        )


# ---------------------------------------------------------------- results folders
class _Ledger:
    """The files healthfm wrote into a folder it does not own, kept in the folder's
    marker (kind ``outputs``); rewritten at most every ``FLUSH_SECONDS`` and at the end."""

    FLUSH_SECONDS = 1.0

    def __init__(self, root: Path, what: str, ours) -> None:
        self.root, self.what, self.ours = root, what, ours
        self.listed = marker_files(read_marker(root)) or set()
        self.dirty = False
        self.flushed_at = 0.0

    def relative(self, path: Path) -> str | None:
        target = _resolved(path)
        if not _within(target, self.root) or target == self.root:
            return None
        rel = target.relative_to(self.root)
        # Inside a temporary folder being built (renamed later): not a file of its own.
        if any(part.startswith(".") for part in rel.parts[:-1]):
            return None
        return str(rel)

    def claim(self, path: Path) -> None:
        rel = self.relative(path)
        if rel is None or rel == MARKER_NAME:
            return
        if not path.exists() and not path.is_symlink():
            return
        if path.is_dir() and not path.is_symlink():
            raise ConfigError(
                f"healthfm would write a file where {self.what} has a folder; it never "
                "replaces what it did not write (remove it or choose another --out)",
                file=path,
                column="out",
            )
        if path.is_symlink() or (rel not in self.listed and not (self.ours and self.ours(path))):
            raise ConfigError(
                f"{self.what} holds a file healthfm did not write, {rel!r}, where it would write "
                f"one; healthfm replaces only its own outputs (listed in {MARKER_NAME}): move it "
                "or choose another --out",
                file=path,
                column="out",
            )

    def add(self, path: Path) -> None:
        import time

        rel = self.relative(path)
        if rel is None or rel == MARKER_NAME or rel in self.listed:
            return
        self.listed.add(rel)
        self.dirty = True
        if time.monotonic() - self.flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        import time

        if not self.dirty:
            return
        from importlib.metadata import PackageNotFoundError, version

        try:
            release = version("healthfm")
        except PackageNotFoundError:
            release = "0+unknown"
        marker = {
            "healthfm": MARKER_FORMAT,
            "kind": OUTPUTS_KIND,
            "healthfm_version": release,
            "files": sorted(self.listed),
        }
        data = (json.dumps(marker, indent=2) + "\n").encode()
        token = _GUARDED.set(())  # the marker itself is not a guarded output
        try:
            atomic_write_bytes(self.root / MARKER_NAME, data)
        finally:
            _GUARDED.reset(token)
        self.dirty = False
        self.flushed_at = time.monotonic()


_GUARDED: contextvars.ContextVar[tuple[_Ledger, ...]] = contextvars.ContextVar(
    "healthfm_guarded_outputs", default=()
)


def _ledger_of(path: Path) -> _Ledger | None:
    found = [g for g in _GUARDED.get() if g.relative(path) is not None]
    return max(found, key=lambda g: len(g.root.parts)) if found else None


def _claim(path: Path) -> _Ledger | None:
    ledger = _ledger_of(path) if _GUARDED.get() else None
    if ledger is not None:
        ledger.claim(path)
    return ledger


def _record(ledger: _Ledger | None, path: Path) -> None:
    if ledger is not None:
        ledger.add(path)


@contextlib.contextmanager
def owned_outputs(folder: str | Path, what: str = "the output folder", ours=None):
    """Guard a folder healthfm writes files into without owning it (``evaluate --out``,
    ``tile --out``): while the block runs, every atomic write below ``folder`` refuses to
    replace a file healthfm did not write there, and records each file it writes in the
    folder's marker (kind ``outputs``), so a later run may replace exactly those.

    ``ours(path)`` may recognise a file healthfm wrote by its format (a tile ``.h5``), for
    folders written before the marker listed files.

    Raises
    ------
    ConfigError
        ``folder`` is a folder healthfm wrote as a whole (a model folder, a token store):
        files of another command never go into it.
    """
    root = _resolved(folder)
    marker = read_marker(root)
    if marker is not None and marker.get("kind") != OUTPUTS_KIND:
        raise ConfigError(
            f"{what} is a {marker.get('kind', 'healthfm')} folder healthfm wrote as a whole; "
            "results never go into it (choose another --out)",
            file=folder,
            column="out",
        )
    if marker is None and (root / MARKER_NAME).exists():
        raise ConfigError(
            f"{what} holds a {MARKER_NAME} healthfm cannot read; it never replaces it "
            "(move it or choose another --out)",
            file=root / MARKER_NAME,
            column="out",
        )
    ledger = _Ledger(root, what, ours)
    token = _GUARDED.set((*_GUARDED.get(), ledger))
    try:
        yield ledger
    finally:
        _GUARDED.reset(token)
        if root.is_dir():
            ledger.flush()
