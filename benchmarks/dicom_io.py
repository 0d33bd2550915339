"""Receive and send throughput, beside Orthanc and DCMTK on the same files in the same run.

Receive: DCMTK storescu sends a 500-slice 256x256 16-bit series (one association, then the
same files over four associations at once) into the node (durable: fsync and indexed), into
Orthanc 1.10 (indexed; Orthanc does not fsync its files) and into DCMTK storescp (plain files,
no index, no fsync): the performance anchor.
Send: the node's SCU and DCMTK storescu each send the same files to a fresh Orthanc.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from pathlib import Path

from benchmarks.common import Row, fresh_dir, split_folder, timed
from tests.integration.node import NODE_AET, node_config, start_node
from tests.integration.peers import free_port, start_orthanc, start_storescp, storescu

SECTION = "receive"


def _send_parallel(folders: list[Path], port: int, called: str) -> None:
    errors: list[BaseException] = []

    def one(folder: Path) -> None:
        try:
            storescu(folder, "127.0.0.1", port, "BENCH", called)
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(folder,)) for folder in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _into_node(series: Path, workdir: Path, folders: list[Path] | None,
               processes: int = 1) -> float:
    port = free_port()
    config = node_config(fresh_dir(workdir), port, None, worker={"count": 0},
                         series={"idle_seconds": 3600}, http={"enabled": False},
                         node={"receive_processes": processes})
    node = start_node(config, port, workdir / "node.log")
    try:
        count = len(list(series.glob("*.dcm")))
        seconds = timed(lambda: _send_parallel(folders or [series], port, NODE_AET))
        with sqlite3.connect(workdir / "data" / "node.db") as db:
            indexed = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        if indexed != count:
            raise RuntimeError(f"node indexed {indexed} of {count} instances")
        return count / seconds
    finally:
        node.process.stop(timeout=60)


def _into_orthanc(series: Path, workdir: Path, folders: list[Path] | None) -> float:
    orthanc = start_orthanc(fresh_dir(workdir))
    try:
        count = len(list(series.glob("*.dcm")))
        seconds = timed(lambda: _send_parallel(folders or [series], orthanc.dicom_port,
                                               orthanc.aet))
        stored = orthanc.get("/statistics")["CountInstances"]
        if stored != count:
            raise RuntimeError(f"Orthanc stored {stored} of {count} instances")
        return count / seconds
    finally:
        orthanc.stop()


def _into_storescp(series: Path, workdir: Path, folders: list[Path] | None) -> float:
    scp = start_storescp(fresh_dir(workdir) / "received")
    try:
        count = len(list(series.glob("*.dcm")))
        seconds = timed(lambda: _send_parallel(folders or [series], scp.port, scp.aet))
        scp.wait_for_files(count, timeout=60)
        return count / seconds
    finally:
        scp.stop()


def _into_bare_pynetdicom(series: Path, workdir: Path, folders: list[Path] | None) -> float:
    """pynetdicom with the node's network knobs and a handler that keeps nothing: the
    ceiling of any pynetdicom-based receiver on this machine."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from denoised_node.config.settings import load_settings
    from denoised_node.daemon.dicom.network_options import make_ae, set_tcp_nodelay

    ae = make_ae(load_settings(None, environ={}), "BARE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    handlers = [(evt.EVT_CONN_OPEN, set_tcp_nodelay),
                (evt.EVT_C_STORE, lambda event: (event.encoded_dataset(), 0)[1])]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        count = len(list(series.glob("*.dcm")))
        return count / timed(lambda: _send_parallel(folders or [series], port, "BARE"))
    finally:
        server.shutdown()


def receive_rows(series: Path, workdir: Path, label_suffix: str = "") -> list[Row]:
    """The node with one receiving process and with one per core, beside the peers."""
    count = len(list(series.glob("*.dcm")))
    cores = os.cpu_count() or 1
    rows = []
    four = split_folder(series, 4, workdir / "split4")
    for label, folders in (("1 association", None), ("4 associations at once", four)):
        nodes = {processes: _into_node(series, workdir / "node", folders, processes)
                 for processes in sorted({1, cores})}
        peers = {"Orthanc": _into_orthanc(series, workdir / "orthanc", folders),
                 "storescp": _into_storescp(series, workdir / "storescp", folders),
                 "bare pynetdicom": _into_bare_pynetdicom(series, workdir, folders)}
        for processes, rate in nodes.items():
            rows.append(Row(SECTION, f"{count} x 256x256, {label}, receive_processes = "
                            f"{processes}{label_suffix}", rate, "img/s", peers,
                            "node: fsync + index; Orthanc: index, no fsync; storescp: files "
                            "only; bare pynetdicom (1 process): keeps nothing"))
    return rows


def send_rows(series: Path, workdir: Path, label_suffix: str = "") -> list[Row]:
    """The node's SCU on 1, 2 and 4 associations (send.associations) against storescu on
    one, each into a fresh Orthanc."""
    from denoised_node.config.settings import Destination, load_settings
    from denoised_node.daemon.dicom.scu import send_files

    files = sorted(series.glob("*.dcm"))

    def node_rate(associations: int) -> float:
        orthanc = start_orthanc(fresh_dir(workdir / "orthanc-send"))
        try:
            settings = load_settings(None, environ={
                "DENOISED_NODE_SEND__ASSOCIATIONS": str(associations)})
            destination = Destination(name="o", ae_title=orthanc.aet, host="127.0.0.1",
                                      port=orthanc.dicom_port)
            rate = len(files) / timed(lambda: send_files(settings, destination, files))
            stored = orthanc.get("/statistics")["CountInstances"]
            if stored != len(files):
                raise RuntimeError(f"Orthanc stored {stored} of {len(files)} instances")
            return rate
        finally:
            orthanc.stop()

    def storescu_rate() -> float:
        orthanc = start_orthanc(fresh_dir(workdir / "orthanc-send"))
        try:
            return len(files) / timed(lambda: storescu(series, "127.0.0.1", orthanc.dicom_port,
                                                       NODE_AET, orthanc.aet))
        finally:
            orthanc.stop()

    nodes = {associations: node_rate(associations) for associations in (1, 2, 4)}
    peers = {"storescu (1 association)": storescu_rate()}
    return [Row("send", f"{len(files)} x 256x256 to Orthanc, send.associations = "
                f"{associations}{label_suffix}", rate, "img/s", peers,
                "TCP_NODELAY on both sides") for associations, rate in nodes.items()]


def tool_versions() -> str:
    orthanc = subprocess.run(["/usr/sbin/Orthanc", "--version"], capture_output=True,
                             text=True, check=False).stdout.splitlines()[:1]
    dcmtk = subprocess.run(["/usr/bin/storescu", "--version"], capture_output=True,
                           text=True, check=False).stdout.splitlines()[:1]
    return "; ".join(orthanc + dcmtk)
