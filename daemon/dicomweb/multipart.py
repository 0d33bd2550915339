"""multipart/related bodies of application/dicom parts (PS3.18 8.6.1.2, RFC 2387), both ways,
a chunk at a time: the writer streams files from disk, the reader streams parts to sinks.
Neither ever holds a part, let alone a body, in memory whole.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DICOM = "application/dicom"
CHUNK = 1 << 20
# Part headers are a line or three; more than this is not a DICOMweb client.
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_BOUNDARY = 256


class MultipartError(ValueError):
    """The request body is not the multipart/related body its Content-Type announces."""


# --- the writer (STOW-RS client) -------------------------------------------------------------

def new_boundary() -> str:
    # 32 random hex digits: a DICOM file holding this line by chance is not a worry.
    return f"denoised-node-{secrets.token_hex(16)}"


def content_type(boundary: str) -> str:
    return f'multipart/related; type="{DICOM}"; boundary={boundary}'


def _part_head(boundary: str, size: int) -> bytes:
    return (f"--{boundary}\r\nContent-Type: {DICOM}\r\nContent-Length: {size}\r\n\r\n"
            .encode("ascii"))


def _tail(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def body_length(boundary: str, sizes: Iterable[int]) -> int:
    """The Content-Length of write_body's body for parts of ``sizes`` bytes."""
    return sum(len(_part_head(boundary, size)) + size + 2 for size in sizes) + len(_tail(boundary))


def write_body(send: Callable[[bytes], object], boundary: str,
               files: Iterable[tuple[Path, int]]) -> None:
    """Send each (file, size) as an application/dicom part, read a chunk at a time."""
    for path, size in files:
        send(_part_head(boundary, size))
        sent = 0
        with path.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                sent += len(chunk)
                send(chunk)
        if sent != size:
            raise OSError(f"{path} changed while it was sent ({sent} bytes, not {size})")
        send(b"\r\n")
    send(_tail(boundary))


# --- the reader (STOW-RS receiver) -----------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# Unquoted values are tokens, but clients write type=application/dicom unquoted: any
# run without white space, quote or semicolon is taken.
_PARAMETER = re.compile(rf';\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]+)')


@dataclass(frozen=True)
class MediaType:
    """A Content-Type value: type/subtype in lower case, and its parameters (names in lower
    case, values unquoted)."""

    essence: str
    parameters: Mapping[str, str]

    @classmethod
    def parse(cls, value: str) -> MediaType:
        essence, _, rest = value.partition(";")
        parameters = {}
        for match in _PARAMETER.finditer(";" + rest):
            raw = match.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            parameters[match.group(1).lower()] = raw
        return cls(essence.strip().lower(), parameters)


@dataclass(frozen=True)
class PartHead:
    headers: Mapping[str, str]  # names in lower case

    @property
    def media_type(self) -> MediaType:
        return MediaType.parse(self.headers.get("content-type", "text/plain"))


class MultipartReader:
    """Reads a multipart body from ``stream`` (at most ``length`` bytes, None: to its end).

    ``next_part()`` gives the next part's headers, or None after the closing delimiter;
    ``read_part(write)`` then hands its content to ``write`` chunk by chunk and returns True
    when the part ended with a delimiter, False when the body ended inside it (cut short).
    Memory: one chunk and a delimiter's length.
    """

    def __init__(self, stream: BinaryIO, boundary: str, length: int | None = None) -> None:
        # RFC 2046 allows 70 characters; Orthanc's STOW-RS client writes more. Be liberal.
        if not 1 <= len(boundary) <= MAX_BOUNDARY:
            raise MultipartError(f"the boundary parameter must have 1 to {MAX_BOUNDARY} "
                                 "characters")
        self._stream = stream
        self._left = length
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = b"\r\n"  # so that a delimiter at the very start is found like any other
        self._eof = False
        self._state = "preamble"  # preamble, head, body, done

    @property
    def done(self) -> bool:
        return self._state == "done"

    def _fill(self) -> bool:
        """Read one more chunk into the buffer; False at the end of the body."""
        if self._eof:
            return False
        size = CHUNK if self._left is None else min(CHUNK, self._left)
        chunk = self._stream.read(size) if size > 0 else b""
        if not chunk:
            self._eof = True
            return False
        if self._left is not None:
            self._left -= len(chunk)
        self._buffer += chunk
        return True

    def _skip_to_delimiter(self, write: Callable[[bytes], object] | None) -> bool:
        """Pass what comes before the next delimiter to ``write`` (None: drop it) and consume
        the delimiter; False if the body ends first."""
        keep = len(self._delimiter) - 1
        while True:
            found = self._buffer.find(self._delimiter)
            if found >= 0:
                if write is not None and found:
                    write(self._buffer[:found])
                self._buffer = self._buffer[found + len(self._delimiter):]
                return True
            if len(self._buffer) > keep:
                if write is not None:
                    write(self._buffer[:-keep])
                self._buffer = self._buffer[-keep:]
            if not self._fill():
                if write is not None and self._buffer:
                    write(self._buffer)
                self._buffer = b""
                return False

    def _after_delimiter(self) -> bool:
        """After a delimiter: True when a part follows, False after the closing one."""
        while len(self._buffer) < 2 and self._fill():
            pass
        if self._buffer.startswith(b"--"):
            self._state = "done"
            return False
        # Transport padding (spaces, tabs) may follow a delimiter before its CRLF.
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                if self._buffer[:end].strip(b" \t"):
                    raise MultipartError("a delimiter line is followed by other text")
                self._buffer = self._buffer[end + 2:]
                return True
            if len(self._buffer) > 1024 or not self._fill():
                raise MultipartError("the body ends (or rambles on) after a delimiter")

    def next_part(self) -> PartHead | None:
        if self._state == "done":
            return None
        if self._state == "preamble" and not self._skip_to_delimiter(None):
            raise MultipartError("no part: the boundary of the Content-Type never occurs")
        if self._state == "body" and not self._skip_to_delimiter(None):
            self._state = "done"  # the caller did not read the part, and it was cut short
            return None
        if not self._after_delimiter():
            return None
        while (end := self._buffer.find(b"\r\n\r\n")) < 0 and not self._buffer.startswith(b"\r\n"):
            if len(self._buffer) > MAX_PART_HEADER_BYTES:
                raise MultipartError(f"a part's headers exceed {MAX_PART_HEADER_BYTES} bytes")
            if not self._fill():
                raise MultipartError("the body ends inside a part's headers")
        if self._buffer.startswith(b"\r\n"):  # no headers at all: text/plain by default
            head, self._buffer = b"", self._buffer[2:]
        else:
            head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise MultipartError(f"a part header line is not 'Name: value': {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        self._state = "body"
        return PartHead(headers)

    def read_part(self, write: Callable[[bytes], object]) -> bool:
        """The current part's content to ``write``; False when the body ended inside it."""
        if self._state != "body":
            raise RuntimeError("read_part() without next_part()")
        ended = self._skip_to_delimiter(write)
        self._state = "head" if ended else "done"
        return ended
