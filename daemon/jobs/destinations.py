"""A destination of either kind: send a series to it, and check that it answers.

kind = "dimse": C-STORE and C-ECHO (scu.py); kind = "dicomweb": STOW-RS and a QIDO-RS query
(dicomweb/client.py). The worker, `echo`, `doctor` and the status page call these and never
ask which kind a destination is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from denoised_node.config.settings import AnyDestination, Destination, Settings
from denoised_node.daemon.dicom.scu import SendResult


def send_to(settings: Settings, destination: AnyDestination, files: Sequence[Path],
            progress: Callable[[int, int], None] | None = None) -> SendResult:
    """Store ``files`` at ``destination``; SendError (its ``permanent`` and ``fix``) when it
    does not take them all."""
    if isinstance(destination, Destination):
        from denoised_node.daemon.dicom.scu import send_files

        return send_files(settings, destination, files, progress)
    from denoised_node.daemon.dicomweb.client import send_files as stow

    return stow(settings, destination, files, progress)


@dataclass(frozen=True)
class EchoAnswer:
    ok: bool
    service: str  # "C-ECHO" or "QIDO-RS"
    detail: str  # what answered, for people
    facts: dict[str, object]  # for --json

    def line(self, name: str) -> str:
        """What `echo` prints: "pacs (PACS@host:104): C-ECHO ok"."""
        said = f"{self.service} ok" if self.ok and self.service == "C-ECHO" else self.detail
        return f"{name} ({self.facts['where']}): {said}"


def where(destination: AnyDestination) -> str:
    if isinstance(destination, Destination):
        return f"{destination.ae_title}@{destination.host}:{destination.port}"
    return destination.url


def echo(settings: Settings, destination: AnyDestination) -> EchoAnswer:
    """C-ECHO a DIMSE destination, or ask a DICOMweb one GET {url}/studies?limit=1; a
    SendError (with its fix) when it cannot be reached or refuses."""
    place = where(destination)
    if isinstance(destination, Destination):
        from denoised_node.daemon.dicom.scu import echo as c_echo

        code = c_echo(settings, destination)
        detail = f"C-ECHO status 0x{code:04X}" + (" over TLS" if destination.tls else "")
        return EchoAnswer(code == 0, "C-ECHO", detail,
                          {"destination": destination.name, "kind": "dimse", "where": place,
                           "ae_title": destination.ae_title, "host": destination.host,
                           "port": destination.port, "status": code})
    from denoised_node.daemon.dicomweb.client import qido_echo

    answer = qido_echo(settings, destination)
    listed = "" if answer.studies is None else f", {answer.studies} study(ies) listed"
    server = f" by {answer.server}" if answer.server else ""
    detail = (f"QIDO-RS ok: GET studies?limit=1 answered {answer.status}{server} in "
              f"{answer.milliseconds:.0f} ms{listed}")
    return EchoAnswer(True, "QIDO-RS", detail,
                      {"destination": destination.name, "kind": "dicomweb", "where": place,
                       "url": destination.url, "status": answer.status,
                       "server": answer.server, "milliseconds": round(answer.milliseconds, 1)})
