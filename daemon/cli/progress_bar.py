"""Progress on stderr, fed by the model code's ``progress(done, total)`` calls.

`train` and `evaluate` draw a tqdm bar (total, rate and time left), with log lines and
messages above it; off a terminal (a service, CI) it draws nothing and the log lines remain.
`denoise` writes one status line (LineProgress): redrawn in place with \r on a terminal, and
off one (a log file, a pipe) a whole line at each tenth of the work, never run together."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ProgressBar:
    def __init__(self, description: str, unit: str, file: Any = None,
                 always: bool = False) -> None:
        self.description = description
        self.unit = unit
        self.file = file or sys.stderr
        self.always = always  # draw even off a terminal (tests)
        self._bar: Any = None

    def progress(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.description, unit=self.unit,
                             file=self.file, dynamic_ncols=True,
                             disable=False if self.always else None)
        self._bar.total = total
        self._bar.update(max(0, done - self._bar.n))

    def echo(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.file)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LineProgress:
    """``{description} {done}/{total} {unit}``: in place on a terminal, else whole lines."""

    STEPS = 10  # off a terminal: a line at each tenth done, and at the end

    def __init__(self, description: str, unit: str, file: Any = None,
                 terminal: bool | None = None) -> None:
        self.description = description
        self.unit = unit
        self.file = file or sys.stderr
        self.terminal = self.file.isatty() if terminal is None else terminal
        self._drawn = False  # a terminal line is open (no newline yet)
        self._step = -1

    def progress(self, done: int, total: int) -> None:
        text = f"{self.description} {done}/{total} {self.unit}"
        if self.terminal:
            self.file.write(f"\r{text}")
            self._drawn = True
        else:
            step = self.STEPS if total <= 0 else min(self.STEPS, done * self.STEPS // total)
            if step <= self._step:
                return
            self._step = step
            self.file.write(f"{text}\n")
        self.file.flush()

    def close(self) -> None:
        """End the terminal line before any message that follows, error or not."""
        if self._drawn:
            self.file.write("\n")
            self.file.flush()
            self._drawn = False


@contextmanager
def progress_bar(description: str, unit: str) -> Iterator[ProgressBar]:
    """A bar for the block; the node's log lines go above it meanwhile."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = ProgressBar(description, unit)
    try:
        with logging_redirect_tqdm():
            yield bar
    finally:
        bar.close()
