"""The settings schema and its loading: TOML file first, then environment overrides.

Settings are loaded once at the edge (the CLI) and passed explicitly to whatever needs them.
Unknown keys are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from denoised_node.config import errors as config_errors
from denoised_node.config.base import Section as _Section
from denoised_node.config.rules import DEFAULT_MODEL, NotificationSettings, Rule

ENV_PREFIX = "DENOISED_NODE_"
CONFIG_ENV = "DENOISED_NODE_CONFIG"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and what to change."""


def _ae_title(value: str) -> str:
    # PS3.5 6.2: 16 characters of the default repertoire, no backslash (the value
    # separator) and no control character; spaces only as padding.
    if (not 1 <= len(value) <= 16 or not value.strip(" ")
            or any(not " " <= char <= "~" or char == "\\" for char in value)):
        raise ValueError(f"{value!r} is not an AE title: 1 to 16 printable ASCII characters, "
                         "not only spaces, without a backslash or a control character")
    return value


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


def default_data_dir() -> Path:
    """Where an unconfigured node keeps its data: the XDG data home, else ./var."""
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg) / "denoised-node"
    home = Path.home()
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".local" / "share" / "denoised-node"
    return Path.cwd() / "var"


class AllowedPeer(_Section):
    """A calling AE title allowed to associate, optionally only from some addresses."""

    ae_title: AETitle
    # IP addresses or networks (CIDR); empty: from any address.
    hosts: list[str] = Field(default_factory=list)

    @field_validator("hosts")
    @classmethod
    def _hosts_are_addresses(cls, value: list[str]) -> list[str]:
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or network (CIDR), e.g. "
                                 "10.0.0.5 or 10.0.0.0/24; host names are not accepted") from None
        return value


class NodeSettings(_Section):
    ae_title: AETitle = "DENOISER"
    # Loopback unless configured: a node is never exposed on the network by accident.
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)  # 0: any free port (tests)
    data_dir: Path = Field(default_factory=default_data_dir)
    # Processes that receive associations, all on node.port (and tls.port): associations
    # arriving together are received in parallel, up to one process per core. 1: serve
    # receives in its own process. The limits below hold per receiving process.
    receive_processes: int = Field(default=1, ge=1, le=64)
    # Agreed associations at once; as many connections again may be in the handshake.
    # Both are shared fairly across addresses when full (daemon/dicom/connection_guard.py).
    max_associations: int = Field(default=16, ge=1)
    # Connections one address may hold at once (more are closed when accepted), so that
    # one misbehaving host cannot take every association slot.
    max_associations_per_address: int = Field(default=8, ge=1)
    acse_timeout: float = Field(default=30.0, gt=0)
    # Seconds from an accepted connection to its whole association request (a TLS
    # handshake included); longer: closed. Modalities send the request at once.
    handshake_timeout: float = Field(default=10.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    # Also the longest silence inside a PDU on an accepted connection.
    network_timeout: float = Field(default=60.0, gt=0)
    # The longest P-DATA PDU received (advertised in the association); 0: unlimited, then a
    # PDU may be as long as node.max_instance_mb. Longer PDUs end the connection.
    maximum_pdu_size: int = Field(default=1048576, ge=0)
    # Refuse new instances (0xA700) while free space is under this, so the disk never fills.
    min_free_mb: int = Field(default=1024, ge=0)
    max_instance_mb: int = Field(default=2048, ge=1)
    # Calling AE titles allowed to associate; empty means any.
    allowed_calling_ae_titles: list[AETitle] = Field(default_factory=list)
    # Calling AE titles allowed from some addresses only (with allowed_calling_ae_titles:
    # either list admits a peer; both empty: anyone may associate).
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)


class TLSSettings(_Section):
    """DICOM TLS (PS3.15 BCP 195 profile): the SCP's TLS port and the trust for sends."""

    # Listen on tls.port with TLS too (needs certificate and private_key).
    enabled: bool = False
    port: int = Field(default=2762, ge=0, le=65535)  # 2762: the registered dicom-tls port
    # Keep node.port (no TLS) open beside the TLS port; false: TLS only.
    plain_port: bool = True
    certificate: Path | None = None  # PEM: the node's certificate (and chain)
    private_key: Path | None = None  # PEM, unencrypted, readable by the node's user only
    # PEM bundle of the CAs that issue peers' certificates: verifies clients (mutual TLS)
    # and the destinations' servers. None: the system's trust store for sends.
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled:
            missing = [k for k in ("certificate", "private_key") if getattr(self, k) is None]
            if self.require_client_certificate and self.ca_certificates is None:
                missing.append("ca_certificates (or require_client_certificate = false)")
            if missing:
                raise ValueError(f"tls.enabled needs {', '.join(missing)}")
        elif not self.plain_port:
            raise ValueError("plain_port = false needs tls.enabled = true (no port would listen)")
        return self


