"""The train/evaluate progress bar: total, count and rate from the model code's calls."""

from __future__ import annotations

import io

from denoised_node.daemon.progress_bar import ProgressBar


def test_the_bar_shows_done_of_total_and_lines_above_it() -> None:
    out = io.StringIO()
    bar = ProgressBar("train", "step", file=out, always=True)
    bar.progress(25, 100)
    bar.echo("validation step 25")
    bar.progress(100, 100)
    bar.close()
    text = out.getvalue()
    assert "train:" in text and "100/100" in text and "step/s" in text
    assert "validation step 25\n" in text


def test_off_a_terminal_it_draws_nothing() -> None:
    out = io.StringIO()  # not a TTY: a service's log stays one event a line
    bar = ProgressBar("evaluate", "case", file=out)
    bar.progress(3, 18)
    bar.close()
    assert out.getvalue() == ""
