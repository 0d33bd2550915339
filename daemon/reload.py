"""`systemctl reload` (SIGHUP to serve): read the config again, check it whole, and say what
happened.

A reload either takes the whole new config or none of it: a file that does not validate, a
certificate that does not load, a model a rule names that cannot be read, or a change to a key
that only a restart can apply (a port, the database, the data directory...) refuses it, the
reason is logged, and the running config stays. What serve does with an accepted config (the
allowlist and TLS context for new associations, graceful worker restarts) is in supervisor.py.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from denoised_node.config.settings import ConfigError, Settings, load_settings

log = logging.getLogger(__name__)

# Keys that a running serve cannot change: its sockets, its database and store, its process
# counts, its HTTP endpoint, its log format. None: the whole section.
RESTART_ONLY: Mapping[str, frozenset[str] | None] = {
    "node": frozenset({"ae_title", "host", "port", "data_dir", "receive_processes",
                       "max_associations", "max_associations_per_address", "acse_timeout",
                       "handshake_timeout", "dimse_timeout", "network_timeout",
                       "maximum_pdu_size", "min_free_mb", "max_instance_mb"}),
    "database": None,
    "worker": frozenset({"count"}),
    "http": None,
    "tls": frozenset({"enabled", "port", "plain_port"}),
    "logging": None,
    "retention": None,
}
# Sections that serve's own threads use; a change elsewhere restarts the workers.
SERVE_SECTIONS = frozenset({"node", "tls"})


class ReloadRefused(ConfigError):
    """The new config was refused; the running one stays."""


def restart_only_changes(running: Settings, new: Settings) -> list[str]:
    """The dotted keys in RESTART_ONLY whose value differs."""
    changed = []
    for section, keys in RESTART_ONLY.items():
        old_values = getattr(running, section).model_dump()
        new_values = getattr(new, section).model_dump()
        for key in sorted(keys if keys is not None else old_values.keys() | new_values.keys()):
            if old_values.get(key) != new_values.get(key):
                changed.append(f"{section}.{key}")
    return changed


def changed_sections(running: Settings, new: Settings) -> set[str]:
    return {name for name in Settings.model_fields
            if getattr(running, name) != getattr(new, name)}


def load_for_reload(running: Settings, path: Path | None) -> Settings:
    """The config at ``path`` (and the environment), checked as a start-up would check it;
    ReloadRefused says why not."""
    try:
        new = load_settings(path)
    except ConfigError as exc:
        raise ReloadRefused(str(exc)) from None
    restart = restart_only_changes(running, new)
    if restart:
        raise ReloadRefused(f"{', '.join(restart)} changed, which only a restart applies "
                            "(systemctl restart denoised-node)")
    _check_files(new)
    return new


def _check_files(settings: Settings) -> None:
    """What pydantic cannot see: the certificates load, every model a rule names reads."""
    from denoised_node.daemon.dicom.tls import server_context
    from denoised_node.model.card import read_card
    from denoised_node.model.errors import ModelError

    if settings.tls.enabled:
        try:
            server_context(settings.tls)
        except (ConfigError, OSError, ValueError) as exc:
            raise ReloadRefused(str(exc)) from None
    models = {settings.model.checkpoint} | {settings.checkpoint_for(rule.model)
                                            for rule in settings.rules if not rule.ignore}
    for checkpoint in sorted(models):
        try:
            read_card(checkpoint)
        except ModelError as exc:
            raise ReloadRefused(f"model {checkpoint!r}: {exc}") from None
