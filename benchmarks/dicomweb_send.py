"""STOW-RS against DIMSE, sending the same files from the node to the same kind of server,
and receiving them into the node.

A 128-slice 256x256 16-bit series goes from the node to Orthanc 1.10 with Debian's DICOMweb
plugin, over DIMSE (scu.send_files, one association, TCP_NODELAY) and over STOW-RS
(dicomweb/client.py, batch_mb batches on one keep-alive connection), each into a fresh
Orthanc, the two kinds taking turns; the median of ``runs`` each. The issue's target: STOW-RS
at no less than 0.9x the DIMSE rate.

Receive: the same files into the node (worker.count = 0: kept and indexed only), in one
STOW-RS request (its body streamed from a file) against DCMTK storescu on one association;
each into a fresh node, in turns.
"""

from __future__ import annotations

import sqlite3
import statistics
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Row, fresh_dir, timed
from tests.integration.node import NODE_AET, node_config, start_node
from tests.integration.peers import free_port, start_orthanc, storescu

SECTION = "dicomweb"
TARGET_RATIO = 0.9


def _rate(workdir: Path, files: list[Path], send: Callable[..., object]) -> float:
    orthanc = start_orthanc(fresh_dir(workdir / "orthanc-dicomweb"), dicomweb=True)
    try:
        rate = len(files) / timed(lambda: send(orthanc))
        stored = orthanc.get("/statistics")["CountInstances"]
        if stored != len(files):
            raise RuntimeError(f"Orthanc stored {stored} of {len(files)} instances")
        return rate
    finally:
        orthanc.stop()


def dicomweb_rows(series: Path, workdir: Path, runs: int = 5, batch_mb: int = 32,
                  label_suffix: str = "") -> list[Row]:
    from denoised_node.config.settings import Destination, DicomwebDestination, load_settings
    from denoised_node.daemon.jobs.destinations import send_to

    files = sorted(series.glob("*.dcm"))
    settings = load_settings(None, environ={})

    def over_dimse(orthanc) -> object:  # type: ignore[no-untyped-def]
        return send_to(settings, Destination(name="o", ae_title=orthanc.aet, host="127.0.0.1",
                                             port=orthanc.dicom_port), files)

    def over_stow(orthanc) -> object:  # type: ignore[no-untyped-def]
        return send_to(settings, DicomwebDestination(name="o", kind="dicomweb",
                                                     url=orthanc.dicomweb_url,
                                                     batch_mb=batch_mb), files)

    dimse: list[float] = []
    stow: list[float] = []
    for _ in range(runs):  # in turns, so that a slow moment of the machine hits both
        dimse.append(_rate(workdir, files, over_dimse))
        stow.append(_rate(workdir, files, over_stow))
    dimse_rate, stow_rate = statistics.median(dimse), statistics.median(stow)
    ratio = stow_rate / dimse_rate
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    note = (f"median of {runs}, in turns; STOW-RS runs {', '.join(f'{r:.0f}' for r in stow)}; "
            f"DIMSE runs {', '.join(f'{r:.0f}' for r in dimse)}; target >= {TARGET_RATIO}x: "
            f"{verdict}")
    return [Row("dicomweb", f"{len(files)} x 256x256 to Orthanc over STOW-RS "
                f"(batch_mb = {batch_mb}){label_suffix}", stow_rate, "img/s",
                {"the node over DIMSE (1 association)": dimse_rate}, note)]


def _into_node(series: Path, workdir: Path, over_stow: bool) -> float:
    import requests

    from denoised_node.daemon.dicomweb import multipart

    port, http_port = free_port(), free_port()
    config = node_config(fresh_dir(workdir / "node-receive"), port, None,
                         worker={"count": 0}, series={"idle_seconds": 3600},
                         http={"enabled": True, "port": http_port, "stow_rs": True})
    node = start_node(config, port, workdir / "node-receive" / "node.log")
    files = sorted(series.glob("*.dcm"))
    try:
        if over_stow:
            boundary = multipart.new_boundary()
            body = workdir / "node-receive" / "body"
            with body.open("wb") as out:
                multipart.write_body(out.write, boundary,
                                     [(f, f.stat().st_size) for f in files])

            def send() -> None:
                with body.open("rb") as stream:
                    answer = requests.post(
                        f"http://127.0.0.1:{http_port}/dicom-web/studies", data=stream,
                        timeout=600, headers={"Content-Type": multipart.content_type(boundary),
                                              "Accept": "application/dicom+json"})
                if answer.status_code != 200:
                    raise RuntimeError(f"STOW-RS answered {answer.status_code}")

            seconds = timed(send)
        else:
            seconds = timed(lambda: storescu(series, "127.0.0.1", port, "BENCH", NODE_AET))
        with sqlite3.connect(workdir / "node-receive" / "data" / "node.db") as db:
            indexed = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        if indexed != len(files):
            raise RuntimeError(f"node indexed {indexed} of {len(files)} instances")
        return len(files) / seconds
    finally:
        node.process.stop(timeout=60)


def dicomweb_receive_rows(series: Path, workdir: Path, runs: int = 3) -> list[Row]:
    stow: list[float] = []
    dimse: list[float] = []
    for _ in range(runs):
        stow.append(_into_node(series, workdir, over_stow=True))
        dimse.append(_into_node(series, workdir, over_stow=False))
    count = len(list(series.glob("*.dcm")))
    return [Row("dicomweb", f"{count} x 256x256 into the node over STOW-RS (one request; kept, "
                "fsynced, indexed)", statistics.median(stow), "img/s",
                {"storescu into the node (1 association)": statistics.median(dimse)},
                f"median of {runs}, in turns; the request's time includes waitress reading "
                "the body into its temporary file")]
