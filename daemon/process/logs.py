"""Logging to stderr, one event a line: plain `key=value` text or JSON lines.

Fields come from ``extra=``; attributes that could carry patient data are dropped here as a
last line of defence (the code never passes them, and a test reads the logs of a full run).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_FORBIDDEN = {"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID",
              "PatientBirthDate"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {key: value for key, value in vars(record).items()
            if key not in _STANDARD and key not in _FORBIDDEN and not key.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = _escape_controls(record.getMessage())
        parts = [_timestamp(record), record.levelname, record.name.removeprefix("denoised_node."),
                 message]
        parts += [f"{key}={_text(value)}" for key, value in _fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += " exception=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {"time": _timestamp(record), "level": record.levelname,
                                    "logger": record.name, "message": record.getMessage()}
        event.update({key: _plain(value) for key, value in _fields(record).items()})
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


# A field value stays bare only when it cannot be mistaken for more fields or another line.
_BARE = re.compile(r"^[!#-<>-~]+$")  # printable ASCII without space, '"' and '='
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _text(value: object) -> str:
    text = str(value)
    return text if _BARE.match(text) else json.dumps(text)


def _escape_controls(text: str) -> str:
    """Control characters (line breaks included) as escapes: values from the network, in a
    message, cannot start a line of their own."""
    return _CONTROLS.sub(lambda found: json.dumps(found.group())[1:-1], text)


def _plain(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def use_node_format(json_lines: bool = False) -> None:
    """Give every handler of the root logger the node's format (for handlers that another
    module set up, such as the training run's log file)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO, and some of it (A-ASSOCIATE dumps) is noise. Its
    # lines reach the handler above; a handler of its own (pynetdicom.debug_logger() adds
    # one, with another format) would print them a second time, differently.
    library = logging.getLogger("pynetdicom")
    library.setLevel(logging.WARNING)
    library.handlers[:] = [h for h in library.handlers if isinstance(h, logging.NullHandler)]
    library.propagate = True
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # waitress warns "Task queue depth" whenever a request waits for one of the HTTP
    # threads, as a browser fetching a page's pictures at once makes some do: routine.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # pydicom's validation warnings quote element values, which may be patient names.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