class DatabaseSettings(_Section):
    # None: SQLite in data_dir/node.db.
    url: str | None = None
    echo: bool = False


class SeriesSettings(_Section):
    idle_seconds: float = Field(default=10.0, ge=0)
    # A series whose association released with gap-free instance numbers completes after this.
    released_grace_seconds: float = Field(default=1.0, ge=0)
    description_suffix: str = Field(default=" DENOISED", max_length=32)
    # Modalities denoised; others are recorded as ignored.
    modalities: list[str] = Field(default_factory=lambda: ["MR"])
    # Siemens mosaics (fMRI, DWI, ASL): denoised tile by tile as a volume, or ignored.
    mosaics: Literal["denoise", "ignore"] = "denoise"
    # Reformats and projections (MPR, resampled, MIP) of another series: ignored by default.
    reformats: Literal["ignore", "denoise"] = "ignore"


# The checkpoint shipped in the package (model/checkpoints/), by its bare name. (A rule's
# model DEFAULT_MODEL is another thing: whatever [model] checkpoint names.)
SHIPPED_CHECKPOINT = "default"
# Passes averaged per slice (flips and rotations) and planes averaged on near-isotropic
# volumes that inference accepts (model/inference.py reads them from here).
TTAPasses = Literal[1, 2, 4, 8]
Planes = Literal[1, 2, 3]
TTA_CHOICES: tuple[int, ...] = get_args(TTAPasses)
PLANE_CHOICES: tuple[int, ...] = get_args(Planes)


class ModelSettings(_Section):
    """The home of the inference knobs' defaults: ``Denoiser.load`` takes its defaults from
    here. The architecture and the noise schedule come from the checkpoint's card."""

    checkpoint: str = SHIPPED_CHECKPOINT
    device: str = "auto"
    batch_size: int = Field(default=8, ge=1)
    amp: bool = True
    threads: int = Field(default=0, ge=0)  # 0: torch's default
    # Models a worker keeps loaded (rules may name several): least recently used ones are
    # unloaded while the weights of those loaded exceed this.
    cache_mb: int = Field(default=1024, ge=1)
    # Passes averaged per slice (flips/rotations): None = 1 on a CPU (speed), 8 on a GPU.
    tta: TTAPasses | None = None
    # Planes averaged on near-isotropic volumes (1, 2, 3): None = 2 on a CPU, 3 on a GPU.
    planes: Planes | None = None
    # A worker's memory per series (issue 29, item 6: two 4096x4096 slices took one to
    # 9.5 GB). The network's memory grows with a batch's pixels, and faster than a slice's
    # pixels (attention at its lowest level): a batch holds at most batch_pixels pixels (at
    # least one slice; the default is 8 slices of 512x512); a slice of more than
    # max_slice_pixels, or a stack of more than max_stack_mb as float32 (the worker holds
    # about three copies), is left out with the reason, and a series of nothing else ignored.
    batch_pixels: int = Field(default=8 * 512 * 512, ge=1)
    max_slice_pixels: int = Field(default=1024 * 1024, ge=1)
    max_stack_mb: int = Field(default=4096, ge=1)

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class GateSettings(_Section):
    enabled: bool = True
    # |mean residual| / estimated sigma above this: the model shifted intensities.
    max_residual_mean_ratio: float = Field(default=0.5, gt=0)
    # Residual std relative to the estimated noise sigma, inside this band.
    min_residual_std_ratio: float = Field(default=0.3, gt=0)
    max_residual_std_ratio: float = Field(default=2.5, gt=0)
    # Correlation between the residual and the image's edges above this: structure removed.
    # (0.25: a good result reads under 0.08 on the MNI validation slices at 2-9 % and up to 0.2
    # on the test suite's sharp-edged phantoms; blurring by 2.5 px or a 1 px shift read 0.44-0.8,
    # by 1 px 0.22-0.66. `evaluate --families` reports catch and false-alarm rates.)
    max_edge_correlation: float = Field(default=0.25, gt=0)
    # Noise level read in the output over the input's: texture left or added by the model.
    max_output_noise_ratio: float = Field(default=0.8, gt=0)
    # Relative change of the mean intensity inside the tissue mask.
    max_tissue_mean_change: float = Field(default=0.05, gt=0)
    # 99th percentile of the residual smoothed over ~10 px, over the noise sigma: a region
    # darkened or brightened.
    max_local_shift_ratio: float = Field(default=1.2, gt=0)
    # Share of tissue where the residual holds compact blobs (6 robust SD): small structures lost.
    max_blob_fraction: float = Field(default=0.008, gt=0)
    # A refused result waits in state "held" for review (jobs approve/reject) instead of
    # failing; a rule's hold_gate_failures overrides this.
    hold_failures: bool = False


