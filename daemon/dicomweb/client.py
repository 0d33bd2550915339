"""The DICOMweb client: STOW-RS a derived series to a destination, and the QIDO-RS query that
`echo` and `doctor` ask.

Instances go in batches of at most the destination's batch_mb (one instance at least), each
batch one POST {url}/studies whose multipart body is streamed from the files on disk with its
Content-Length known in advance, on one keep-alive connection with TCP_NODELAY. The answer
is read per instance: every instance sent must be in its ReferencedSOPSequence, or the
attempt failed (daemon/dicomweb/status.py says whether it is retried).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom

from denoised_node.config.settings import DicomwebDestination, Settings
from denoised_node.daemon.dicom.scu import SendError, SendResult
from denoised_node.daemon.dicomweb import multipart
from denoised_node.daemon.dicomweb.status import (
    describe_http,
    describe_reason,
    out_of_resources,
    verdict_for,
)

log = logging.getLogger(__name__)

_DICOM_JSON = "application/dicom+json"
_MAX_ANSWER_BYTES = 64 * 2**20  # a response dataset lists UIDs: far less for any batch
# DICOM JSON keys (PS3.18 F.2): the STOW-RS response dataset's attributes.
_FAILED_SOP = "00081198"
_REFERENCED_SOP = "00081199"
_SOP_CLASS = "00081150"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


class DicomwebError(SendError):
    """A DICOMweb destination did not take the series. ``permanent``: retrying cannot help
    (the answer says so: 400, 401, 403, a 409 with reasons...); ``fix`` says what to change."""

    def __init__(self, message: str, *, permanent: bool = False, fix: str = "") -> None:
        super().__init__(message, None, fix)
        self._permanent = permanent

    @property
    def permanent(self) -> bool:
        return self._permanent


@dataclass(frozen=True)
class Instance:
    path: Path
    size: int
    sop_instance_uid: str


@dataclass(frozen=True)
class StowResponse:
    """A STOW-RS response dataset, by SOP Instance UID."""

    stored: dict[str, int | None]  # UID -> WarningReason (None: none)
    failed: dict[str, int | None]  # UID -> FailureReason (None: none given)

    @classmethod
    def parse(cls, body: bytes) -> StowResponse:
        if not body.strip():
            return cls({}, {})
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"the answer is not DICOM JSON: {exc}") from None
        if isinstance(data, list):  # some servers wrap the dataset in an array
            data = data[0] if data else {}
        if not isinstance(data, dict):
            raise ValueError("the answer is not a DICOM JSON dataset")  # noqa: TRY004 - a value
        return cls(_items(data, _REFERENCED_SOP, _WARNING_REASON),
                   _items(data, _FAILED_SOP, _FAILURE_REASON))


def _items(dataset: dict[str, Any], sequence: str, reason_key: str) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for item in (dataset.get(sequence) or {}).get("Value") or []:
        uid = _first(item, _SOP_INSTANCE)
        reason = _first(item, reason_key)
        found[str(uid or "")] = int(reason) if isinstance(reason, int | float) else None
    return found


def _first(item: Any, key: str) -> Any:
    values = (item.get(key) or {}).get("Value") if isinstance(item, dict) else None
    return values[0] if values else None


def batches(instances: Sequence[Instance], limit_bytes: int) -> Iterator[list[Instance]]:
    """Consecutive instances of at most ``limit_bytes`` together (one at least)."""
    batch: list[Instance] = []
    size = 0
    for instance in instances:
        if batch and size + instance.size > limit_bytes:
            yield batch
            batch, size = [], 0
        batch.append(instance)
        size += instance.size
    if batch:
        yield batch


def _instance(path: Path) -> Instance:
    meta = pydicom.filereader.read_file_meta_info(path)
    return Instance(path, path.stat().st_size, str(meta.MediaStorageSOPInstanceUID))


class DicomwebConnection:
    """One keep-alive HTTP(S) connection to a destination's service root."""

    def __init__(self, settings: Settings, destination: DicomwebDestination) -> None:
        self.destination = destination
        parts = urlsplit(destination.url)
        self.root = parts.path.rstrip("/")
        self.host = parts.hostname or ""
        self.https = parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        self.timeout = destination.timeout_seconds
        self._context = None
        if self.https:
            from denoised_node.daemon.dicom.tls import client_context

            self._context = client_context(settings.tls, destination)
        self._authorization = _authorization(destination)
        self._connection: http.client.HTTPConnection | None = None
        self.requests = 0  # on the current connection

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            if self.https:
                self._connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._context)
            else:
                self._connection = http.client.HTTPConnection(self.host, self.port,
                                                              timeout=self.timeout)
            self._connection.connect()
            assert self._connection.sock is not None
            self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.requests = 0
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(self, method: str, target: str, headers: dict[str, str],
                body: Callable[[Callable[[bytes], object]], None] | None = None,
                ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body). A connection the server closed
        between two requests is opened again once."""
        for attempt in (1, 2):
            reused = self._connection is not None and self.requests > 0
            try:
                return self._request(method, target, headers, body)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _request(self, method: str, target: str, headers: dict[str, str],
                 body: Callable[[Callable[[bytes], object]], None] | None,
                 ) -> tuple[int, dict[str, str], bytes]:
        connection = self._connect()
        self.requests += 1
        connection.putrequest(method, self.root + target, skip_accept_encoding=True)
        for name, value in {**headers, **self._authorization}.items():
            connection.putheader(name, value)
        connection.endheaders()
        if body is not None:
            body(connection.send)
        response = connection.getresponse()
        data = response.read(_MAX_ANSWER_BYTES)
        if response.will_close or not response.isclosed():
            self.close()  # closing, or an answer longer than we read
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def where(self) -> str:
        return f"{self.destination.name} ({self.destination.url})"


def _authorization(destination: DicomwebDestination) -> dict[str, str]:
    if destination.token_file is not None:
        return {"Authorization": f"Bearer {_secret(destination.token_file, 'token_file')}"}
    if destination.username is not None and destination.password_file is not None:
        password = _secret(destination.password_file, "password_file")
        pair = f"{destination.username}:{password}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
    return {}


def _secret(path: Path, key: str) -> str:
    from denoised_node.config.settings import ConfigError

    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"destinations {key} {path}: cannot read it "
                          f"({exc.strerror or exc})") from None
    if not value:
        raise ConfigError(f"destinations {key} {path} is empty; put the secret in it")
    return value


def send_files(settings: Settings, destination: DicomwebDestination, files: Sequence[Path],
               progress: Callable[[int, int], None] | None = None) -> SendResult:
    """STOW-RS ``files`` to ``destination``; raise DicomwebError for the first batch not
    wholly stored (no later batch is sent)."""
    if not files:
        return SendResult(destination.name, 0)
    instances = [_instance(path) for path in files]
    connection = DicomwebConnection(settings, destination)
    sent = 0
    try:
        for batch in batches(instances, destination.batch_mb * 2**20):
            _store_batch(connection, batch)
            sent += len(batch)
            if progress:
                progress(sent, len(instances))
    finally:
        connection.close()
    return SendResult(destination.name, sent)


def _store_batch(connection: DicomwebConnection, batch: list[Instance]) -> None:
    where = connection.where()
    boundary = multipart.new_boundary()
    headers = {"Content-Type": multipart.content_type(boundary),
               "Content-Length": str(multipart.body_length(boundary, [i.size for i in batch])),
               "Accept": _DICOM_JSON}

    def body(send: Callable[[bytes], object]) -> None:
        multipart.write_body(send, boundary, [(i.path, i.size) for i in batch])

    started = time.monotonic()
    try:
        status, _, data = connection.request("POST", "/studies", headers, body)
    except (OSError, http.client.HTTPException) as exc:
        raise _request_failed(where, exc) from exc
    log.debug("STOW-RS batch answered", extra={"destination": connection.destination.name,
                                               "instances": len(batch), "status": status,
                                               "seconds": round(time.monotonic() - started, 3)})
    try:
        answer = StowResponse.parse(data) if data else StowResponse({}, {})
    except ValueError as exc:
        answer = StowResponse({}, {})
        if status in (200, 202):
            raise DicomwebError(f"{where}: {describe_http(status)}, but {exc}") from None
    refused = {i.sop_instance_uid: answer.failed[i.sop_instance_uid] for i in batch
               if i.sop_instance_uid in answer.failed}
    missing = [i.sop_instance_uid for i in batch
               if i.sop_instance_uid not in answer.stored and i.sop_instance_uid not in refused]
    if status in (200, 202) and not refused and not missing:
        return
    reasons = [r for r in refused.values() if r is not None]
    verdict = verdict_for(status, reasons)
    detail = [describe_http(status)]
    if refused:
        first_uid, first_reason = next(iter(refused.items()))
        detail.append(f"{len(refused)} of {len(batch)} instance(s) refused, e.g. {first_uid} "
                      f"with {_reason_text(first_reason)}")
    if missing and status in (200, 202):
        detail.append(f"{len(missing)} of {len(batch)} instance(s) missing from the answer "
                      f"(neither stored nor refused), e.g. {missing[0]}")
    elif not refused and status not in (200, 202):
        text = _plain(data)
        if text:
            detail.append(f"it says: {text}")
    if any(out_of_resources(r) for r in reasons):
        detail.append("out of resources: retried later")
    raise DicomwebError(f"{where}: STOW-RS: {'; '.join(detail)}", permanent=verdict.permanent,
                        fix=verdict.fix)


def _reason_text(reason: int | None) -> str:
    return "no FailureReason" if reason is None else f"FailureReason {describe_reason(reason)}"


def _plain(data: bytes) -> str:
    """A short error body that is text, for the message; "" otherwise."""
    text = data[:300].decode("utf-8", "replace").strip()
    if not text or text.startswith(("{", "[")):
        return ""
    return " ".join(text.split())[:200]


def _request_failed(where: str, exc: Exception) -> DicomwebError:
    """A request that got no answer: the network's reason, or the HTTP connection's."""
    if isinstance(exc, OSError):
        return DicomwebError(f"{where}: {_network_error(exc)}",
                             fix="check that the server runs and the url's host and port")
    return DicomwebError(f"{where}: the connection failed ({type(exc).__name__}: {exc})")


def _network_error(exc: OSError) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "no answer in time (timeout_seconds)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens at the url's host and port)"
    import ssl

    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    return f"{exc.strerror or exc}"


@dataclass(frozen=True)
class QidoAnswer:
    status: int
    studies: int | None  # how many the answer listed (None: not a JSON array)
    server: str
    milliseconds: float


def qido_echo(settings: Settings, destination: DicomwebDestination) -> QidoAnswer:
    """GET {url}/studies?limit=1: 200 or 204 means a DICOMweb server answers; anything else
    raises DicomwebError with what answered and what to fix."""
    connection = DicomwebConnection(settings, destination)
    where = connection.where()
    started = time.monotonic()
    try:
        status, headers, data = connection.request("GET", "/studies?limit=1",
                                                   {"Accept": _DICOM_JSON})
    except (OSError, http.client.HTTPException) as exc:
        raise _request_failed(where, exc) from exc
    finally:
        connection.close()
    elapsed = (time.monotonic() - started) * 1000
    server = headers.get("server", "")
    if status not in (200, 204):
        verdict = verdict_for(status, ())
        text = _plain(data)
        raise DicomwebError(f"{where}: QIDO-RS answered {describe_http(status)}"
                            + (f": {text}" if text else ""), permanent=verdict.permanent,
                            fix=verdict.fix or "see the server's log")
    studies = None
    if data.strip():
        try:
            listed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DicomwebError(f"{where}: QIDO-RS answered {describe_http(status)} but not "
                                "with DICOM JSON: is the url the DICOMweb service root?",
                                permanent=True, fix="check the destination's url") from None
        studies = len(listed) if isinstance(listed, list) else None
    else:
        studies = 0
    return QidoAnswer(status, studies, server, elapsed)
