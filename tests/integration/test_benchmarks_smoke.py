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
    receive = [line for line in text.splitlines() if line.startswith("| receive")]
    send = [line for line in text.splitlines() if line.startswith("| send")]
    # On 1 and 4 associations, each with one receiving process and with one per core.
    assert len(receive) == 2 * len({1, os.cpu_count() or 1}), text
    assert len(send) == 3, text  # send.associations 1, 2 and 4
    for row in receive + send:
        node_rate = float(re.search(r"\| ([0-9.]+) img/s \|", row).group(1))  # type: ignore[union-attr]
        assert node_rate > 0
    assert all("x Orthanc" in row and "x storescp" in row for row in receive)
    assert all("x storescu" in row for row in send)


def test_dicomweb_section_compares_stow_rs_with_dimse(tmp_path: Path) -> None:
    table = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "dicomweb", "--dicomweb-slices", "16",
         "--dicomweb-runs", "1", "--workdir", str(tmp_path / "work"), "--markdown", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    row, receive = [line for line in table.read_text().splitlines()
                    if line.startswith("| dicomweb")]
    assert "16 x 256x256 to Orthanc over STOW-RS" in row
    assert "into the node over STOW-RS" in receive and "x storescu into the node" in receive
    assert re.search(r"\| [0-9.]+ img/s \| the node over DIMSE \(1 association\) [0-9.]+", row)
    assert re.search(r"target >= 0.9x: (met|MISSED)", row)


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


def test_the_adversarial_run_loses_nothing_holds_no_uid_twice_and_answers_the_echoes(
        tmp_path: Path) -> None:
    """Issue 29's attacks at tiny sizes against serve (with a worker) and Orthanc: every
    phase reports, nothing acknowledged is lost, no SOP Instance UID is held twice in
    Orthanc, no derived image is stale, and the C-ECHOs tried during the attacks answered."""
    table = tmp_path / "adversarial.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "adversarial", "--adversarial-quick",
         "--workdir", str(tmp_path / "work"), "--markdown", str(table)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[1]: line for line in table.read_text().splitlines()
            if line.startswith("| adversarial")}
    assert not [k for k in rows if "STOPPED" in k], rows
    assert len([k for k in rows if "C-ECHOs from 127.0.0.1 answered" in k]) == 2
    for key, row in rows.items():
        if "C-ECHOs from 127.0.0.1 answered" in key:
            answered = re.search(r"\| (\d+) of (\d+) \|", row)
            assert answered and answered.group(1) == answered.group(2), row
    assert len([k for k in rows if k.startswith("P-DATA flood")]) == 2
    assert "| 0 UIDs |" in rows["stale/duplicate UIDs: SOP UIDs held twice in Orthanc"]
    assert "| 0 images |" in rows[
        "stale/duplicate UIDs: stale derived images (current derived series)"]
    kept = rows["overall: instances kept of those (indexed, file on disk)"]
    assert "every acknowledged one" in kept
    assert "DIED" not in rows["overall: serve's peak RSS (process tree: serve, receivers, "
                              "worker)"]