class WorkerSettings(_Section):
    count: int = Field(default=1, ge=0)
    lease_seconds: float = Field(default=120.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    # With nothing to do the wait for work doubles up to this. A job that this node's serve
    # queues wakes its workers at once; a replay from the CLI, or a job another host's serve
    # queued (PostgreSQL scale-out), waits at most this long.
    idle_poll_seconds: float = Field(default=10.0, gt=0)
    # Processing errors worth a retry (out of memory, a CUDA error): tried this many times,
    # with an exponential backoff and jitter between the tries.
    max_processing_attempts: int = Field(default=3, ge=1)
    processing_backoff_base_seconds: float = Field(default=2.0, gt=0)
    processing_backoff_max_seconds: float = Field(default=300.0, gt=0)
    worker_id: str | None = None
    # `serve` kills (and restarts) a worker that sent no heartbeat for this long.
    watchdog_seconds: float = Field(default=600.0, gt=0)
    # At most one progress write per job this often (slices denoised, instances sent).
    progress_interval_seconds: float = Field(default=2.0, ge=0)


class SendSettings(_Section):
    # With these defaults a destination may be down for about 45 minutes (jitter included)
    # before a series fails; a failed series can be replayed.
    max_attempts: int = Field(default=20, ge=1)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)
    calling_ae_title: AETitle | None = None  # None: the node's own AE title
    # Associations a series is sent on at once to one destination, its images dealt over
    # them in turn. 1: one association per series, which every PACS takes.
    associations: int = Field(default=1, ge=1, le=8)
    # Lossless only; a compressed one must be accepted by every destination.
    output_transfer_syntax: Literal[
        "explicit", "implicit", "rle", "jpeg-ls", "jpeg2000"] = "explicit"


class RetentionSettings(_Section):
    # Source and derived files of finished series are purged after this; 0 keeps them forever.
    # Failed series are kept until replayed or purged with `denoised-node purge --failed`.
    done_after_hours: float = Field(default=72.0, ge=0)
    # Rows of purged series (and their job history) are deleted after this; 0 keeps them.
    forget_after_days: float = Field(default=90.0, ge=0)
    check_minutes: float = Field(default=10.0, gt=0)


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for a loopback address or name; "" and 0.0.0.0 (every interface) are not."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Basic authentication for the status pages and /metrics (/healthz and /readyz stay
    # open for probes): a user name and a file holding the password (never inline).
    username: str | None = Field(default=None, min_length=1, pattern=r"^[^:\x00-\x1f]+$")
    password_file: Path | None = None
    # Or (and) a bearer token: `Authorization: Bearer <the file's content>`.
    token_file: Path | None = None
    # Serve without authentication on a host that is not loopback (behind a proxy that
    # authenticates); otherwise such a host needs username/password_file or token_file.
    allow_unauthenticated: bool = False
    # Patient name, ID and birth date on the series page; off: never shown.
    show_patient_data: bool = False
    # Seconds a connection may stay silent with no request in progress (half a request, or
    # an answer not read, counts) before it is closed, and the connections open at once
    # (past it the longest silent one is closed, or a 503 when every one is busy).
    request_timeout: float = Field(default=10.0, gt=0)
    max_connections: int = Field(default=32, ge=1)
    # Past this many failed logins from one address within the window, that address is
    # answered 429 (Retry-After) without a password check until its oldest failure expires.
    max_failed_logins: int = Field(default=10, ge=1)
    failed_login_window_seconds: float = Field(default=60.0, gt=0)
    # DICOMweb STOW-RS at POST /dicom-web/studies[/{study}], behind the same authentication
    # as the pages; a request body of at most max_stow_mb (waitress holds it in a temporary
    # file, never in memory whole). docs/conformance.md.
    stow_rs: bool = False
    max_stow_mb: int = Field(default=2048, ge=1)

    @model_validator(mode="after")
    def _basic_auth_pairs(self) -> HttpSettings:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("http.username and http.password_file go together")
        return self

    @property
    def authenticated(self) -> bool:
        return self.password_file is not None or self.token_file is not None


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = Field(default=False, alias="json")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Destination(_Section):
    """A DIMSE destination (kind = "dimse", the default): C-STORE to an AE title."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: str
    port: Port
    # Send over TLS (trust: tls.ca_certificates; client certificate: tls.certificate).
    tls: bool = False
    # Check that the destination's certificate names `host`.
    tls_verify_hostname: bool = True
    # A test PACS: it gets output only from rules that name it, never by default.
    shadow: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_dicomweb_keys(cls, data: Any) -> Any:
        return _refuse_other_kinds_keys(data, "dimse", _DICOMWEB_ONLY)


class DicomwebDestination(_Section):
    """A DICOMweb destination (kind = "dicomweb"): STOW-RS to ``url``, the service root."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dicomweb"]
    url: str
    # Basic authentication (a user and a file holding the password), or a bearer token file.
    username: str | None = Field(default=None, min_length=1, pattern=r"^[^:\x00-\x1f]+$")
    password_file: Path | None = None
    token_file: Path | None = None
    # https: the server's certificate is checked against tls.ca_certificates (else the
    # system's trust store), and names the URL's host unless this is false; tls.certificate
    # and tls.private_key are offered as the client certificate where set.
    tls_verify_hostname: bool = True
    # Instances per STOW-RS request: as many as fit in batch_mb (one at least).
    batch_mb: int = Field(default=32, ge=1)
    timeout_seconds: float = Field(default=120.0, gt=0)
    shadow: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_dimse_keys(cls, data: Any) -> Any:
        return _refuse_other_kinds_keys(data, "dicomweb", _DIMSE_ONLY)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL (the DICOMweb "
                             "service root, e.g. http://pacs:8042/dicom-web)")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"{value!r}: the service root has no query, fragment or "
                             "credentials (use username + password_file, or token_file)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_way_to_log_in(self) -> DicomwebDestination:
        if (self.username is None) != (self.password_file is None):
            raise ValueError(f"destination {self.name!r}: username and password_file go "
                             "together")
        if self.password_file is not None and self.token_file is not None:
            raise ValueError(f"destination {self.name!r}: give username + password_file "
                             "(basic) or token_file (bearer), not both")
        return self


