"""The progress bar of `train` and `evaluate` (tqdm): total, rate and time left on stderr,
fed by the model code's ``progress(done, total)`` calls. Log lines and messages are written
above the bar; off a terminal (a service, CI) tqdm draws nothing and the log lines remain."""

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
