"""Who may associate: the called AE title must be the node's, and the calling AE title must be
allowed (optionally only from given addresses). Decided once, when the A-ASSOCIATE-RQ arrives,
so a stranger never gets a presentation context."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from denoised_node.config.settings import NodeSettings

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4: rejected-permanent, by the
# DICOM UL service user, for an unrecognised called or calling AE title.
_CALLED_NOT_RECOGNISED = (0x01, 0x01, 0x07)
_CALLING_NOT_RECOGNISED = (0x01, 0x01, 0x03)


class Refusal(Enum):
    """Why an association is rejected."""

    CALLED_AE_TITLE = "called AE title is not the node's"
    CALLING_AE_TITLE = "calling AE title not allowed"
    ADDRESS = "calling AE title not allowed from this address"

    @property
    def reject_args(self) -> tuple[int, int, int]:
        if self is Refusal.CALLED_AE_TITLE:
            return _CALLED_NOT_RECOGNISED
        return _CALLING_NOT_RECOGNISED


@dataclass(frozen=True)
class AccessPolicy:
    """The node's AE title and who may call it; ``anyone`` when no list is configured."""

    ae_title: str
    titles_from_anywhere: frozenset[str]
    titles_from_networks: dict[str, tuple[IPNetwork, ...]]

    @classmethod
    def from_settings(cls, node: NodeSettings) -> AccessPolicy:
        anywhere = set(node.allowed_calling_ae_titles)
        networks: dict[str, list[IPNetwork]] = {}
        for peer in node.allowed_peers:
            if not peer.hosts:
                anywhere.add(peer.ae_title)
                continue
            networks.setdefault(peer.ae_title, []).extend(
                ipaddress.ip_network(host, strict=False) for host in peer.hosts)
        return cls(node.ae_title, frozenset(anywhere),
                   {title: tuple(nets) for title, nets in networks.items()})

    @property
    def anyone(self) -> bool:
        return not self.titles_from_anywhere and not self.titles_from_networks

    def may_connect_from(self, address: str) -> bool:
        """False when no calling AE title could ever be admitted from ``address`` (every
        allowed title is limited to networks that do not hold it): such a connection is
        closed when accepted, before it takes a slot."""
        if self.anyone or self.titles_from_anywhere:
            return True
        peer = _address(address)
        return peer is not None and any(peer.version == net.version and peer in net
                                        for nets in self.titles_from_networks.values()
                                        for net in nets)

    def refusal(self, calling: str, called: str, address: str) -> Refusal | None:
        """None if the association may go on, else why it is rejected."""
        if called.strip() != self.ae_title:
            return Refusal.CALLED_AE_TITLE
        if self.anyone:
            return None
        title = calling.strip()
        if title in self.titles_from_anywhere:
            return None
        networks = self.titles_from_networks.get(title)
        if networks is None:
            return Refusal.CALLING_AE_TITLE
        peer = _address(address)
        if peer is not None and any(peer.version == net.version and peer in net
                                    for net in networks):
            return None
        return Refusal.ADDRESS


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return address


def handle_requested(event: Any, policy: AccessPolicy,
                     on_decision: Callable[[Refusal | None], None] | None = None) -> None:
    """EVT_REQUESTED handler: reject an association the policy does not allow, before
    pynetdicom negotiates anything (unless the connection guard rejected it already)."""
    if event.assoc.is_rejected:
        return
    request = event.assoc.requestor.primitive
    calling, called = str(request.calling_ae_title), str(request.called_ae_title)
    address = str(event.assoc.requestor.address)
    refusal = policy.refusal(calling, called, address)
    if on_decision is not None:
        on_decision(refusal)
    if refusal is None:
        return
    log.warning("association rejected: %s", refusal.value,
                extra={"calling_ae": calling.strip(), "called_ae": called.strip(),
                       "peer_address": address})
    event.assoc.acse.send_reject(*refusal.reject_args)
    event.assoc.kill()  # as pynetdicom's own rejections: waits until the A-ASSOCIATE-RJ is out
