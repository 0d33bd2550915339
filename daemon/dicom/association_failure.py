"""Why an association to a DICOM peer was not established, as one value: the connection
refused, timed out or unreachable; the association rejected (with the A-ASSOCIATE-RJ's
reason), aborted, unanswered, answered in something other than DICOM, or accepted with no
presentation context. It says whether trying again can help and what to fix: the SCU's
errors, the worker's retries, `echo`, `doctor` and the status page all read it here."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pynetdicom import evt

from denoised_node.config.settings import Destination

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 is rejected-permanent; source 1 the service user,
# whose reasons 3 and 7 are the calling and the called AE title not recognised.
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_CALLED_AE_NOT_RECOGNISED = 0x07


class Kind(Enum):
    REFUSED = "connection refused"
    TIMED_OUT = "timed out"
    UNREACHABLE = "unreachable"
    TLS = "TLS handshake failed"
    NOT_DICOM = "the peer does not speak DICOM"
    REJECTED = "rejected"
    NO_CONTEXT = "no presentation context accepted"
    ABORTED = "aborted by the peer"
    NO_ANSWER = "no answer to the association request"


@dataclass(frozen=True)
class AssociationFailure:
    kind: Kind
    detail: str = ""
    permanent: bool = False  # the peer's answer will not change by itself: do not retry
    reason: int | None = None  # a service user's rejection reason

    def __str__(self) -> str:
        verb = "rejected" if self.kind is Kind.REJECTED else f"failed: {self.kind.value}"
        return f"association {verb}" + (f": {self.detail}" if self.detail else "")

    def fix(self, destination: Destination, calling_ae: str) -> str:
        """What to change, naming the AE title, host or port at fault."""
        where = f"{destination.host}:{destination.port}"
        if self.reason == _CALLED_AE_NOT_RECOGNISED:
            return (f"the peer at {where} does not answer to the AE title {destination.ae_title}: "
                    f"set ae_title of destination {destination.name} to its own AE title")
        if self.reason == _CALLING_AE_NOT_RECOGNISED:
            return f"declare this node's AE title {calling_ae} in {destination.ae_title}"
        if self.kind is Kind.NO_CONTEXT:
            return (f"let {destination.ae_title} accept {calling_ae}'s storage (or verification) "
                    "SOP classes and transfer syntaxes")
        if self.kind is Kind.REJECTED:
            return f"see {destination.ae_title}'s log for why it refuses {calling_ae}"
        if self.kind is Kind.REFUSED:
            return (f"nothing listens on {where}: check destination {destination.name}'s host "
                    f"and port, and that {destination.ae_title} runs")
        if self.kind is Kind.NOT_DICOM:
            return (f"{where} is not a DICOM port (a web server answers there?): set port of "
                    f"destination {destination.name} to {destination.ae_title}'s DICOM port")
        if self.kind is Kind.TLS:
            return ("check that tls.ca_certificates trusts its certificate, that the certificate "
                    f"names {destination.host}, and that {where} speaks TLS")
        if self.kind in (Kind.TIMED_OUT, Kind.UNREACHABLE):
            return f"check that {where} is reachable from this host (address, routing, firewall)"
        return f"check that {destination.ae_title} runs and accepts {calling_ae}; see its log"


class AssociationWatch:
    """Handlers bound to one association request that note what the peer did: whether
    the TCP connection opened, its A-ASSOCIATE or A-ABORT answer, and whether it sent
    something that is not a DICOM PDU instead (a web server on that port)."""

    def __init__(self) -> None:
        self.connected = False
        self.answers: list[Any] = []
        self.not_dicom = False

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_ACSE_RECV, self._answered),
                (evt.EVT_FSM_TRANSITION, self._moved)]

    def stop(self, assoc: Any) -> None:
        """Established: no more watching each PDU of the association."""
        assoc.unbind(evt.EVT_FSM_TRANSITION, self._moved)

    def _opened(self, _event: Any) -> None:
        self.connected = True

    def _answered(self, event: Any) -> None:
        self.answers.append(event.primitive)

    def _moved(self, event: Any) -> None:
        # PS3.8 9.2 Evt19: an unrecognised or invalid PDU received.
        self.not_dicom = self.not_dicom or event.fsm_event == "Evt19"

    def failure(self, destination: Destination, timeout: float) -> AssociationFailure:
        """Why the association was not established; where no TCP connection was made, a
        second connect finds out why (pynetdicom only logs the socket error)."""
        if not self.connected:
            return _connection_failure(destination, timeout)
        for primitive in self.answers:
            result = getattr(primitive, "result", None)
            if result == 0x00:  # accepted, but none of the proposed contexts: pynetdicom aborts
                return AssociationFailure(Kind.NO_CONTEXT, permanent=True)
            if result in (0x01, 0x02):
                return _rejection(primitive)
        if self.not_dicom:
            return AssociationFailure(Kind.NOT_DICOM)
        if self.answers:  # an A-ABORT
            return AssociationFailure(Kind.ABORTED)
        return AssociationFailure(Kind.NO_ANSWER, f"within {timeout:g} s")


def _rejection(primitive: Any) -> AssociationFailure:
    """'Called AE title not recognised (permanent, by the service user)', as DCMTK says it."""
    try:
        detail = (f"{primitive.reason_str} ({primitive.result_str.lower()}, by the "
                  f"{primitive.source_str.lower()})")
    except (KeyError, AttributeError, TypeError):
        detail = ""
    user = getattr(primitive, "result_source", None) == _SERVICE_USER
    return AssociationFailure(Kind.REJECTED, detail,
                              permanent=primitive.result == _REJECTED_PERMANENT,
                              reason=getattr(primitive, "diagnostic", None) if user else None)


def _connection_failure(destination: Destination, timeout: float) -> AssociationFailure:
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return AssociationFailure(Kind.REFUSED)
    except TimeoutError:
        return AssociationFailure(Kind.TIMED_OUT, f"no answer within {timeout:g} s")
    except socket.gaierror as exc:
        return AssociationFailure(Kind.UNREACHABLE, f"{destination.host}: {exc.strerror}")
    except OSError as exc:
        return AssociationFailure(Kind.UNREACHABLE, exc.strerror or str(exc))
    if destination.tls:  # TCP connects: the TLS handshake is what failed
        return AssociationFailure(Kind.TLS)
    return AssociationFailure(Kind.ABORTED, "the connection closed before an answer")
