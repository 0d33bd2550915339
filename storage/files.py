"""The file store: atomic, durable writes at paths built only from checked UIDs.

Layout under the data dir:
    incoming/    temp files being written, named <host>~*.part (cleaned at start: a crash
                 leaves only these; another host's only once stale, as the store may be shared)
    instances/<study>/<series>/<sop>.dcm    received instances
    derived/<job id>/<sop>.dcm              derived instances waiting to be sent
    derived/<job id>/refused/<sop>.dcm      the stack the safety gate refused (shown, never sent)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

# Digits and dots, no empty component, at most 64 characters (PS3.5 9.1). Leading zeros in a
# component are not standard but some scanners send them; they are harmless in a path.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# The layout above, built (and read back) only here.
INSTANCES = "instances"
DERIVED = "derived"
SUFFIX = ".dcm"


class StoreError(Exception):
    """The file store could not do what was asked."""


class InvalidUID(StoreError):
    """A UID is not a valid DICOM UID, so it cannot name a file or folder."""


class OutOfSpace(StoreError):
    """Free space is under the configured watermark, or the disk is full."""


def check_uid(value: object, what: str) -> str:
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    if not text or len(text) > 64 or not _UID.match(text):
        raise InvalidUID(f"{what} {text[:80]!r} is not a valid DICOM UID")
    return text


@dataclass(frozen=True)
class InstanceUIDs:
    """The UIDs that file an instance, checked (and trimmed) on construction: an object that
    exists names a safe path."""

    study: str
    series: str
    sop: str

    def __post_init__(self) -> None:
        for name, what in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                           ("sop", "SOPInstanceUID")):
            object.__setattr__(self, name, check_uid(getattr(self, name), what))

    @property
    def relative_path(self) -> str:
        """Where the store keeps the instance, relative to its root."""
        return f"{series_folder(self.study, self.series)}{self.sop}{SUFFIX}"


def series_folder(study_uid: str, series_uid: str) -> str:
    """The store-relative folder (with its trailing slash) of a series' received instances."""
    return f"{INSTANCES}/{study_uid}/{series_uid}/"


def sop_uid_of(relative_path: str) -> str:
    """The SOP Instance UID that names an instance's file, read back from its path (as
    written by InstanceUIDs.relative_path; not checked)."""
    return PurePosixPath(relative_path).name.removesuffix(SUFFIX)


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size_bytes: int


