"""Access control: the called AE title must be the node's; calling AE titles (optionally with
source addresses) are checked when the association is requested."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from denoised_node.config.settings import ConfigError, NodeSettings, Settings, load_settings
from denoised_node.daemon.dicom.access import AccessPolicy, Refusal
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.storage.runtime import open_runtime


def _policy(**node: Any) -> AccessPolicy:
    return AccessPolicy.from_settings(NodeSettings(**node))


def test_without_lists_anyone_may_call_but_only_the_nodes_title() -> None:
    policy = _policy()
    assert policy.anyone
    assert policy.refusal("ANYONE", "DENOISER", "192.0.2.7") is None
    assert policy.refusal("ANYONE", "DENOISER  ", "192.0.2.7") is None  # padded title
    assert policy.refusal("ANYONE", "OTHER", "192.0.2.7") is Refusal.CALLED_AE_TITLE


def test_calling_titles_without_addresses_come_from_anywhere() -> None:
    policy = _policy(allowed_calling_ae_titles=["PACS"],
                     allowed_peers=[{"ae_title": "MOD"}])
    assert policy.refusal("PACS", "DENOISER", "203.0.113.9") is None
    assert policy.refusal("MOD", "DENOISER", "203.0.113.9") is None
    assert policy.refusal("STRANGER", "DENOISER", "127.0.0.1") is Refusal.CALLING_AE_TITLE


def test_peers_with_addresses_are_admitted_from_those_only() -> None:
    policy = _policy(allowed_peers=[
        {"ae_title": "SCANNER", "hosts": ["10.1.2.3", "10.9.0.0/16"]},
        {"ae_title": "SCANNER", "hosts": ["2001:db8::/32"]},
        {"ae_title": "PACS", "hosts": ["192.0.2.10"]},
    ])
    assert policy.refusal("SCANNER", "DENOISER", "10.1.2.3") is None
    assert policy.refusal("SCANNER", "DENOISER", "10.9.200.1") is None
    assert policy.refusal("SCANNER", "DENOISER", "2001:db8::5") is None
    assert policy.refusal("SCANNER", "DENOISER", "::ffff:10.1.2.3") is None  # dual-stack socket
    assert policy.refusal("SCANNER", "DENOISER", "10.1.2.4") is Refusal.ADDRESS
    assert policy.refusal("SCANNER", "DENOISER", "not an address") is Refusal.ADDRESS
    assert policy.refusal("PACS", "DENOISER", "10.1.2.3") is Refusal.ADDRESS
    assert policy.refusal("OTHER", "DENOISER", "10.1.2.3") is Refusal.CALLING_AE_TITLE


def test_a_host_name_is_a_clear_config_error() -> None:
    env = {"DENOISED_NODE_NODE__ALLOWED_PEERS": '[{ae_title = "PACS", hosts = ["pacs.local"]}]'}
    with pytest.raises(ConfigError, match=r"node\.allowed_peers\.0\.hosts.*'pacs\.local' is not "
                                          r"an IP address or network"):
        load_settings(None, environ=env)


def test_an_unknown_key_in_a_peer_is_named() -> None:
    env = {"DENOISED_NODE_NODE__ALLOWED_PEERS": '[{ae_title = "PACS", host = "10.0.0.1"}]'}
    with pytest.raises(ConfigError, match=r"unknown key 'node\.allowed_peers\.0\.host'"):
        load_settings(None, environ=env)


@pytest.fixture
def guarded_port(settings_factory: Callable[..., Settings]) -> Iterator[int]:
    settings = settings_factory(
        node__port=0, node__allowed_calling_ae_titles='["ANYWHERE"]',
        node__allowed_peers='[{ae_title = "LOCAL", hosts = ["127.0.0.0/8", "::1"]}, '
                            '{ae_title = "REMOTE", hosts = ["198.51.100.0/24"]}]')
    runtime = open_runtime(settings, initialise_empty=True)
    listeners = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings))
    yield listeners.port("plain")
    listeners.shutdown()


def _associate(port: int, calling: str, called: str = "DENOISER") -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


@pytest.mark.parametrize("calling", ["ANYWHERE", "LOCAL"])
def test_allowed_peers_associate(guarded_port: int, calling: str) -> None:
    assoc = _associate(guarded_port, calling)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize(("calling", "called", "diagnostic"), [
    ("REMOTE", "DENOISER", 0x03),  # allowed title, but not from this address
    ("STRANGER", "DENOISER", 0x03),  # calling AE title not recognised
    ("LOCAL", "SOMEONE", 0x07),  # called AE title not recognised
])
def test_others_are_rejected_at_association_time(guarded_port: int, calling: str, called: str,
                                                 diagnostic: int) -> None:
    assoc = _associate(guarded_port, calling, called)
    assert assoc.is_rejected
    reject = assoc.acceptor.primitive
    assert (reject.result, reject.result_source, reject.diagnostic) == (0x01, 0x01, diagnostic)


def test_tls_port_clashing_with_the_plain_port_is_a_clear_error(tmp_path: Any) -> None:
    env = {"DENOISED_NODE_TLS__ENABLED": "true", "DENOISED_NODE_TLS__PORT": "11112",
           "DENOISED_NODE_TLS__CERTIFICATE": "/c.pem", "DENOISED_NODE_TLS__PRIVATE_KEY": "/k.pem",
           "DENOISED_NODE_TLS__REQUIRE_CLIENT_CERTIFICATE": "false"}
    with pytest.raises(ConfigError, match=r"tls\.port and node\.port are both 11112"):
        load_settings(None, environ=env)
    with pytest.raises(ConfigError, match=r"plain_port = false needs tls\.enabled = true"):
        load_settings(None, environ={"DENOISED_NODE_TLS__PLAIN_PORT": "false"})
    with pytest.raises(ConfigError, match=r"tls\.minimum_version"):
        load_settings(None, environ={"DENOISED_NODE_TLS__MINIMUM_VERSION": "SSLv3"})
