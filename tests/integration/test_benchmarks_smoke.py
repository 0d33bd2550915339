"""`python -m benchmarks` as the README runs it, on a small series: the DICOM sections
measure the node and the real peers in one run and print a table with ratios."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_receive_and_send_sections_print_figures_next_to_the_peers(tmp_path: Path) -> None:
    table = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "receive,send", "--slices", "24",
         "--workdir", str(tmp_path / "work"), "--markdown", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = table.read_text()
    assert text.startswith("Machine: ") and "write+fsync of 128 KiB" in text
    rows = [line for line in text.splitlines() if line.startswith(("| receive", "| send"))]
    assert len(rows) == 3, text  # receive on 1 and on 4 associations, send
    for row in rows:
        node_rate = float(re.search(r"\| ([0-9.]+) img/s \|", row).group(1))  # type: ignore[union-attr]
        assert node_rate > 0
    assert "x Orthanc" in rows[0] and "x storescp" in rows[0] and "x storescu" in rows[2]


def test_an_unknown_section_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "recieve"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown section(s): recieve" in done.stderr
