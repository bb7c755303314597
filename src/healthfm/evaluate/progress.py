"""Progress of a long evaluation on stderr: a plan line, then a counter with an ETA.

``healthfm evaluate`` used to print nothing until its table (12 minutes on PBMC, 26 on
EHRSHOT). :class:`Progress` says what it is doing: :meth:`Progress.say` prints a line
(the plan, a finished embedding), :meth:`Progress.start` announces ``total`` units of work
(probe fits: methods × seeds), :meth:`Progress.update` counts them. On a terminal the
count is a tqdm bar; otherwise (a log file, a pipe) a plain line at most every
``every_s`` seconds and at the end, with the elapsed time and an ETA from the mean time of
a unit so far. A disabled instance (``enabled=False``, or ``HEALTHFM_PROGRESS=0`` in the
environment, which the test suite sets) prints nothing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# One duration format for training and evaluation lines (re-exported here).
from healthfm.train.progress import format_seconds

__all__ = ["Progress", "format_seconds", "progress_enabled"]


def progress_enabled(asked: bool | None) -> bool:
    """Whether to report: ``asked`` when given, else unless ``HEALTHFM_PROGRESS=0``."""
    if asked is not None:
        return bool(asked)
    return os.environ.get("HEALTHFM_PROGRESS", "1").strip().lower() not in ("0", "false", "no")


class Progress:
    """Lines and a unit counter with an ETA on ``stream`` (stderr by default).

    Parameters
    ----------
    label
        Prefix of every line (``"evaluate"``).
    enabled
        Print anything at all (see :func:`progress_enabled`).
    stream
        Where to write (default: ``sys.stderr`` at the time of writing).
    every_s
        Least seconds between two plain counter lines (no terminal).
    bar
        Use a tqdm bar; default: when ``stream`` is a terminal.
    """

    def __init__(
        self,
        label: str = "evaluate",
        enabled: bool = True,
        stream: TextIO | None = None,
        every_s: float = 20.0,
        bar: bool | None = None,
    ) -> None:
        self.label = label
        self.enabled = enabled
        self._stream = stream
        self.every_s = every_s
        self._bar_wanted = bar
        self._bar: Any = None
        self.total = 0
        self.done = 0
        self._t0 = time.perf_counter()
        self._last = self._t0

    @property
    def stream(self) -> TextIO:
        """The stream written to."""
        return self._stream if self._stream is not None else sys.stderr

    def say(self, text: str) -> None:
        """One line, ``<label>: <text>`` (above the bar, when there is one)."""
        if not self.enabled:
            return
        line = f"{self.label}: {text}"
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def start(self, total: int, plan: str | None = None) -> None:
        """Count ``total`` units from now; ``plan`` is printed first."""
        if plan:
            self.say(plan)
        self.close()
        self.total, self.done = int(total), 0
        self._t0 = self._last = time.perf_counter()
        if not self.enabled or self.total <= 0:
            return
        use_bar = self._bar_wanted
        if use_bar is None:
            use_bar = bool(getattr(self.stream, "isatty", lambda: False)())
        if use_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total, desc=self.label, unit="fit", file=self.stream, leave=False
            )

    def eta(self) -> float | None:
        """Seconds left at the mean time of a unit so far (None before the first)."""
        if self.done == 0:
            return None
        per_unit = (time.perf_counter() - self._t0) / self.done
        return per_unit * max(0, self.total - self.done)

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more units done; ``note`` says which (e.g. the method and seed)."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        eta = self.eta()
        left = "" if eta is None or self.done >= self.total else f", ETA {format_seconds(eta)}"
        what = f" ({note})" if note else ""
        self.say(
            f"{self.done}/{self.total} fits{what}, {format_seconds(now - self._t0)} elapsed{left}"
        )

    def close(self) -> None:
        """Close the bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
