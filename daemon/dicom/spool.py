"""Receiving a C-STORE dataset into a file as its fragments arrive.

pynetdicom keeps a dataset in memory until its last fragment (several copies by the time a
handler sees it), so an instance over node.max_instance_mb was held whole before it was
refused. For the node's own associations a Spool takes the fragments instead: written to
incoming/ in the store (later renamed into place, never copied), hashed on the way, and past
the limit only counted, so the handler answers 0xA701 having held one PDU at a time.

Everything else the decoder holds in memory until a message is whole: command sets (small:
a C-STORE-RQ's is a few hundred bytes) and the datasets of other messages (the node accepts
none but C-STORE's). Past MESSAGE_MEMORY_LIMIT bytes of those, fragments with no command
before them or a command that never ends, the association is aborted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

from denoised_node.storage.files import temp_prefix

log = logging.getLogger(__name__)

# What an association of the node's SCP carries (set by attach(), read by the decoder).
_SPOOLER = "_denoised_node_spooler"
_IMPLICIT_LITTLE = "1.2.840.10008.1.2"
# What one message may hold in memory, outside a spool. Generous for any command set.
MESSAGE_MEMORY_LIMIT = 256 * 1024


class Spool:
    """One received dataset (DICOM file format: preamble, meta, dataset) on its way to the
    store. pynetdicom sees a file object: write(), .file.flush(), .name, close()."""

    def __init__(self, folder: Path, limit_bytes: int) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=temp_prefix(), suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.limit_bytes = limit_bytes
        self.size = 0  # every byte received, kept or not
        # Why the bytes could not be kept (a full disk): the handler answers with its status.
        # Raised here it would end the association from pynetdicom's reading thread.
        self.failure: OSError | None = None
        self._digest = hashlib.sha256()

    @classmethod
    def of_bytes(cls, folder: Path, limit_bytes: int, data: bytes) -> Spool:
        spool = cls(folder, limit_bytes)
        spool.write(data)
        spool.close()
        return spool

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def file(self) -> Spool:
        return self

    @property
    def too_large(self) -> bool:
        return self.size > self.limit_bytes

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    @property
    def keeping(self) -> bool:
        return not self.too_large and self.failure is None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        was_kept = self.keeping
        self.size += len(data)
        if self.keeping:
            try:
                self._file.write(data)
            except OSError as exc:
                self.failure = exc
            self._digest.update(data)
        if was_kept and not self.keeping:
            self._give_space_back()  # refused anyway
        return len(data)

    def _give_space_back(self) -> None:
        try:
            self._file.truncate(0)
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self.failure = self.failure or exc

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:  # its buffer's last write: closed all the same
            self.failure = self.failure or exc

    def discard(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Spooler:
    """Where and how large: one per SCP, attached to each of its associations."""

    def __init__(self, folder: Path, limit_bytes: int) -> None:
        self.folder = folder
        self.limit_bytes = limit_bytes

    def attach(self, event: Any) -> None:
        """EVT_CONN_OPEN handler: this association's C-STORE datasets go to spools."""
        install_decoder()
        setattr(event.assoc, _SPOOLER, self)

    @staticmethod
    def discard_unfinished(event: Any) -> None:
        """EVT_CONN_CLOSED handler: a dataset whose last fragment never came is dropped
        (a finished one was handed to the C-STORE handler, which disposed of it)."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        spool = getattr(message, "_data_set_file", None)
        if isinstance(spool, Spool):
            spool.discard()


_pynetdicom_decode = DIMSEMessage.decode_msg


def install_decoder() -> None:
    if DIMSEMessage.decode_msg is not _decode_msg:
        DIMSEMessage.decode_msg = _decode_msg  # type: ignore[method-assign]


def _decode_msg(self: DIMSEMessage, primitive: P_DATA, assoc: Any = None) -> bool:
    """pynetdicom's decoder, but a C-STORE-RQ dataset of the node's associations goes to a
    Spool fragment by fragment. Everything else is pynetdicom's, one fragment at a time."""
    spooler: Spooler | None = getattr(assoc, _SPOOLER, None)
    if spooler is None or primitive.__class__ != P_DATA:
        return _pynetdicom_decode(self, primitive, assoc)
    for context_id, data in primitive.presentation_data_value_list:
        is_command = bool(data[0] & 1)
        current: Any = self._data_set_file
        if not is_command and isinstance(current, Spool):
            current.write(memoryview(data)[1:])
            if data[0] & 2:
                current.close()
                return True
            continue
        held = getattr(self, "_held_in_memory", 0) + len(data) - 1
        if held > MESSAGE_MEMORY_LIMIT:
            _abort_unbounded(self, assoc, held)
            return False
        self._held_in_memory = held  # type: ignore[attr-defined]  # kept on pynetdicom's message
        single = P_DATA()
        single.presentation_data_value_list = [[context_id, bytes(data)]]  # type: ignore[list-item]
        if _pynetdicom_decode(self, single, assoc):
            return True
        if is_command and data[0] & 2 and isinstance(self, C_STORE_RQ):
            spool = _open_spool(spooler, self, assoc, context_id)
            self._data_set_file = spool  # type: ignore[assignment]  # a file object to pynetdicom
            self._data_set_path = spool.path
    return False


def _abort_unbounded(message: DIMSEMessage, assoc: Any, held: int) -> None:
    """Drop what the message holds and abort the association (as pynetdicom does for an
    invalid PDU: A-ABORT, then the connection closes); what else arrives is ignored."""
    message.encoded_command_set = BytesIO()
    message.data_set = BytesIO()
    message._held_in_memory = 0  # type: ignore[attr-defined]
    sock = assoc.dul.socket
    reason = (f"{held} bytes of P-DATA with no whole command (a command set is small; "
              f"at most {MESSAGE_MEMORY_LIMIT} are held); association aborted")
    on_drop = getattr(sock, "on_drop", None)
    if on_drop is not None:  # the connection guard logs and counts it
        on_drop("message_size", reason)
    else:
        log.warning("association aborted: %s", reason)
    assoc.dul.event_queue.put("Evt19")


def _open_spool(spooler: Spooler, message: DIMSEMessage, assoc: Any, context_id: int) -> Spool:
    command = message.command_set
    context = assoc._accepted_cx.get(context_id)
    # An unaccepted context is refused by pynetdicom; the meta only has to be writable.
    syntax = UID(context.transfer_syntax[0] if context is not None else _IMPLICIT_LITTLE)
    spool = Spool(spooler.folder, spooler.limit_bytes)
    spool.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(sop_class_uid=command.AffectedSOPClassUID,
                            sop_instance_uid=command.AffectedSOPInstanceUID,
                            transfer_syntax=syntax)
    write_file_meta_info(spool, meta)  # type: ignore[arg-type]
    return spool
