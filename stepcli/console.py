"""Terminal output: diagnostics and progress on stderr, results on stdout.

Only the CLI configures output. The engine logs through ``logging`` and reports progress through
the ``Progress`` protocol, which this module draws with Rich on a terminal and as plain lines
otherwise.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

# Outside a terminal Rich would wrap tables at 80 columns; a wide fixed width keeps rows whole
# in logs and pipes.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)


class Verbosity:
    QUIET = 0
    NORMAL = 1
    VERBOSE = 2


state = {"verbosity": Verbosity.NORMAL}


def configure_logging(verbosity: int) -> None:
    """Send log records to stderr: warnings when quiet, info normally, debug when verbose."""
    state["verbosity"] = verbosity
    level = {Verbosity.QUIET: logging.WARNING, Verbosity.NORMAL: logging.INFO}.get(
        verbosity, logging.DEBUG
    )
    root = logging.getLogger("stepcli")
    root.handlers.clear()
    handler: logging.Handler
    if stderr.is_terminal:
        handler = RichHandler(console=stderr, show_path=False, show_time=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def error(message: str) -> None:
    """Print a one-line error on stderr."""
    stderr.print(f"error: {message}", markup=False, highlight=False)


def info(message: str) -> None:
    """Print a diagnostic line on stderr unless quiet."""
    if state["verbosity"] > Verbosity.QUIET:
        stderr.print(message, markup=False, highlight=False)


class RichProgress:
    """A progress bar with step, loss and speed; plain lines when stderr is not a terminal."""

    def __init__(self) -> None:
        self.enabled = state["verbosity"] > Verbosity.QUIET
        self.live = self.enabled and stderr.is_terminal
        self._bar: Progress | None = None
        self._task = None
        self._title = ""
        self._total = 0
        self._step = 0
        self._last_line = 0.0

    def start(self, run_id: int, title: str, total_steps: int) -> None:
        self._title = f"run {run_id} ({title})"
        self._total = total_steps
        self._step = 0
        if self.live:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._title, total=total_steps, loss="", speed="")
        elif self.enabled:
            stderr.print(f"{self._title}: {total_steps} steps", markup=False, highlight=False)

    def advance(self, step: int) -> None:
        self._step = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def stats(self, loss: float, steps_per_second: float) -> None:
        if self._bar is not None:
            self._bar.update(
                self._task, loss=f"loss {loss:.4f}", speed=f"{steps_per_second:.0f} steps/s"
            )
        elif self.enabled and time.monotonic() - self._last_line > 2:
            self._last_line = time.monotonic()
            stderr.print(
                f"{self._title}: step {self._step}/{self._total} loss {loss:.4f} "
                f"{steps_per_second:.0f} steps/s",
                markup=False,
                highlight=False,
            )

    def finish(self, status: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.enabled:
            stderr.print(
                f"{self._title}: {status} after {self._step} steps", markup=False, highlight=False
            )
