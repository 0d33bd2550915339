"""The receive path without the network: milliseconds per image through `Receiver.receive`
(parse and check, file fsync + rename + folder fsync, index transaction), with the index
commit synced (every connection but the receiver's) and unsynced (`Receiver.for_node`,
what `serve` uses), in turn, several rounds.

    python -m benchmarks.receive_path [--images 300] [--rounds 3]

Uses the benchmark's generated 256x256 series (benchmarks/common.py); each measurement
receives into a fresh store and database.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import DEFAULT_WORKDIR, series_folder
from denoised_node.config.settings import load_settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.storage.runtime import open_runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def ms_per_image(datas: list[bytes], unsynced: bool) -> float:
    folder = Path(tempfile.mkdtemp(prefix="receive-path-"))
    try:
        settings = load_settings(None, environ={"DENOISED_NODE_NODE__DATA_DIR": str(folder),
                                                "DENOISED_NODE_NODE__MIN_FREE_MB": "0"})
        runtime = open_runtime(settings, initialise_empty=True)
        receiver = (Receiver.for_node(runtime) if unsynced
                    else Receiver(runtime.store, runtime.sessions, settings))
        started = time.perf_counter()
        for data in datas:
            receiver.receive(data, MR, "BENCH")
        return (time.perf_counter() - started) / len(datas) * 1000
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.receive_path",
                                     description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    files = sorted(series_folder(args.workdir, 500).glob("*.dcm"))[:args.images]
    datas = [path.read_bytes() for path in files]
    results: dict[str, list[float]] = {"synced index commit": [], "unsynced (serve)": []}
    for _ in range(args.rounds):
        results["synced index commit"].append(ms_per_image(datas, unsynced=False))
        results["unsynced (serve)"].append(ms_per_image(datas, unsynced=True))
    for label, values in results.items():
        print(f"{label}: median {statistics.median(values):.2f} ms per image "
              f"({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
