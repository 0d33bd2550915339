"""DICOMweb against a real DICOMweb server: Orthanc with Debian's orthanc-dicomweb plugin.

As a destination: the derived series is stored with STOW-RS, `echo` and `doctor` ask QIDO-RS,
and each failure mode has its test (server down then up, 401, an instance the server refuses).
As a client of the node: Orthanc's own STOW-RS client (/dicom-web/servers/NAME/stow) sends a
series to the node's STOW-RS receiver; `requests` and a raw socket send what Orthanc never
would (a refused instance, a body cut short); a SIGKILL right after an answer loses nothing
that the answer listed as stored.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from tests.fixtures.certificates import TestCA
from tests.integration.node import NODE_AET, Node, node_config, start_node, wait_gone
from tests.integration.peers import Orthanc, free_port, storescu, wait_until

pytestmark = pytest.mark.slow

DERIVED = "DENOISED"
FAST = {"gate": {"enabled": False},
        "worker": {"count": 1, "poll_seconds": 0.2, "lease_seconds": 6}}
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


def _is_derived(series: dict[str, Any]) -> bool:
    return str(series["MainDicomTags"].get("SeriesDescription", "")).endswith(DERIVED)


def _web_destination(orthanc: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url, **extra}


class Harness:
    """A node on a config of its own, started (and stopped at the end) by the test."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.node: Node | None = None
        self.starts = 0

    def start(self, destinations: list[dict[str, Any]], **sections: dict[str, Any]) -> Node:
        merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in FAST.items()}
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        config = node_config(self.workdir, self.port, None, destinations=destinations, **merged)
        return self.restart(config)

    def restart(self, config: Path | None = None) -> Node:
        self.starts += 1
        config = config or (self.node.config if self.node else None)
        assert config is not None
        self.node = start_node(config, self.port, self.workdir / f"node{self.starts}.log")
        return self.node

    def kill_all(self) -> None:
        """SIGKILL serve and its workers (a power cut, as far as the node can tell)."""
        assert self.node is not None
        serve = self.node.process.pid
        children = Path(f"/proc/{serve}/task/{serve}/children")
        workers = [int(p) for p in children.read_text().split()] if children.exists() else []
        for pid in [serve, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.node.process.popen.wait(30)
        for pid in workers:
            wait_gone(pid)

    def stop(self) -> None:
        if self.node is not None and self.node.process.popen.poll() is None:
            self.node.process.stop(timeout=60)

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        database = self.workdir / "data" / "node.db"
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
            return list(db.execute(query))


@pytest.fixture
def harness(tmp_path: Path, node_port: int) -> Iterator[Harness]:
    made = Harness(tmp_path, node_port)
    yield made
    made.stop()


@pytest.fixture
def web_orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    """Orthanc with its DICOMweb plugin at /dicom-web/."""
    return orthanc_factory(dicomweb=True)


def _job(node: Node, state: str, timeout: float = 180) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def reached() -> bool:
        found[:] = node.jobs(state)
        return bool(found)

    wait_until(reached, timeout=timeout, interval=0.5, what=f"a job in state {state}")
    return found[0]


# --- the node as a STOW-RS client ----------------------------------------------------------------

def test_derived_series_is_stored_over_stow_rs(harness: Harness, web_orthanc: Orthanc,
                                               mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    node = harness.start([_web_destination(web_orthanc, batch_mb=1)])
    source = mr_series_factory(slices=12, rows=128, columns=128)  # 32 KiB each: 3 batches
    storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)
    derived = web_orthanc.wait_for_series(source.study_uid, _is_derived, count=12, timeout=240)
    datasets = web_orthanc.series_datasets(derived["MainDicomTags"]["SeriesInstanceUID"])
    referenced = {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in datasets}
    assert referenced == set(source.sop_instance_uids)
    assert all(ds.ImageType[0] == "DERIVED" and ds.StudyInstanceUID == source.study_uid
               for ds in datasets)
    job = _job(node, "done")
    assert job["send_attempts"] == 1 and "sent 12 to web" in job["reason"]

    echo = node.cli("echo", "web")
    assert "QIDO-RS ok" in echo.stdout and "answered 200" in echo.stdout
    facts = json.loads(node.cli("echo", "web", "--json").stdout)
    assert facts["kind"] == "dicomweb" and facts["status"] == 200
    doctor = node.cli("doctor", check=False).stdout
    assert "destination web: ok: QIDO-RS ok" in doctor


def test_server_down_then_up(harness: Harness, web_orthanc: Orthanc,
                             mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    web_orthanc.stop()
    node = harness.start([_web_destination(web_orthanc)])
    echo = node.cli("echo", "web", check=False)
    assert echo.returncode != 0 and "connection refused" in echo.stderr
    source = mr_series_factory(slices=6, rows=64, columns=64)
    storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)
    wait_until(lambda: any(j["send_attempts"] >= 1 for j in node.jobs()),
               timeout=180, interval=0.5, what="a send attempt that failed")
    (job,) = node.jobs()
    detail = json.loads(node.cli("jobs", "show", str(job["id"]), "--json").stdout)
    assert any("connection refused" in (e["reason"] or "") for e in detail["events"])
    web_orthanc.restart()
    derived = web_orthanc.wait_for_series(source.study_uid, _is_derived, count=6, timeout=120)
    assert len(derived["Instances"]) == 6
    done = _job(node, "done")
    assert done["send_attempts"] >= 2


def test_401_fails_without_retries_then_replay_with_the_right_password(
        harness: Harness, orthanc_factory: Callable[..., Orthanc], mr_series_factory,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    orthanc = orthanc_factory(dicomweb=True, extra_config={
        "AuthenticationEnabled": True, "RegisteredUsers": {"node": "right-password"}})
    orthanc.auth = ("node", "right-password")
    password = tmp_path / "web.password"
    password.write_text("wrong-password\n")
    node = harness.start([_web_destination(orthanc, username="node",
                                           password_file=str(password))])
    echo = node.cli("echo", "web", check=False)
    assert echo.returncode != 0 and "401" in echo.stderr
    source = mr_series_factory(slices=6, rows=64, columns=64)
    storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)
    failed = _job(node, "failed")
    assert failed["send_attempts"] == 1  # not retried: the answer will not change
    assert "401" in failed["reason"] and "password_file" in failed["reason"]
    assert not [s for s in orthanc.find_series(source.study_uid) if _is_derived(s)]

    password.write_text("right-password\n")
    node.cli("replay", "--job", str(failed["id"]))
    derived = orthanc.wait_for_series(source.study_uid, _is_derived, count=6, timeout=120)
    assert len(derived["Instances"]) == 6


# Orthanc's DICOMweb plugin 1.7 answers 200 for an instance its filter refuses, listing it
# neither as stored nor as failed: the node must read the answer per instance to notice.
_REFUSE_SECOND = """
function ReceivedInstanceFilter(dicom, origin, info)
   if string.find(dicom.SeriesDescription or '', 'DENOISED') and dicom.InstanceNumber == '2' then
      error('refused by the test filter')
   end
   return true
end
"""


def test_an_instance_the_server_refuses_fails_the_attempt(
        harness: Harness, orthanc_factory: Callable[..., Orthanc], mr_series_factory,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    script = tmp_path / "refuse.lua"
    script.write_text(_REFUSE_SECOND)
    orthanc = orthanc_factory(dicomweb=True, extra_config={"LuaScripts": [str(script)]})
    node = harness.start([_web_destination(orthanc)],
                         send={"max_attempts": 2, "backoff_base_seconds": 0.2,
                               "backoff_max_seconds": 0.5})
    source = mr_series_factory(slices=6, rows=64, columns=64)
    storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)
    failed = _job(node, "failed")
    assert failed["send_attempts"] == 2  # retried with the send backoff, then failed
    found = re.search(r"(\d) of 6 instance\(s\) missing from the answer", failed["reason"])
    assert found, failed["reason"]
    (derived,) = [s for s in orthanc.find_series(source.study_uid) if _is_derived(s)]
    assert 1 <= int(found.group(1)) == 6 - len(derived["Instances"])


class _TlsProxy:
    """https in front of an Orthanc: TLS with a certificate from the test CA, relayed to its
    plain HTTP port. (Debian's Orthanc 1.10.1 crashes on its own https connections here.)"""

    def __init__(self, target_port: int, credentials: Any) -> None:
        import ssl

        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(credentials.certificate, credentials.private_key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except OSError:  # a client that does not trust us: the handshake fails, as it should
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, secure), daemon=True).start()
        pump(secure, upstream)

    def close(self) -> None:
        self.closed.set()
        self.listener.close()


