"""Typed errors that say where the problem is: file, column (or field) and row.

Every error raised on bad input is a :class:`HealthFMError`, so callers can catch one
type; the subclasses say which side is at fault (the data, the model folder, a
checkpoint, a configuration).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


class HealthFMError(Exception):
    """Base class of every error healthfm raises on purpose.

    Parameters
    ----------
    message
        What is wrong, in words a user can act on.
    file
        The file or folder at fault, if any.
    column
        The column, field, layer or tensor name at fault, if any.
    row
        The first offending row (0-based data row, header excluded), sample or key.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        column: str | None = None,
        row: int | str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.column = column
        self.row = row
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"file {self.file}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        if self.row is not None:
            where.append(f"row {self.row}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class DataError(HealthFMError):
    """The input data is malformed, empty, or does not fit the task."""


class ModelError(HealthFMError):
    """A model folder is missing, incomplete, from another modality or a newer format."""


class CheckpointError(HealthFMError):
    """A training checkpoint is corrupt, truncated or from another configuration."""


class ConfigError(HealthFMError):
    """An option or configuration value is invalid."""


class TrainingInterrupted(HealthFMError):
    """Training stopped on a signal (SIGTERM, SIGUSR1) after saving a checkpoint.

    ``file`` is the checkpoint; ``signal`` the signal number (the CLI exits 128 + it).
    """

    def __init__(self, message: str, *, file=None, signal: int = 0) -> None:
        self.signal = signal
        super().__init__(message, file=file)


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or a one-line ``ConfigError`` naming the extra.

    Here, at the bottom of the package, so that a modality (scVI for single-cell) and the
    published encoders share it without importing each other.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"this needs {module!r} ({exc}); install it with: pip install 'healthfm[{extra}]'"
        ) from exc
