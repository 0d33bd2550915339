"""daemon/dicom/scp_sockets.py and the SCP on sockets bound beforehand: a port is one node's, and
receivers that share the sockets come and go without closing them for the others."""

from __future__ import annotations

import socket

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from denoised_node.config.settings import ConfigError, Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.daemon.dicom.scp_sockets import PLAIN, bind_listeners
from denoised_node.storage.runtime import open_runtime


def _echo(port: int) -> bool:
    ae = AE(ae_title="MOD")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISER")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_a_port_in_use_is_a_config_error_naming_the_key(settings_factory) -> None:  # type: ignore[no-untyped-def]
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        settings: Settings = settings_factory(node__port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match=r"node\.port"):
            bind_listeners(settings)
    finally:
        taken.close()


def test_a_receiver_leaving_keeps_the_socket_open_for_the_others(settings_factory) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = settings_factory(node__port=0)
    runtime = open_runtime(settings, initialise_empty=True)
    sockets = bind_listeners(settings)
    port = sockets[PLAIN].getsockname()[1]
    first = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings),
                      sockets={PLAIN: sockets[PLAIN].dup()}, shared=True)
    second = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings),
                       sockets={PLAIN: sockets[PLAIN].dup()}, shared=True)
    try:
        assert _echo(port)
        first.shutdown()
        assert _echo(port) and _echo(port)  # the second still accepts on the same port
    finally:
        second.shutdown()
        sockets[PLAIN].close()
