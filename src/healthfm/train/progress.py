"""What a training run tells the user as it goes: its plan, a bar, throughput and ETA.

:class:`TrainProgress` belongs to one :meth:`~healthfm.train.trainer.Trainer.fit` call.
The trainer hands it each finished optimizer step; it keeps the bar, the log window
(mean loss and tokens/s of the steps since the last ``train_log.jsonl`` row), the step
rows of that log, the periodic throughput/ETA lines and the one early estimate of the
run's wall time (with how to shrink a long run on a CPU). It decides nothing about the
training itself: no number it keeps reaches the model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_NAME", "TrainProgress", "format_seconds", "plan_line", "si", "truncate_log"]

#: The run folder's JSONL log: step rows (loss, lr, throughput, ETA) and held-out values.
LOG_NAME = "train_log.jsonl"


def format_seconds(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``unknown`` for None or not finite."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = round(max(0.0, float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def si(n: int) -> str:
    """1234567 -> '1.2 M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def plan_line(
    plan: dict[str, Any],
    checkpoint_every: int,
    checkpoint_minutes: float | None,
    checkpoint_root: Path | None,
) -> str:
    """``plan: S steps × batch B × C tokens = T token slots; checkpoints every ... in DIR``."""
    tokens = (
        f" × {plan['context']} tokens = {si(plan['tokens'])} token slots"
        if plan.get("tokens")
        else ""
    )
    every = [f"every {checkpoint_every} steps"] if checkpoint_every else []
    if checkpoint_minutes:
        every.append(f"every {checkpoint_minutes:g} min")
    where = f" in {checkpoint_root}" if checkpoint_root is not None else ""
    return f"plan: {plan['steps']} steps × batch {plan['batch_size']}{tokens}" + (
        f"; checkpoints {' and '.join(every)}{where}" if every and where else ""
    )


def truncate_log(path: Path, step: int) -> None:
    """Drop the log rows after ``step``: a resumed run repeats the steps after its checkpoint."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept))


class TrainProgress:
    """The bar, log window and throughput/ETA lines of one ``fit`` call.

    Parameters
    ----------
    say
        Prints a line for the user (the trainer's: main process, ``report`` on).
    log
        Appends a row to ``train_log.jsonl`` (the trainer's: main process, run folder).
    lr_at
        Learning rate of a 0-based step (for the log rows).
    name
        Label of the bar.
    steps
        Steps of the whole run (the bar's total; the last step always gets a log row).
    first_step, end
        Step this call starts from and step it stops at.
    log_every
        Steps between log rows.
    show_bar
        Show the tqdm bar.
    on_cpu
        The run trains on a CPU (a long estimate then says how to shrink the run).
    """

    def __init__(
        self,
        say: Callable[[str], None],
        log: Callable[[dict[str, Any]], None],
        lr_at: Callable[[int], float],
        *,
        name: str,
        steps: int,
        first_step: int,
        end: int,
        log_every: int,
        show_bar: bool,
        on_cpu: bool,
    ) -> None:
        self._say, self._log, self._lr_at = say, log, lr_at
        self.steps, self.first_step, self.end = steps, first_step, end
        self.log_every, self.on_cpu = log_every, on_cpu
        self.bar = tqdm(
            total=steps,
            initial=first_step,
            disable=not show_bar,
            desc=name,
            unit="step",
            dynamic_ncols=True,
        )
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.tokens_total = 0
        self.last_loss = float("nan")
        self.t_window = self.t_start = time.perf_counter()
        # Throughput and ETA: after the first log window, then about every tenth of the run.
        self.report_every = max(log_every, (end - first_step) // 10, 1)
        self.next_report = first_step + log_every
        # ... and once early, before the first window ends (a slow CPU run: see _early_eta).
        self.early: int | None = first_step + min(3, log_every - 1) if log_every > 1 else None

    def step_done(self, step: int, result: dict[str, Any]) -> None:
        """Count optimizer step ``step`` (1-based: steps done) with ``train_step``'s result."""
        self.last_loss = result["loss"]
        self.window_loss += self.last_loss
        self.window_steps += 1
        self.window_tokens += result["tokens"]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}")
        if self.early is not None and self._early_eta(step, self.early):
            self.early = None
        if step % self.log_every == 0 or step == self.steps:
            self._end_window(step, result["grad_norm"])

    def _end_window(self, step: int, grad_norm: float) -> None:
        """The log row of the window ending at ``step``, and now and then a line for the user."""
        elapsed = time.perf_counter() - self.t_window
        self.tokens_total += self.window_tokens
        done = step - self.first_step
        steps_per_s = done / max(time.perf_counter() - self.t_start, 1e-9)
        eta = (self.end - step) / steps_per_s if steps_per_s > 0 else None
        self._log(
            {
                "step": step,
                "loss": self.window_loss / self.window_steps,
                "lr": self._lr_at(step - 1),
                "grad_norm": grad_norm,
                "tokens_per_s": self.window_tokens / max(elapsed, 1e-9),
                "steps_per_s": steps_per_s,
                "eta_s": eta,
            }
        )
        if step >= self.next_report and step < self.end:
            self._say(
                f"step {step}/{self.end}: loss {self.window_loss / self.window_steps:.4f}, "
                f"{self.window_tokens / max(elapsed, 1e-9):,.0f} tokens/s, "
                f"{steps_per_s:.2f} steps/s, ETA {format_seconds(eta)}"
            )
            self.next_report = step + self.report_every
        self.window_loss, self.window_steps, self.window_tokens = 0.0, 0, 0
        self.t_window = time.perf_counter()

    def _early_eta(self, step: int, at: int) -> bool:
        """The estimated wall time after the first steps (at step ``at``, or sooner once a
        step took 30 s), with how to shrink a long run on a CPU; True once said."""
        done = step - self.first_step
        elapsed = time.perf_counter() - self.t_start
        if done <= 0 or (step < at and elapsed < 30.0) or step >= self.end:
            return False
        total = elapsed / done * (self.end - self.first_step)
        text = (
            f"first {done} step(s) took {format_seconds(elapsed)}: the "
            f"{self.end - self.first_step} steps will take about {format_seconds(total)} "
            f"(ETA {format_seconds(total - elapsed)})"
        )
        if self.on_cpu and total > 15 * 60:
            text += (
                "; without a GPU, shrink the run: fewer --steps, a smaller --batch-size "
                "or --max-length (the time of a step grows with both)"
            )
        self._say(text)
        return True

    def wall_seconds(self) -> float:
        """Seconds since this call's loop started."""
        return time.perf_counter() - self.t_start

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()
