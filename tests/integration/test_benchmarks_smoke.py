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
    # receive on 1 and on 4 associations, each with one receiving process and one per core;
    # then send
    receive_processes = len({1, os.cpu_count() or 1})
    assert len(rows) == 2 * receive_processes + 1, text
    for row in rows:
        node_rate = float(re.search(r"\| ([0-9.]+) img/s \|", row).group(1))  # type: ignore[union-attr]
        assert node_rate > 0
    assert all("x Orthanc" in row and "x storescp" in row for row in rows[:-1])
    assert rows[-1].startswith("| send") and "x storescu" in rows[-1]


def test_an_unknown_section_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "recieve"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown section(s): recieve" in done.stderr


def test_the_soak_keeps_every_acknowledged_instance_and_answers_the_probes(
        tmp_path: Path) -> None:
    """A short soak (senders, a slow-loris attacker and an HTTP flood at once): every
    instance acknowledged is kept, serve lives, and the probes are answered."""
    table = tmp_path / "soak.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "soak", "--soak-seconds", "8",
         "--workdir", str(tmp_path / "work"), "--markdown", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[1]: line for line in table.read_text().splitlines()
            if line.startswith("| soak")}
    acknowledged = next(v for k, v in rows.items() if "acknowledged (0x0000)" in k)
    kept = rows["instances kept of those acknowledged (indexed, file on disk)"]
    count = re.search(r"\| (\d+) instances \|", acknowledged)
    assert count and int(count.group(1)) > 0
    assert f"| {count.group(1)} instances |" in kept and "every acknowledged one" in kept
    assert "DIED" not in rows["serve: peak RSS"]
    assert "failed" not in rows["probe C-ECHO once a second: worst latency"]
