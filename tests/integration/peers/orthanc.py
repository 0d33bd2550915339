"""Orthanc as the PACS: started from a config file in a temp dir, queried over REST."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset

from tests.integration.peers.dcmtk import echoscu
from tests.integration.peers.process import ManagedProcess
from tests.integration.peers.tools import (
    free_port,
    nodelay_env,
    require_tool,
    skip_or_fail,
    wait_until,
)

HOST = "127.0.0.1"
# Debian's orthanc-dicomweb (1.7): the DICOMweb plugin, loaded where a test asks for it.
DICOMWEB_PLUGINS = (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                    Path("/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"))
DICOMWEB_ROOT = "/dicom-web/"


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's path; skip (outside CI) or fail (in CI) without it."""
    for path in DICOMWEB_PLUGINS:
        if path.exists():
            return path
    skip_or_fail("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)",
                 "CI must have every peer")


@dataclass(frozen=True)
class Modality:
    """A DICOM node Orthanc may send to (POST /modalities/NAME/store)."""

    aet: str
    port: int
    host: str = HOST

    def as_config(self) -> dict[str, Any]:
        return {"AET": self.aet, "Host": self.host, "Port": self.port}


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: dict[str, Modality],
    overwrite_instances: bool,
    stable_age: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "Name": f"test-orthanc-{dicom_port}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {name: m.as_config() for name, m in modalities.items()},
        "OverwriteInstances": overwrite_instances,
        "StableAge": stable_age,
        "Plugins": [],
        "SaveJobs": False,
        "StorageCompression": False,
        "DicomScuTimeout": 30,
        "HttpTimeout": 60,
    }
    config.update(extra or {})
    return config


