"""How goqctl shows the progress of a long request (import, diff, reflect, stock import).

On a terminal (stderr is a TTY, and not ``TERM=dumb``) a rich progress bar, redrawn in
place and gone when the request ends; otherwise (a log, a pipe, cron) a plain line on
stderr such as ``apply: 40000/100000 rows`` when a phase starts and then every
``LINE_EVERY`` seconds. Nothing is ever written to stdout: that is the result's
(``--json`` above all).

This module must never decide anything about the request: it only draws what the
daemon reported.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from goqd.control.protocol import Progress

# Plain lines: at most one every this many seconds within a phase, so a log of an
# hour-long import stays readable (the daemon itself reports a few times a second).
LINE_EVERY = 5.0

Show = Callable[[Progress], None]


def progress_line(progress: Progress) -> str:
    """``apply: 40000/100000 rows``, or ``import: 40000 listings`` with no total."""
    count = f"{progress.done}" if progress.total is None else f"{progress.done}/{progress.total}"
    unit = f" {progress.unit}" if progress.unit else ""
    return f"{_printable(progress.phase)}: {count}{_printable(unit)}"


def _printable(text: str) -> str:
    # The daemon's words go to a terminal: no control characters (escape sequences).
    return "".join(c if c.isprintable() else "?" for c in text)


class PlainLines:
    """Progress as lines on ``out``: each new phase at once, then every ``every`` s."""

    def __init__(
        self,
        out: TextIO,
        *,
        every: float = LINE_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._every = every
        self._clock = clock
        self._phase: str | None = None
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = self._clock()
        if progress.phase == self._phase and now - self._last < self._every:
            return
        self._phase, self._last = progress.phase, now
        print(progress_line(progress), file=self._out, flush=True)


class Bar:
    """Progress as a rich bar on the terminal behind ``out``, one task per phase."""

    def __init__(self, out: TextIO) -> None:
        # Imported here: rich costs goqctl's every start a noticeable fraction of a
        # second, and only long requests on a terminal draw a bar.
        from rich import progress as rp
        from rich.console import Console

        self._bar = rp.Progress(
            rp.TextColumn("{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("{task.fields[unit]}"),
            rp.TimeElapsedColumn(),
            rp.TimeRemainingColumn(),
            console=Console(file=out),
            transient=True,
        )
        self._task: Any = None
        self._phase: str | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.phase != self._phase:
            if self._task is None:
                self._bar.start()
            else:
                self._bar.remove_task(self._task)
            self._phase = progress.phase
            self._task = self._bar.add_task(
                _printable(progress.phase), total=progress.total, unit=_printable(progress.unit)
            )
        self._bar.update(self._task, completed=progress.done, total=progress.total)

    def close(self) -> None:
        if self._task is not None:
            self._bar.stop()


@contextmanager
def shown_on(out: TextIO | None = None) -> Iterator[Show]:
    """A ``Show`` for the request's progress on ``out`` (stderr): a bar on a terminal,
    plain lines otherwise. The bar is taken down when the block ends, however it ends
    (Ctrl-C included), so the terminal is left as it was."""
    stream = sys.stderr if out is None else out
    if not _is_terminal(stream):
        yield PlainLines(stream)
        return
    bar = Bar(stream)
    try:
        yield bar
    finally:
        bar.close()


def _is_terminal(stream: TextIO) -> bool:
    # A terminal that cannot move the cursor (Emacs' shell, TERM=dumb) would show no bar
    # at all: rich draws none there. Plain lines it can show.
    if os.environ.get("TERM") in ("dumb", "unknown"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False
