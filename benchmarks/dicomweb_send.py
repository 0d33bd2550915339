"""STOW-RS against DIMSE, sending the same files from the node to the same kind of server.

A 128-slice 256x256 16-bit series goes from the node to Orthanc 1.10 with Debian's DICOMweb
plugin, over DIMSE (scu.send_files, one association, TCP_NODELAY) and over STOW-RS
(dicomweb/client.py, batch_mb batches on one keep-alive connection), each into a fresh
Orthanc, the two kinds taking turns; the median of ``runs`` each. The issue's target: STOW-RS
at no less than 0.9x the DIMSE rate.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Row, fresh_dir, timed
from tests.integration.peers import start_orthanc

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
    from denoised_node.daemon.destinations import send_to

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