@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    process: ManagedProcess = field(repr=False)
    host: str = HOST
    # (user, password) for its REST API where a test turned AuthenticationEnabled on.
    auth: tuple[str, str] | None = None

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, auth=self.auth, **kwargs)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb service root (with start_orthanc(dicomweb=True))."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    # --- REST -----------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        response = self._call("GET", path, timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        response = self._call("POST", path, data=json.dumps(body), timeout=120)
        response.raise_for_status()
        return response.json() if response.content else None

    def put(self, path: str, body: Any) -> None:
        self._call("PUT", path, data=json.dumps(body), timeout=60).raise_for_status()

    def delete(self, path: str) -> None:
        self._call("DELETE", path, timeout=60).raise_for_status()

    # --- queries ----------------------------------------------------------------------------
    def find_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series of the study, expanded: MainDicomTags, Instances (Orthanc IDs), ID."""
        return self.post(
            "/tools/find",
            {"Level": "Series", "Expand": True, "Query": {"StudyInstanceUID": study_uid}},
        )

    def series_by_uid(self, series_uid: str) -> dict[str, Any] | None:
        found = self.post(
            "/tools/find",
            {"Level": "Series", "Expand": True, "Query": {"SeriesInstanceUID": series_uid}},
        )
        return found[0] if found else None

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        """The series' instances (expanded: ID, MainDicomTags with SOPInstanceUID, ...)."""
        series = self.series_by_uid(series_uid)
        return self.get(f"/series/{series['ID']}/instances") if series else []

    def count_instances(self, series_uid: str) -> int:
        series = self.series_by_uid(series_uid)
        return len(series["Instances"]) if series else 0

    def instance_file(self, instance_id: str) -> bytes:
        response = self._call("GET", f"/instances/{instance_id}/file", timeout=60)
        response.raise_for_status()
        return response.content

    def instance_dataset(self, instance_id: str) -> Dataset:
        return pydicom.dcmread(BytesIO(self.instance_file(instance_id)))

    def series_datasets(self, series_uid: str) -> list[Dataset]:
        """Every instance of the series read back from Orthanc's stored files."""
        return [self.instance_dataset(i["ID"]) for i in self.series_instances(series_uid)]

    def download_series(self, series_uid: str, directory: Path) -> list[Path]:
        """Write the series' files (named by SOP Instance UID) into directory."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for instance in self.series_instances(series_uid):
            path = directory / f"{instance['MainDicomTags']['SOPInstanceUID']}.dcm"
            path.write_bytes(self.instance_file(instance["ID"]))
            paths.append(path)
        return paths

    def wait_for_series(
        self,
        study_uid: str,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        count: int | None = None,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """The first series of the study that matches predicate (and has count instances)."""

        def ready() -> dict[str, Any] | None:
            for series in self.find_series(study_uid):
                if predicate(series) and (count is None or len(series["Instances"]) == count):
                    return series
            return None

        return wait_until(
            ready,
            timeout=timeout,
            interval=0.5,
            what=f"a matching series in study {study_uid} on Orthanc",
        )

    # --- actions ----------------------------------------------------------------------------
    def set_modality(self, name: str, modality: Modality) -> None:
        """Declare (or change) a DICOM node at run time: PUT /modalities/NAME."""
        self.put(f"/modalities/{name}", modality.as_config())

    def push_series(self, series_uid: str, modality: str = "DENOISER") -> Any:
        """C-STORE the series from Orthanc to a declared modality, synchronously."""
        series = self.series_by_uid(series_uid)
        if series is None:
            raise LookupError(f"series {series_uid} is not in Orthanc")
        return self.post(
            f"/modalities/{modality}/store", {"Resources": [series["ID"]], "Synchronous": True}
        )

    def clear(self) -> None:
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")

    def stop(self) -> None:
        self.process.stop()

    def restart(self, startup_timeout: float = 60.0) -> None:
        """Start it again on the same config, ports and storage (after stop())."""
        binary = require_tool("Orthanc")
        self.process = ManagedProcess.start(
            [binary, f"--logfile={self.workdir / 'orthanc.log'}",
             str(self.workdir / "orthanc.json")],
            log=self.workdir / "orthanc.stdout", env=nodelay_env(), cwd=self.workdir)
        _wait_ready(self, startup_timeout)


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, Modality] | None = None,
    overwrite_instances: bool = False,
    stable_age: int = 2,
    extra_config: dict[str, Any] | None = None,
    startup_timeout: float = 60.0,
    dicomweb: bool = False,
) -> Orthanc:
    """Start Orthanc on free ports of 127.0.0.1; return once REST and C-ECHO answer.
    ``dicomweb``: with the DICOMweb plugin at /dicom-web/ (extra_config's "DicomWeb" keys,
    e.g. "Servers", are merged in)."""
    binary = require_tool("Orthanc")
    extra_config = dict(extra_config or {})
    if dicomweb:
        extra_config["Plugins"] = [str(dicomweb_plugin())]
        extra_config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT,
                                    **extra_config.get("DicomWeb", {})}
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = orthanc_config(
        workdir,
        aet=aet,
        dicom_port=dicom_port,
        http_port=http_port,
        modalities=modalities or {},
        overwrite_instances=overwrite_instances,
        stable_age=stable_age,
        extra=extra_config,
    )
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = workdir / "orthanc.log"
    process = ManagedProcess.start(
        [binary, f"--logfile={log}", str(config_path)],
        log=workdir / "orthanc.stdout",
        env=nodelay_env(),
        cwd=workdir,
    )
    orthanc = Orthanc(aet, dicom_port, http_port, workdir, process)
    _wait_ready(orthanc, startup_timeout)
    if dicomweb:
        wait_until(lambda: _answers(orthanc, DICOMWEB_ROOT + "studies"),
                   timeout=startup_timeout, what="Orthanc's DICOMweb plugin")
    return orthanc


def _wait_ready(orthanc: Orthanc, startup_timeout: float) -> None:
    process, log = orthanc.process, orthanc.workdir / "orthanc.log"
    aet, http_port, dicom_port = orthanc.aet, orthanc.http_port, orthanc.dicom_port
    try:
        wait_until(
            lambda: process.check_alive() and _answers(orthanc),
            timeout=startup_timeout,
            what=f"Orthanc REST on port {http_port}",
        )
        wait_until(
            lambda: process.check_alive() and echoscu(HOST, dicom_port, aet),
            timeout=startup_timeout,
            what=f"Orthanc C-ECHO on port {dicom_port}",
        )
    except BaseException as error:
        orthanc.stop()
        raise RuntimeError(f"Orthanc did not start: {error}\n{_tail(log)}") from error


def _answers(orthanc: Orthanc, path: str = "/system") -> bool:
    # With AuthenticationEnabled any answer (401 included) means the server is up.
    try:
        return requests.get(orthanc.url + path, timeout=2).status_code in (200, 401)
    except requests.RequestException:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no Orthanc log)"