class FileStore:
    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.incoming = self.root / "incoming"
        self.instances = self.root / INSTANCES
        self.derived = self.root / DERIVED
        for folder in (self.incoming, self.instances, self.derived):
            folder.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int = 0) -> None:
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfSpace(
                f"free space {free // 2**20} MiB in {self.root} is under the watermark of "
                f"{self.min_free_bytes // 2**20} MiB; free some space or lower node.min_free_mb"
            )

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return InstanceUIDs(study_uid, series_uid, sop_uid).relative_path

    def write_instance(self, study_uid: str, series_uid: str, sop_uid: str,
                       data: bytes) -> StoredFile:
        relative = self.instance_path(study_uid, series_uid, sop_uid)
        self.check_space(len(data))
        self.write_atomic(self.root / relative, data)
        return StoredFile(relative, len(data))

    def write_atomic(self, target: Path, data: bytes) -> None:
        write_atomic(target, data, temp_dir=self.incoming)

    def keep_received(self, received: Path, relative: str) -> None:
        """Put a file received into incoming/ in place at ``relative``, durably (fsync,
        rename, fsync of the folder), without copying it. ``received`` stays as a second
        name of the same file until its owner removes it, so the file can be put in place
        again if it disappears before the index row is committed."""
        target = self.path(relative)
        _make_dirs_durable(target.parent)
        fd = os.open(received, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        link = self.incoming / f"{temp_prefix()}{os.urandom(8).hex()}.part"
        try:
            os.link(received, link)
            os.replace(link, target)
        except OSError as exc:
            _unlink_quietly(link)
            if exc.errno == errno.ENOSPC:
                raise OutOfSpace(f"disk full while writing {target.name}") from exc
            raise
        _fsync_dir(target.parent)

    def path(self, relative: str) -> Path:
        """The absolute path of a store-relative path (as kept in the index). Lexical checks
        only: the store builds these paths from checked UIDs and holds no symlinks, and
        resolving them costs a system call per folder on every received image."""
        parts = PurePosixPath(relative).parts
        if not parts or relative.startswith("/") or any(p in ("..", ".", "") for p in parts):
            raise StoreError(f"path {relative!r} is outside the store")
        return self.root.joinpath(*parts)

    def relative(self, path: Path) -> str:
        """The store-relative path (as kept in the index) of a path under the store."""
        return path.relative_to(self.root).as_posix()

    def series_folders(self) -> list[Path]:
        """The folders of received series (instances/<study>/<series>), sorted."""
        return sorted(p for p in self.instances.glob("*/*") if p.is_dir())

    @staticmethod
    def dicom_files(folder: Path) -> list[Path]:
        """The instances in one of the store's folders (not in its subfolders), sorted."""
        return sorted(folder.glob(f"*{SUFFIX}"))

    def derived_dir(self, job_id: int) -> Path:
        return self.derived / str(int(job_id))

    def refused_dir(self, job_id: int) -> Path:
        """The stack the safety gate refused, kept for the series page and never sent: in
        the job's folder (never among the files sent), so the job's next attempt and the
        series' purge remove it with the rest."""
        return self.derived_dir(job_id) / "refused"

    def clean_incoming(self, now: float | None = None) -> int:
        """Remove temp files a crash left behind; they were never acknowledged.

        On a store shared by several hosts (a second `serve` for failover) another host may
        be writing its own right now: those go only once untouched for STALE_TEMP_SECONDS.
        """
        removed = 0
        mine = temp_prefix()
        cutoff = (time.time() if now is None else now) - STALE_TEMP_SECONDS
        for leftover in self.incoming.glob("*.part"):
            host_tagged = _HOST_MARK in leftover.name
            if host_tagged and not leftover.name.startswith(mine):
                try:
                    if leftover.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue  # its writer renamed it into place meanwhile
            _unlink_quietly(leftover)
            removed += 1
        if removed:
            log.info("removed unfinished temp files", extra={"count": removed})
        return removed

    def remove(self, relative: str) -> None:
        _unlink_quietly(self.path(relative))

    def remove_tree(self, folder: Path) -> None:
        if folder.resolve().is_relative_to(self.root.resolve()):
            shutil.rmtree(folder, ignore_errors=True)


# Temp files carry the writing host's name: see FileStore.clean_incoming.
_HOST_MARK = "~"
STALE_TEMP_SECONDS = 3600.0


def temp_prefix() -> str:
    return f"{socket.gethostname()}{_HOST_MARK}"


def write_atomic(target: Path, data: bytes, temp_dir: Path | None = None, *,
                 durable: bool = True) -> None:
    """Write to a temp file, fsync it, rename it into place and fsync the folder, so a
    reader (or a crash) sees either the whole file or none of it. ``durable=False`` skips
    both fsyncs for a caller that flushes a whole batch at once with ``sync_filesystem``."""
    _make_dirs_durable(target.parent)
    fd, temp_name = tempfile.mkstemp(dir=temp_dir or target.parent, prefix=temp_prefix(),
                                     suffix=".part")
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_name, target)
    except OSError as exc:
        _unlink_quietly(Path(temp_name))
        if exc.errno == errno.ENOSPC:
            raise OutOfSpace(f"disk full while writing {target.name}") from exc
        raise
    if durable:
        _fsync_dir(target.parent)


def sync_filesystem(folder: Path) -> None:
    """Flush every write of the file system holding ``folder`` (syncfs(2)): one flush for a
    batch of files instead of two fsyncs per file."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC is not None and _LIBC.syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _make_dirs_durable(folder: Path) -> None:
    """Create missing folders and fsync each new one's parent, so the new entries survive
    a power loss along with the file."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
