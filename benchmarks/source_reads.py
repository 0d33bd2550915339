"""How often one worker job opens each source file: `python -m benchmarks.source_reads`.

Receives a generated classic MR series (40 slices by default) into a fresh node, runs one
job through the worker (a stand-in denoiser, a sender that keeps nothing) and counts, per
stored source file, every open of it (a Python audit hook: any reader, pydicom's deferred
reads included) and the calls of pydicom.dcmread and read_file_meta_info naming it.

`--save FILE` writes the derived files' SHA-256 (the job's clock is fixed, so two runs of the
same code give the same bytes); `--compare FILE` checks this run's against them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pydicom.filereader

from denoised_node.config.settings import Destination, Settings, load_settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs import worker as worker_module
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.db import make_engine
from denoised_node.storage.models import Series
from denoised_node.storage.runtime import open_runtime
from denoised_node.storage.schema import upgrade
from tests.fixtures.mr_series import generate_series
from tests.unit.conftest import ScaledDenoiser

FIXED_TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class ReadCounter:
    """Counts opens and pydicom parses of the files under ``folder`` while ``active``."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self.active = False
        self.opens: Counter[str] = Counter()
        self.parses: Counter[str] = Counter()
        sys.addaudithook(self._audit)
        pydicom.dcmread = self._counting(pydicom.dcmread)  # type: ignore[assignment]
        pydicom.filereader.dcmread = pydicom.dcmread  # type: ignore[assignment]
        pydicom.filereader.read_file_meta_info = self._counting(  # type: ignore[assignment]
            pydicom.filereader.read_file_meta_info)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event == "open" and self._ours(args[0]):
            self.opens[str(args[0])] += 1

    def _ours(self, path: object) -> bool:
        return isinstance(path, (str, Path)) and str(path).startswith(self.folder)

    def _counting(self, read: Callable[..., Any]) -> Callable[..., Any]:
        def counted(source: Any, *args: Any, **kwargs: Any) -> Any:
            name = source if isinstance(source, (str, Path)) else getattr(source, "name", None)
            if self.active and self._ours(name):
                self.parses[str(name)] += 1
            return read(source, *args, **kwargs)

        return counted


def _settings(data_dir: Path) -> Settings:
    return load_settings(None, environ={
        "DENOISED_NODE_NODE__DATA_DIR": str(data_dir), "DENOISED_NODE_NODE__MIN_FREE_MB": "0",
        "DENOISED_NODE_GATE__ENABLED": "false"})


def _discard(settings: Settings, destination: Destination, files: Sequence[Path],
             progress: object = None) -> SendResult:
    return SendResult(destination.name, len(files))


def run_one_job(workdir: Path, **spec: Any) -> tuple[ReadCounter, dict[str, str]]:
    series = generate_series(workdir / "generated", **spec)
    settings = _settings(workdir / "data")
    upgrade(make_engine(settings.database_url))
    runtime = open_runtime(settings)
    receiver = Receiver(runtime.store, runtime.sessions, settings)
    for path in series.paths:
        receiver.receive(path.read_bytes(), None, "MOD")
    with runtime.sessions.begin() as session:
        for row in session.query(Series):
            row.last_received_at -= timedelta(minutes=5)
    complete_idle_series(runtime.sessions, settings.series)
    counter = ReadCounter(runtime.store.instances)
    # The derived objects' creation times come from the worker's clock: fixed, so that two
    # runs of the same code write the same bytes (the queue keeps its own clock).
    worker_module.utcnow = lambda: FIXED_TIME  # type: ignore[assignment]
    worker = Worker(settings, runtime.sessions, runtime.store, ScaledDenoiser(),
                    worker_id="source-reads", sender=_discard)
    counter.active = True
    try:
        handled = worker.run(burst=True)
    finally:
        counter.active = False
    if handled != 1:
        raise SystemExit(f"expected one job, the worker handled {handled}")
    derived = sorted(runtime.store.derived.rglob("*.dcm"))
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in derived}
    return counter, digests


def _summary(counts: Counter[str], files: int) -> str:
    values = [counts.get(path, 0) for path in counts] + [0] * (files - len(counts))
    return f"total {sum(values)}, per file min {min(values)} max {max(values)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--echoes", type=int, default=1)
    parser.add_argument("--enhanced", action="store_true", help="one Enhanced MR object")
    parser.add_argument("--syntax", default="1.2.840.10008.1.2.1", help="transfer syntax UID")
    parser.add_argument("--save", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        counter, digests = run_one_job(Path(folder), slices=args.slices, echoes=args.echoes,
                                       enhanced=args.enhanced, transfer_syntax=args.syntax)
    files = 1 if args.enhanced else args.slices * args.echoes
    print(f"{files} source file(s), {len(digests)} derived")
    print(f"opens:                         {_summary(counter.opens, files)}")
    print(f"dcmread + read_file_meta_info: {_summary(counter.parses, files)}")
    if args.save:
        args.save.write_text(json.dumps(digests, indent=1, sort_keys=True))
    if args.compare:
        expected = json.loads(args.compare.read_text())
        differing = sorted(k for k in expected.keys() | digests.keys()
                           if expected.get(k) != digests.get(k))
        print(f"derived files differing from {args.compare}: {len(differing)}")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