_DIMSE_ONLY = ("ae_title", "host", "port", "tls")
_DICOMWEB_ONLY = ("url", "username", "password_file", "token_file", "batch_mb",
                  "timeout_seconds")


def _refuse_other_kinds_keys(data: Any, kind: str, foreign: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        mixed = [key for key in foreign if key in data]
        if mixed:
            other = "dicomweb" if kind == "dimse" else "dimse"
            own = "ae_title, host and port" if kind == "dimse" else "url"
            raise ValueError(f"{', '.join(mixed)} belong{'s' if len(mixed) == 1 else ''} to "
                             f"kind = \"{other}\" destinations only; a kind = \"{kind}\" "
                             f"destination has {own}")
    return data


def destination_kind(value: Any) -> str:
    """A destination's kind: "dimse" unless it says otherwise."""
    if isinstance(value, dict):
        kind = value.get("kind", "dimse")
        return kind if isinstance(kind, str) else repr(kind)
    return str(getattr(value, "kind", "dimse"))


AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(destination_kind, custom_error_type="destination_kind",
                  custom_error_message='kind must be "dimse" (the default) or "dicomweb"')]


def _default_destinations() -> list[AnyDestination]:
    return [Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=4242)]


class Settings(_Section):
    node: NodeSettings = Field(default_factory=NodeSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    destinations: list[AnyDestination] = Field(default_factory=_default_destinations)
    # Named checkpoints that rules refer to: name -> "default", a shipped name or a path.
    models: dict[str, str] = Field(default_factory=dict)
    # Tried in order, the first match decides; none: every series of series.modalities is
    # denoised by the [model] checkpoint and sent to every destination that is not a shadow.
    rules: list[Rule] = Field(default_factory=list)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)

    @model_validator(mode="after")
    def _destination_names_unique(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _rules_name_what_exists(self) -> Settings:
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        known = {d.name for d in self.destinations}
        for name in self.models:
            if not name or any(c in name for c in "/\\") or name.endswith(".safetensors"):
                raise ValueError(f"models: {name!r} is not a model name (letters, digits, . _ -)")
        for rule in self.rules:
            unknown = [d for d in rule.destinations or [] if d not in known]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names destination(s) "
                                 f"{', '.join(map(repr, unknown))} that no [[destinations]] "
                                 f"entry has (known: {', '.join(sorted(known)) or 'none'})")
            if not (rule.model == DEFAULT_MODEL or rule.model in self.models
                    or _is_checkpoint_path(rule.model)):
                model_names = ", ".join(sorted(self.models)) or "none"
                raise ValueError(f"rule {rule.name!r}: model {rule.model!r} is not \"default\", "
                                 f"a [models] name (known: {model_names}) "
                                 "or a checkpoint path (with a / or ending in .safetensors)")
        return self

    @model_validator(mode="after")
    def _tls_port_not_the_plain_port(self) -> Settings:
        tls = self.tls
        if tls.enabled and tls.plain_port and tls.port == self.node.port != 0:
            raise ValueError(f"tls.port and node.port are both {tls.port}: give the TLS port "
                             "its own number, or set tls.plain_port = false")
        return self

    @model_validator(mode="after")
    def _http_authenticated_when_exposed(self) -> Settings:
        http = self.http
        if (http.enabled and not is_loopback(http.host) and not http.authenticated
                and not http.allow_unauthenticated):
            raise ValueError(f"http.host {http.host!r} is not loopback, so the status pages "
                             "need authentication: set http.username and http.password_file, "
                             "or http.token_file (or http.allow_unauthenticated = true behind "
                             "a proxy that authenticates)")
        return self

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.node.data_dir / 'node.db'}"

    @property
    def effective_rules(self) -> list[Rule]:
        """The configured rules, or the one that stands for a config without any."""
        if self.rules:
            return list(self.rules)
        modalities = "|".join(re.escape(m) for m in self.series.modalities)
        return [Rule(name="default", match={"Modality": f"^({modalities})$"})]

    def checkpoint_for(self, model: str) -> str:
        """What a rule's ``model`` names: the [model] checkpoint, a [models] entry or a path."""
        if model == DEFAULT_MODEL:
            return self.model.checkpoint
        return self.models.get(model, model)

    def rule_destinations(self, rule: Rule) -> list[AnyDestination]:
        """Where a rule sends: the destinations it names, else every one that is not a shadow."""
        if rule.destinations is None:
            return [d for d in self.destinations if not d.shadow]
        return [self.destination(name) for name in rule.destinations]

    def destination(self, name: str) -> AnyDestination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"no destination named {name!r} (known: {known})")

    def destination_named_or_titled(self, name: str) -> AnyDestination:
        """A destination by its config name, else by its AE title when exactly one has it
        (people type the title the PACS is known by)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        titled = [d for d in self.destinations
                  if isinstance(d, Destination) and d.ae_title == name]
        if len(titled) == 1:
            return titled[0]
        if titled:
            raise ConfigError(f"{len(titled)} destinations have AE title {name!r} "
                              f"({', '.join(d.name for d in titled)}): give the name")
        known = ", ".join(f"{d.name} ({d.ae_title if isinstance(d, Destination) else d.url})"
                          for d in self.destinations)
        raise ConfigError(f"no destination named or titled {name!r} (known: "
                          f"{known or 'none configured'})")


def _is_checkpoint_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith(".safetensors")


def load_settings(path: str | Path | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Load settings from a TOML file (``path``, else ``$DENOISED_NODE_CONFIG``, else none)
    and apply ``DENOISED_NODE_<SECTION>__<KEY>`` environment overrides on top."""
    env = dict(os.environ if environ is None else environ)
    source = path if path is not None else env.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    origin = "embedded defaults"
    if source:
        config_path = Path(source)
        origin = str(config_path)
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {config_path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from None
    sources = _apply_env_overrides(data, env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(config_errors.describe(exc, Settings, origin, sources)) from None


# Top-level keys that an environment variable sets whole, as JSON.
_JSON_KEYS = {"destinations": "a list of destinations", "rules": "a list of rules",
              "models": "an object of model names and checkpoints"}


def _apply_env_overrides(data: dict[str, Any], env: dict[str, str],
                         ) -> dict[tuple[str | int, ...], str]:
    """Set the overrides in ``data``; returns which variable set which key, so an error
    in a value blames the variable, not the file."""
    sources: dict[tuple[str | int, ...], str] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key in _JSON_KEYS:
            try:
                data[key] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name} must be JSON ({_JSON_KEYS[key]}): {exc}") from None
            sources[(key,)] = name
            continue
        section, sep, field = key.partition("__")
        if not sep or not field:
            raise ConfigError(f"environment variable {name} is not of the form "
                              f"{ENV_PREFIX}SECTION__KEY")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"environment variable {name}: {section!r} is not a section")
        target[field] = _parse_env_value(raw)
        sources[(section, field)] = name
        if section not in Settings.model_fields:  # the whole section is the variable's
            sources[(section,)] = name
    return sources


def _parse_env_value(raw: str) -> Any:
    """Environment values are TOML literals where they parse as one (numbers, booleans,
    lists), plain strings otherwise."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def describe_validation_error(exc: ValidationError) -> str:
    """The errors of values given outside a file (the command line)."""
    return config_errors.plain(exc)
