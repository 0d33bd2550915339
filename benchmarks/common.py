"""What every benchmark section shares: generated series (cached), the node and peers, tables."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fixtures.mr_series import generate_series

DEFAULT_WORKDIR = Path(os.environ.get("BENCH_WORKDIR", "/tmp/denoised-node-bench"))


@dataclass
class Row:
    section: str
    what: str
    value: float
    unit: str
    peers: dict[str, float] = field(default_factory=dict)  # peer name -> value, same unit
    note: str = ""

    def ratio(self, peer: str) -> float | None:
        other = self.peers.get(peer)
        return None if not other else self.value / other


# Rician sigma of the generated series: about 5 % of the bright level, above the shipped
# model's noise floor (a quieter series is left alone, and would time nothing).
SERIES_NOISE = 60.0


def series_folder(workdir: Path, slices: int, rows: int = 256, columns: int = 256,
                  seed: int = 7) -> Path:
    """A generated MR series (16-bit, explicit VR LE), made once and kept in workdir."""
    folder = workdir / "data" / f"mr_{slices}x{rows}x{columns}_s{seed}_n{SERIES_NOISE:g}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        generate_series(folder, slices=slices, rows=rows, columns=columns, bits_stored=16,
                        seed=seed, series_number=seed, noise_sigma=SERIES_NOISE,
                        fov_mm=float(max(rows, columns)))
        done.write_text("")
    return folder


def split_folder(source: Path, parts: int, target: Path) -> list[Path]:
    """Hard-link the series' files into ``parts`` folders, for parallel senders."""
    shutil.rmtree(target, ignore_errors=True)
    files = sorted(source.glob("*.dcm"))
    folders = []
    for index in range(parts):
        folder = target / f"part{index}"
        folder.mkdir(parents=True)
        for path in files[index::parts]:
            os.link(path, folder / path.name)
        folders.append(folder)
    return folders


@contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes that spin at the lowest priority a hog can have beside the
    measured ones (the same nice level): a busy machine."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def best_of(runs: int, action: Callable[[], float]) -> float:
    """The median of ``runs`` measurements (each a rate or a duration) : robust on a busy box."""
    return statistics.median(action() for _ in range(runs))


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def format_table(rows: list[Row]) -> str:
    lines = ["| section | measure | denoised-node | peers (same run) | ratio | note |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        peers = ", ".join(f"{name} {value:.4g}" for name, value in row.peers.items()) or "-"
        ratios = ", ".join(f"{row.value / value:.2f}x {name}"
                           for name, value in row.peers.items() if value) or "-"
        lines.append(f"| {row.section} | {row.what} | {row.value:.4g} {row.unit} | {peers} | "
                     f"{ratios} | {row.note} |")
    return "\n".join(lines)


def fsync_latency_ms(folder: Path, count: int = 100) -> float:
    """Median milliseconds to write and fsync a 128 KiB file here: the disk's part of a
    durable receive (the node pays it about three times per image, Orthanc not at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    times = []
    for index in range(count):
        started = time.perf_counter()
        fd = os.open(folder / f"probe{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            os.write(fd, b"\0" * 131072)
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - started)
    shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times) * 1000
