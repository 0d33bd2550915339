"""The train/evaluate progress bar: total, count and rate from the model code's calls."""

from __future__ import annotations

import io

from denoised_node.daemon.cli.progress_bar import LineProgress, ProgressBar


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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_denoise_progress_off_a_terminal_is_a_few_whole_lines() -> None:
    """Issue 30, item 14: off a terminal \r-redrawn updates ran together in a log."""
    out = io.StringIO()
    line = LineProgress("denoising", "slices", file=out)
    for done in range(201):
        line.progress(done, 200)
    line.close()
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and lines[-1] == ""
    assert lines[0] == "denoising 0/200 slices" and lines[-2] == "denoising 200/200 slices"
    assert len(lines) - 1 == LineProgress.STEPS + 1


def test_denoise_progress_on_a_terminal_is_redrawn_in_place() -> None:
    out = _Terminal()
    line = LineProgress("denoising", "slices", file=out)
    line.progress(1, 2)
    line.progress(2, 2)
    line.close()
    assert out.getvalue() == "\rdenoising 1/2 slices\rdenoising 2/2 slices\n"
