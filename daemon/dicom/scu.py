"""The Storage SCU: send a derived series to a destination, on one association or on
send.associations at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.dicom.association_failure import AssociationFailure, AssociationWatch
from denoised_node.daemon.dicom.dimse_status import describe, is_stored
from denoised_node.daemon.dicom.network_options import (
    files_sent_as_they_are,
    keep_responses_for_the_caller,
    make_ae,
    set_tcp_nodelay,
)
from denoised_node.daemon.dicom.tls import client_tls_args

log = logging.getLogger(__name__)

# Success and the storage warnings (coercion, elements discarded, dataset mismatch): kept.
_MAX_CONTEXTS = 128


class SendError(Exception):
    """A destination could not take the series; the job retries with backoff, unless the
    association failed for good (retrying cannot help: the job fails at once)."""

    def __init__(self, message: str, failure: AssociationFailure | None = None,
                 fix: str = "") -> None:
        super().__init__(message)
        self.failure = failure
        self.fix = fix  # what to change, where the failure says

    @property
    def permanent(self) -> bool:
        return self.failure is not None and self.failure.permanent


@dataclass(frozen=True)
class SendResult:
    destination: str
    sent: int


def _scu_ae(settings: Settings):  # type: ignore[no-untyped-def]
    return make_ae(settings, settings.send.calling_ae_title or settings.node.ae_title)


def send_files(settings: Settings, destination: Destination, files: Sequence[Path],
               progress: Callable[[int, int], None] | None = None) -> SendResult:
    """C-STORE ``files`` to ``destination`` on send.associations associations at once (one
    by default); raise SendError on the first instance the destination does not keep, and
    stop sending on the others."""
    if not files:
        return SendResult(destination.name, 0)
    kinds = [_kind(path) for path in files]
    contexts = _contexts_for(kinds)
    shares = min(settings.send.associations, len(files))
    counter = _SentCounter(len(files), progress)
    with files_sent_as_they_are():
        if shares == 1:
            _send_on_one_association(settings, destination, contexts, files, kinds, counter)
        else:
            _send_on_several(settings, destination, contexts, files, kinds, counter, shares)
    return SendResult(destination.name, counter.sent)


def _send_on_several(settings: Settings, destination: Destination,
                     contexts: list[tuple[str, list[str]]], files: Sequence[Path],
                     kinds: Sequence[tuple[str, str]], counter: _SentCounter,
                     shares: int) -> None:
    # Image i goes on association i mod n: each carries an even share, in the series' order.
    errors: list[BaseException] = []

    def one(share: int) -> None:
        try:
            _send_on_one_association(settings, destination, contexts, files[share::shares],
                                     kinds[share::shares], counter)
        except BaseException as exc:  # noqa: BLE001 - raised after the join
            errors.append(exc)
            counter.stop.set()

    threads = [threading.Thread(target=one, args=(share,), name=f"send-{share}")
               for share in range(shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class _SentCounter:
    """Images stored, over all of a send's associations; a failure on one stops the others."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.progress = progress
        self.sent = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def stored(self) -> None:
        with self._lock:  # progress hears the counts in order, from one thread at a time
            self.sent += 1
            if self.progress:
                self.progress(self.sent, self.total)


def _send_on_one_association(settings: Settings, destination: Destination,
                             contexts: list[tuple[str, list[str]]], files: Sequence[Path],
                             kinds: Sequence[tuple[str, str]], counter: _SentCounter) -> None:
    ae = _scu_ae(settings)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, settings, destination)
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0]))
                for c in assoc.accepted_contexts}
    try:
        for path, kind in zip(files, kinds, strict=True):
            if counter.stop.is_set():
                return  # another association failed: its error is the send's
            status = assoc.send_c_store(path if kind in accepted else _converted(path))
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{_where(destination)}: no answer for {path.name} "
                                "(timeout or connection lost)")
            if not is_stored(int(code)):
                raise SendError(f"{_where(destination)}: status {describe(int(code))} for "
                                f"{path.name}")
            counter.stored()
    finally:
        if assoc.is_established:
            assoc.release()


def echo(settings: Settings, destination: Destination) -> int:
    """C-ECHO the destination; returns the status (0 success) or raises SendError."""
    ae = _scu_ae(settings)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, settings, destination)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise SendError(f"{_where(destination)}: no answer to C-ECHO")
    return int(code)


def _associate(ae: Any, settings: Settings, destination: Destination) -> Any:
    """An established association to ``destination`` (over TLS where it says so); else a
    SendError that says why, and what to fix."""
    watch = AssociationWatch()
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), *watch.handlers()],
                         tls_args=client_tls_args(settings.tls, destination))
    if assoc.is_established:
        watch.stop(assoc)
        keep_responses_for_the_caller(assoc)
        return assoc
    failure = watch.failure(destination, settings.node.acse_timeout)
    raise SendError(f"{_where(destination)}: {failure}", failure,
                    failure.fix(destination, ae.ae_title))


def _kind(path: Path) -> tuple[str, str]:
    """(SOP class, transfer syntax) from the file's meta information."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def _contexts_for(kinds: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """One uncompressed context per SOP class, and each compressed syntax in a context of
    its own: offered together, a PACS may pick the uncompressed one, and a compressed file
    could then not be sent as it is."""
    uncompressed = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    contexts: list[tuple[str, list[str]]] = []
    for sop_class, syntax in kinds:
        for wanted in ((sop_class, uncompressed), (sop_class, [syntax])):
            if wanted[1] == [syntax] and syntax in uncompressed:
                continue
            if wanted not in contexts:
                contexts.append(wanted)
    if len(contexts) > _MAX_CONTEXTS:
        raise SendError(f"series needs {len(contexts)} presentation contexts; one "
                        f"association takes {_MAX_CONTEXTS}")
    return contexts


def _converted(path: Path) -> pydicom.Dataset:
    """A file whose own transfer syntax was not accepted: decoded (and decompressed), for
    pynetdicom to encode in an accepted one. A file sent as it is goes from the disk in
    chunks, never decoded (network_options.make_ae)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    return ds


def _where(destination: Destination) -> str:
    tls = ", TLS" if destination.tls else ""
    return f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port}{tls})"