def test_https_destination_is_verified_against_the_nodes_ca(
        harness: Harness, web_orthanc: Orthanc, mr_series_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca = TestCA.create(tmp_path / "pki")
    proxy = _TlsProxy(web_orthanc.http_port, ca.issue("orthanc-https"))
    try:
        node = harness.start([{"name": "web", "kind": "dicomweb",
                               "url": f"https://127.0.0.1:{proxy.port}/dicom-web"}],
                             tls={"ca_certificates": str(ca.certificate)})
        assert "QIDO-RS ok" in node.cli("echo", "web").stdout
        source = mr_series_factory(slices=6, rows=64, columns=64)
        storescu(source.directory, "127.0.0.1", node.port, "MODALITY", NODE_AET)
        derived = web_orthanc.wait_for_series(source.study_uid, _is_derived, count=6,
                                              timeout=240)
        assert len(derived["Instances"]) == 6

        # Another CA's trust: the certificate is refused, and echo says so.
        other = TestCA.create(tmp_path / "other-pki", name="other-ca")
        config = tmp_path / "other.toml"
        config.write_text(node.config.read_text().replace(str(ca.certificate),
                                                          str(other.certificate)))
        refused = subprocess.run([sys.executable, "-m", "denoised_node.daemon.cli.main", "echo",
                                  "web", "--config", str(config)], capture_output=True,
                                 text=True, timeout=60, check=False)
        assert refused.returncode != 0 and "TLS failed" in refused.stderr, refused.stderr
    finally:
        proxy.close()


# --- the node as a STOW-RS server ----------------------------------------------------------------

def _stow_node(harness: Harness, orthanc: Orthanc, http_port: int, tmp_path: Path,
               **sections: dict[str, Any]) -> Node:
    password = tmp_path / "http.password"
    password.write_text("stow-secret\n")
    http = {"enabled": True, "port": http_port, "stow_rs": True, "username": "orthanc",
            "password_file": str(password)}
    return harness.start([_web_destination(orthanc)], http=http, **sections)


def _multipart(parts: list[bytes], boundary: str = "test-boundary") -> bytes:
    body = b""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
        body += b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def _post(http_port: int, parts: list[bytes], auth: tuple[str, str] | None = ("orthanc",
          "stow-secret"), study: str = "") -> requests.Response:
    return requests.post(f"http://127.0.0.1:{http_port}/dicom-web/studies{study}",
                         data=_multipart(parts), auth=auth, timeout=120,
                         headers={"Content-Type": STOW_TYPE.format("test-boundary"),
                                  "Accept": "application/dicom+json"})


def _listed(response: requests.Response) -> tuple[list[str], dict[str, int]]:
    data = response.json()
    stored = [i["00081155"]["Value"][0] for i in data["00081199"].get("Value", [])]
    failed = {(i.get("00081155", {}).get("Value") or [""])[0]: i["00081197"]["Value"][0]
              for i in data["00081198"].get("Value", [])}
    return stored, failed


def test_orthanc_stows_a_series_to_the_node_and_gets_it_back_denoised(
        harness: Harness, orthanc_factory: Callable[..., Orthanc], mr_series_factory,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    http_port = free_port()
    orthanc = orthanc_factory(dicomweb=True, extra_config={"DicomWeb": {"Servers": {"node": {
        "Url": f"http://127.0.0.1:{http_port}/dicom-web/", "Username": "orthanc",
        "Password": "stow-secret"}}}})
    node = _stow_node(harness, orthanc, http_port, tmp_path)
    source = mr_series_factory(slices=8, rows=64, columns=64)
    for path in source.paths:  # the series is in the PACS first, as in a hospital
        response = requests.post(orthanc.url + "/instances", data=path.read_bytes(), timeout=60)
        response.raise_for_status()
    series = orthanc.series_by_uid(source.series_uid)
    assert series is not None
    orthanc.post("/dicom-web/servers/node/stow", {"Resources": [series["ID"]],
                                                  "Synchronous": True})
    derived = orthanc.wait_for_series(source.study_uid, _is_derived, count=8, timeout=240)
    datasets = orthanc.series_datasets(derived["MainDicomTags"]["SeriesInstanceUID"])
    assert {ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in datasets} == set(
        source.sop_instance_uids)
    job = _job(node, "done")
    assert job["source"] == "STOW-RS, user orthanc"
    shown = node.cli("jobs", "show", str(job["id"])).stdout
    assert "STOW-RS, user orthanc" in shown
    page = requests.get(f"http://127.0.0.1:{http_port}/series/{source.series_uid}",
                        auth=("orthanc", "stow-secret"), timeout=30)
    assert page.status_code == 200 and "STOW-RS, user orthanc" in page.text


def test_stow_rs_refusals_and_authentication(harness: Harness, web_orthanc: Orthanc,  # type: ignore[no-untyped-def]
                                             mr_series_factory, tmp_path: Path) -> None:
    http_port = free_port()
    _stow_node(harness, web_orthanc, http_port, tmp_path)
    source = mr_series_factory(slices=4, rows=64, columns=64)
    parts = [p.read_bytes() for p in source.paths]

    refused = _post(http_port, parts[:1], auth=None)
    assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers
    wrong = _post(http_port, parts[:1], auth=("orthanc", "guess"))
    assert wrong.status_code == 401

    truncated = parts[1][:-300]
    answer = _post(http_port, [parts[0], truncated, b"\x00" * 200])
    assert answer.status_code == 202
    assert answer.headers["Content-Type"] == "application/dicom+json"
    stored, failed = _listed(answer)
    assert stored == [source.sop_instance_uids[0]]
    assert failed == {source.sop_instance_uids[1]: 0xC000, "": 0xC000}

    other_study = _post(http_port, parts[2:3], study="/1.2.3.4.5")
    assert other_study.status_code == 409
    assert _listed(other_study)[1] == {source.sop_instance_uids[2]: 0xC003}
    kept = harness.sql("SELECT sop_instance_uid FROM instances")
    assert kept == [(source.sop_instance_uids[0],)]


def test_a_body_cut_short_keeps_nothing_unlisted(harness: Harness, web_orthanc: Orthanc,  # type: ignore[no-untyped-def]
                                                 mr_series_factory, tmp_path: Path) -> None:
    http_port = free_port()
    node = _stow_node(harness, web_orthanc, http_port, tmp_path)
    # The connection closes halfway through a body whose Content-Length says more: nothing
    # of it is kept (waitress never hands the node a body that did not arrive whole).
    dropped = mr_series_factory(slices=4, rows=64, columns=64, seed=11)
    dropped_body = _multipart([p.read_bytes() for p in dropped.paths])
    login = base64.b64encode(b"orthanc:stow-secret").decode()
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n"
            f"Authorization: Basic {login}\r\nContent-Type: {STOW_TYPE.format('test-boundary')}"
            f"\r\nContent-Length: {len(dropped_body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", http_port), timeout=30) as sock:
        sock.sendall(head + dropped_body[:len(dropped_body) * 3 // 4])
    time.sleep(1.0)
    source = mr_series_factory(slices=4, rows=64, columns=64)
    body = _multipart([p.read_bytes() for p in source.paths])
    # The multipart body is cut short inside its third part (Content-Length matches).
    cut = body[:len(body) - len(source.paths[3].read_bytes()) - 200]
    answer = requests.post(f"http://127.0.0.1:{http_port}/dicom-web/studies", data=cut,
                           auth=("orthanc", "stow-secret"), timeout=60,
                           headers={"Content-Type": STOW_TYPE.format("test-boundary")})
    assert answer.status_code == 202
    stored, failed = _listed(answer)
    assert stored == source.sop_instance_uids[:2]
    assert failed == {source.sop_instance_uids[2]: 0xC000}
    kept = {row[0] for row in harness.sql("SELECT sop_instance_uid FROM instances")}
    assert kept == set(stored)
    assert not list((harness.workdir / "data" / "incoming").glob("*.part"))
    assert requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=10).ok
    assert node.process.popen.poll() is None


def test_sigkill_loses_nothing_the_answer_listed(harness: Harness, web_orthanc: Orthanc,  # type: ignore[no-untyped-def]
                                                  mr_series_factory, tmp_path: Path) -> None:
    http_port = free_port()
    _stow_node(harness, web_orthanc, http_port, tmp_path, series={"idle_seconds": 3})
    first = mr_series_factory(slices=40, rows=128, columns=128)
    answer = _post(http_port, [p.read_bytes() for p in first.paths])
    assert answer.status_code == 200
    harness.kill_all()  # at once after the answer: index commits the node did not wait for

    # A second request in flight when the node dies: whatever it kept is whole.
    node = harness.restart()
    second = mr_series_factory(slices=300, rows=128, columns=128, seed=5)
    result: list[Any] = []

    def send() -> None:
        try:
            result.append(_post(http_port, [p.read_bytes() for p in second.paths]))
        except requests.RequestException as exc:
            result.append(exc)

    sender = threading.Thread(target=send)
    folder = harness.workdir / "data" / "instances" / second.study_uid
    sender.start()
    wait_until(lambda: folder.is_dir() and len(list(folder.rglob("*.dcm"))) >= 5, timeout=60,
               interval=0.01, what="part of the second request to be kept")
    harness.kill_all()
    sender.join(60)
    assert result and isinstance(result[0], requests.RequestException)  # never answered
    node = harness.restart()
    assert not list((harness.workdir / "data" / "incoming").glob("*.part"))
    listed = set(_listed(answer)[0])
    kept = {row[0] for row in harness.sql("SELECT sop_instance_uid FROM instances")}
    assert listed <= kept and listed == set(first.sop_instance_uids)
    for row in harness.sql("SELECT path FROM instances"):
        assert pydicom.dcmread(harness.workdir / "data" / row[0]).PixelData
    derived = web_orthanc.wait_for_series(first.study_uid, _is_derived, count=40, timeout=240)
    assert len(derived["Instances"]) == 40
    assert node.process.popen.poll() is None
