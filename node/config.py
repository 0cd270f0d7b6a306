"""One validated configuration object, loaded once from a TOML file and ``PREANNOT_*`` variables.

Precedence: built-in defaults < TOML file < environment. Environment variables address any key by its
path with double underscores, parsed by pydantic-settings against the key's type:
``PREANNOT_NODE__PORT=11113``, ``PREANNOT_NODE__AE_TITLE=1234`` (stays the text "1234"),
``PREANNOT_NODE__ALLOWED_CALLERS='["ORTHANC","PACS"]'`` and ``PREANNOT_WEB__TOKENS='{"ris": "..."}'``
(JSON for lists and tables). Relative paths in a configuration file (``data_dir``, ``models.dir``, TLS
and secret files) are resolved against the file's folder, so the same file works from any directory.

Every key is documented in docs/configuration.md; ``preannot config init`` prints a commented file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from node.errors import ConfigError

__all__ = [
    "DeliveryConfig",
    "Destination",
    "JobsConfig",
    "ModelsConfig",
    "NodeConfig",
    "NodeSection",
    "OutputsConfig",
    "Priority",
    "RetentionConfig",
    "Route",
    "RouteFlag",
    "WebConfig",
    "load_config",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash/control


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


class Priority(StrEnum):
    """How urgent a route's results are: jobs are leased STAT first, then urgent, then routine."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """0 for the most urgent (how jobs store and sort it)."""
        return list(Priority).index(self)

    @classmethod
    def of_rank(cls, rank: int) -> Priority:
        return list(cls)[rank]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """``[node]``: the DICOM listener and the data folder."""

    ae_title: str = "PREANNOT"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/preannot")
    allowed_callers: list[str] = Field(default_factory=list)
    max_associations: int = Field(10, ge=1, le=1000)
    max_pdu: int = Field(262144, ge=0)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    stable_seconds: float = Field(10.0, ge=0)
    late_instances: Literal["reprocess", "ignore"] = "reprocess"
    #: a known SOP Instance UID received with other content: keep the first copy, or replace it
    on_conflict: Literal["keep", "replace"] = "keep"
    #: how long a series with evidence of missing instances is held before it fails without a result
    incomplete_hold_minutes: float = Field(60.0, gt=0)
    free_space_reserve_mb: int = Field(1024, ge=0)
    unmatched_retention_days: float = Field(7.0, ge=0)
    fsync: bool = True
    caller_hosts: dict[str, list[str]] = Field(default_factory=dict)
    max_associations_per_caller: int = Field(4, ge=0)
    #: connections that have not completed A-ASSOCIATE yet (their AE title is unknown): in all, per
    #: source address, and how long one may take; addresses in caller_hosts are never held back
    max_pending_connections: int = Field(32, ge=1)
    max_pending_per_host: int = Field(4, ge=1)
    association_request_timeout: float = Field(10.0, gt=0)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("caller_hosts")
    @classmethod
    def _hosts(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        import ipaddress

        for ae, nets in v.items():
            for n in nets:
                try:
                    ipaddress.ip_network(n, strict=False)
                except ValueError as exc:
                    raise ValueError(f"caller_hosts[{ae!r}]: {n!r} is not an IP address or network") from exc
        return v

    @model_validator(mode="after")
    def _tls(self) -> NodeSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (found only one)")
        if self.tls_require_client_cert and (self.tls_cert is None or self.tls_ca is None):
            raise ValueError("tls_require_client_cert needs tls_cert, tls_key and tls_ca (the clients' CA)")
        return self

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, v: list[str]) -> list[str]:
        return [c if c == "*" else _check_ae(c) for c in v]


class Destination(_Section):
    """``[[destinations]]``: where results are sent (C-STORE, DICOMweb STOW-RS or Orthanc REST)."""

    name: str
    kind: Literal["dicom", "dicomweb", "orthanc"] = "dicom"
    # kind = "dicom"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    calling_ae_title: str | None = None
    max_pdu: int = Field(0, ge=0)
    # kind = "dicomweb" / "orthanc"
    url: str | None = None
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None
    verify_tls: bool = True
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeout: float = Field(30.0, gt=0)
    #: send an IOCM rejection note (KOS) withdrawing superseded results delivered here
    withdraw_superseded: bool = True

    @model_validator(mode="after")
    def _kind_fields(self) -> Destination:
        if self.kind == "dicom":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) in (None, "")]
            if missing:
                raise ValueError(f"destination {self.name!r} (kind dicom) needs {', '.join(missing)}")
            _check_ae(str(self.ae_title))
        else:
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"destination {self.name!r} (kind {self.kind}) needs url = 'http(s)://...' "
                                 f"(found {self.url!r})")
            if self.auth == "basic" and not (self.username and (self.password_env or self.password_file)):
                raise ValueError(f"destination {self.name!r}: auth = 'basic' needs username and password_env or "
                                 "password_file")
            if self.auth == "bearer" and not (self.token_env or self.token_file):
                raise ValueError(f"destination {self.name!r}: auth = 'bearer' needs token_env or token_file")
        return self

    def secret(self) -> str | None:
        """The password (basic) or token (bearer), read now from the environment or a file; never logged.

        Raises:
            ConfigError: the variable or file is missing or empty.
        """
        env_name = self.password_env if self.auth == "basic" else self.token_env if self.auth == "bearer" else None
        file = self.password_file if self.auth == "basic" else self.token_file if self.auth == "bearer" else None
        if self.auth == "none":
            return None
        if env_name:
            value = os.environ.get(env_name, "")
            if not value:
                raise ConfigError(f"destination {self.name!r}: environment variable {env_name} is not set")
            return value
        assert file is not None
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"destination {self.name!r}: cannot read secret file {file}: {exc.strerror}") from exc
        if not value:
            raise ConfigError(f"destination {self.name!r}: secret file {file} is empty")
        return value

    def describe(self) -> str:
        """Where it goes, without secrets."""
        return f"{self.ae_title}@{self.host}:{self.port}" if self.kind == "dicom" else f"{self.kind} {self.url}"


#: Scalar value, list of allowed values, or an operator string: "<=2.5", "re:^AX", "contains:AXIAL", "*".
MatchValue = str | int | float | list[str | int | float]


CompletenessCheck = Literal["refused", "instance_number", "spacing"]
COMPLETENESS_CHECKS: tuple[CompletenessCheck, ...] = ("refused", "instance_number", "spacing")


class RouteFlag(_Section):
    """``[[routes.flags]]``: a result this route flags, and what follows: a higher priority for its
    delivery and/or a notification ([notify]). A flag names what it watches; the result records each flag
    raised (``flags`` in the result, the API and the notification)."""

    #: raised when a classifier's class is one of these (the class name as the card names it)
    classes: list[str] = Field(default_factory=list)
    #: raised by a follow-up with a finding not seen at the prior ([followup]; docs/followup.md)
    new_finding: bool = False
    #: raised by a follow-up with a finding whose volume grew by at least this much (%) since the prior
    growth_pct: float | None = Field(None, gt=0)
    #: the priority the flagged result is delivered with (and shown with)
    priority: Priority | None = None
    #: announce the flagged result through [notify] whatever the route's priority
    notify: bool = False

    @model_validator(mode="after")
    def _something(self) -> RouteFlag:
        if not self.classes and not self.new_finding and self.growth_pct is None:
            raise ValueError("a flag needs something to watch: classes = [...], new_finding = true or growth_pct = N")
        if self.priority is None and not self.notify:
            raise ValueError("a flag must do something: priority = ... and/or notify = true")
        return self


class Route(_Section):
    """``[[routes]]``: which series go to which models and destinations."""

    name: str
    match: dict[str, MatchValue] = Field(default_factory=dict)
    called_ae: list[str] = Field(default_factory=list)
    calling_ae: list[str] = Field(default_factory=list)
    models: list[str] = Field(min_length=1)
    send_to: list[str] = Field(default_factory=list)
    stable_seconds: float | None = Field(None, ge=0)
    extra_outputs: list[Literal["gsps", "sc", "kos", "rtstruct"]] = Field(default_factory=list)
    #: findings whose confidence (a detector's score) is below this are not reported
    min_confidence: float | None = Field(None, ge=0, le=1)
    #: at most this many findings per label, the most confident (or largest) first; the SR states the cap
    max_findings: int | None = Field(None, ge=1)
    # eligibility: series the route matches but its models cannot use are skipped with the reason
    min_slices: int = Field(5, ge=1)
    skip_localizers: bool = True
    skip_secondary_captures: bool = True
    skip_color: bool = True
    # completeness: evidence that instances are missing holds the series (see [node].incomplete_hold_minutes)
    completeness_checks: list[CompletenessCheck] = Field(
        default_factory=lambda: list(COMPLETENESS_CHECKS))
    #: a dicom destination asked by C-FIND how many instances the series has (NumberOfSeriesRelatedInstances)
    expected_count_from: str | None = None
    #: queue priority of this route's jobs: stat before urgent before routine (see [jobs].priority_aging_minutes)
    priority: Priority = Priority.ROUTINE
    #: results this route flags (a class, ...), raising their priority or sending a notification
    flags: list[RouteFlag] = Field(default_factory=list)


class ModelsConfig(_Section):
    """``[models]``: where model bundles live and how they run."""

    dir: Path = Path("models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: int = Field(0, ge=0)  # 0: torch's default
    preload: bool = True  # load the routed models when a worker starts, not on the first job


class JobsConfig(_Section):
    """``[jobs]``: the durable job queue."""

    workers: int = Field(1, ge=1, le=64)
    max_attempts: int = Field(3, ge=1)
    lease_seconds: float = Field(900.0, gt=0)
    timeout_seconds: float = Field(1800.0, gt=0)
    backoff_seconds: float = Field(10.0, ge=0)
    backoff_max_seconds: float = Field(600.0, ge=0)
    #: on SIGTERM, how long running jobs may take to finish; then they are put back in the queue (no
    #: attempt counted) and run again at the next start
    stop_timeout_seconds: float = Field(30.0, ge=0)
    #: a waiting job rises one priority level per this many minutes (routine work is never starved)
    priority_aging_minutes: float = Field(30.0, gt=0)
    #: a study-level model (``[[inputs]]`` in its card): how long its job waits, from its reference series'
    #: last instance, for the study's other input series to arrive and be stable; then a required input still
    #: missing fails the job with the input's name
    inputs_wait_seconds: float = Field(600.0, ge=0)
    #: time-to-result targets per priority (seconds from the series' last instance to the result's
    #: delivery); a result later than its target counts as a breach (metric, dashboard)
    targets: dict[Priority, float] = Field(default_factory=lambda: {Priority.STAT: 300.0, Priority.URGENT: 1800.0,
                                                                     Priority.ROUTINE: 14400.0})


class DeliveryConfig(_Section):
    """``[delivery]``: the outbox sending results to destinations."""

    max_attempts: int = Field(8, ge=1)
    backoff_seconds: float = Field(5.0, ge=0)
    backoff_max_seconds: float = Field(600.0, ge=0)
    poll_seconds: float = Field(1.0, gt=0)


class OutputsConfig(_Section):
    """``[outputs]``: the result objects written for each job."""

    uid_root: str | None = None
    seg_series_number: int = Field(9901, ge=1)
    sr_series_number: int = Field(9902, ge=1)
    gsps_series_number: int = Field(9903, ge=1)
    sc_series_number: int = Field(9904, ge=1)
    kos_series_number: int = Field(9905, ge=1)
    rtstruct_series_number: int = Field(9906, ge=1)
    #: series number of the IOCM rejection note that withdraws superseded results
    rejection_series_number: int = Field(9907, ge=1)
    #: its document title: "quality" (113001 Rejected for Quality Reasons) or "patient-safety" (113037)
    rejection_reason: Literal["quality", "patient-safety"] = "quality"
    manufacturer: str = "preannot"
    institution_name: str | None = None
    device_serial_number: str = "preannot-node"
    preview_png: bool = True
    #: at most this many findings (per job, in the report's order: largest or most confident first) are listed in
    #: the SR and the viewer objects, measured in full (diameters, long axis, outline); the SEG and result.json keep
    #: every finding and the SR states how many it does not list. 0: list every finding
    sr_max_findings: int = Field(100, ge=0)

    @field_validator("uid_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*\.", v):
            raise ValueError(f"{v!r} is not a UID root (digits and dots, ending with a dot)")
        if v is not None and len(v) > 40:
            raise ValueError(f"{v!r} is {len(v)} characters; a UID root must leave room (<= 40)")
        return v


class RetentionConfig(_Section):
    """``[retention]``: when received images and results are removed (audit records are kept)."""

    spool_days: float = Field(7.0, ge=0)
    outputs_days: float = Field(30.0, ge=0)
    interval_minutes: float = Field(60.0, gt=0)


class VerdictsConfig(_Section):
    """``[verdicts]``: the radiologist's verdict on each AI result, read from what comes back (see
    docs/closing-the-loop.md)."""

    #: examine SEG, SR and KO objects that arrive for a study the node sent results for (never routed to a model)
    enabled: bool = True
    #: a finding kept with at least this Dice against the final segmentation counts as accepted (else edited)
    accept_dice: float = Field(0.9, gt=0, le=1)
    #: alert when the acceptance rate over the last ``alert_window`` judged studies of a model falls below this
    alert_acceptance_floor: float = Field(0.7, ge=0, le=1)
    alert_window: int = Field(30, ge=5)
    #: the baseline period for drift (inputs and agreement): the first N days of verdicts of each model version
    baseline_days: float = Field(30.0, gt=0)
    #: significance level of the drift tests (two-proportion test on acceptance, chi-square on inputs)
    alert_p: float = Field(0.01, gt=0, lt=1)
    #: also look for verdict objects in this destination (a dicom or dicomweb one): C-FIND/QIDO-RS for SEG, SR
    #: and KO series of the studies with results, C-MOVE/WADO-RS of the new ones (None: only what is sent)
    fetch_from: str | None = None
    fetch_minutes: float = Field(60.0, gt=0)
    #: how far back (days since the result) studies are looked at
    fetch_days: float = Field(14.0, gt=0)


class ComputeConfig(_Section):
    """``[compute]``: where inference runs. ``local``: the node's worker threads; ``ray``: model actors on a
    Ray cluster (the node stays the coordinator and the source of truth, see docs/operations.md)."""

    backend: Literal["local", "ray"] = "local"
    #: an existing Ray cluster ("ray://head:10001" or "head:6379"); None: the node starts a local Ray itself
    address: str | None = None
    #: model actors (each runs one job at a time)
    actors: int = Field(2, ge=1, le=256)
    #: GPUs per actor: a fraction shares a GPU between light models' actors, 1 gives an actor a whole GPU,
    #: 0 makes CPU actors
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    #: torch CPU threads inside each actor
    threads_per_actor: int = Field(1, ge=1)
    #: models an actor keeps loaded (least recently used evicted first; also evicted when memory is short)
    max_models_per_actor: int = Field(2, ge=1)
    #: the node's job threads per actor: with 2, one job runs on the actor while the node writes the
    #: previous one's results (ROIs, SEG, SR, preview), so the actor does not wait for the node. A job is
    #: leased only when an actor is free for it: priorities are kept
    jobs_per_actor: int = Field(2, ge=1, le=8)
    namespace: str = "preannot"


class NotifyConfig(_Section):
    """``[notify]``: tell the RIS or a clinician's system when a result of an urgent priority is ready."""

    #: the priorities whose results are announced
    priorities: list[Priority] = Field(default_factory=lambda: [Priority.STAT])
    #: FHIR R4 base URL: a DiagnosticReport (preliminary) is POSTed to {fhir_url}/DiagnosticReport
    fhir_url: str | None = None
    #: environment variable holding a bearer token for the FHIR server
    fhir_token_env: str | None = None
    #: HL7 v2 receiver (MLLP): an ORU^R01 (result status P)
    hl7_host: str | None = None
    hl7_port: int | None = Field(None, ge=1, le=65535)
    sending_application: str = "PREANNOT"
    receiving_application: str = "RIS"
    timeout: float = Field(10.0, gt=0)


class WebConfig(_Section):
    """``[web]``: the HTTP API (health, metrics, status)."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tokens: dict[str, str] = Field(default_factory=dict)
    auth_reads: bool = False

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: dict[str, str]) -> dict[str, str]:
        for name, secret in v.items():
            if len(secret) < 16:
                raise ValueError(f"token {name!r} is {len(secret)} characters; use at least 16 (e.g. openssl rand -hex 24)")
        return v


class FollowUpConfig(_Section):
    """``[followup]``: a study's findings matched to the same patient's prior result of the same model (see
    docs/followup.md)."""

    enabled: bool = True
    #: also look for the prior in this destination (a dicom one: C-FIND of the patient's earlier studies, C-GET of
    #: the node's SR and SEG there and of the series they describe) when the node's own store has none
    fetch_from: str | None = None
    #: how far back a prior is looked for (days)
    max_days: float = Field(1095.0, gt=0)
    #: the alignment's quality floor: normalised cross-correlation of the two series over the body
    min_ncc: float = Field(0.7, gt=0, le=1)
    #: a prior and a follow-up finding are the same when their centres, after alignment, are within
    #: max(min_gate_mm, gate_factor x the smaller equivalent diameter)
    min_gate_mm: float = Field(10.0, gt=0)
    gate_factor: float = Field(0.75, gt=0)
    #: volume change (%) from which a finding is said grown or shrunk (else stable)
    growth_pct: float = Field(25.0, gt=0)


class NodeConfig(BaseSettings):
    """The whole configuration."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_prefix="PREANNOT_",
                                      env_nested_delimiter="__", case_sensitive=False)

    node: NodeSection = Field(default_factory=lambda: NodeSection())
    destinations: list[Destination] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    models: ModelsConfig = Field(default_factory=lambda: ModelsConfig())
    jobs: JobsConfig = Field(default_factory=lambda: JobsConfig())
    delivery: DeliveryConfig = Field(default_factory=lambda: DeliveryConfig())
    outputs: OutputsConfig = Field(default_factory=lambda: OutputsConfig())
    retention: RetentionConfig = Field(default_factory=lambda: RetentionConfig())
    web: WebConfig = Field(default_factory=lambda: WebConfig())
    verdicts: VerdictsConfig = Field(default_factory=lambda: VerdictsConfig())
    notify: NotifyConfig = Field(default_factory=lambda: NotifyConfig())
    compute: ComputeConfig = Field(default_factory=lambda: ComputeConfig())
    followup: FollowUpConfig = Field(default_factory=lambda: FollowUpConfig())
    source: str = Field("<defaults>", exclude=True)

    @model_validator(mode="after")
    def _cross_check(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        reserved = [n for n in names if n.startswith("notify:")]
        if reserved:
            raise ValueError(f"destination names starting with 'notify:' are the notification channels' ({reserved})")
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique; repeated: {sorted(dupes)}")
        rnames = [r.name for r in self.routes]
        rdupes = {n for n in rnames if rnames.count(n) > 1}
        if rdupes:
            raise ValueError(f"route names must be unique; repeated: {sorted(rdupes)}")
        if self.verdicts.fetch_from is not None and self.verdicts.fetch_from not in names:
            raise ValueError(f"[verdicts].fetch_from names {self.verdicts.fetch_from!r}, but the destinations are {names}")
        if self.followup.fetch_from is not None:
            found = next((d for d in self.destinations if d.name == self.followup.fetch_from), None)
            if found is None:
                raise ValueError(f"[followup].fetch_from names {self.followup.fetch_from!r}, but the destinations "
                                 f"are {names}")
            if found.kind != "dicom":
                raise ValueError(f"[followup].fetch_from: destination {found.name!r} is {found.kind}; priors are "
                                 "fetched by C-FIND and C-GET from a dicom destination")
        for r in self.routes:
            for d in r.send_to:
                if d not in names:
                    raise ValueError(f"routes[{r.name}].send_to names {d!r}, but the destinations are {names}")
            if r.expected_count_from is not None:
                src = next((d for d in self.destinations if d.name == r.expected_count_from), None)
                if src is None or src.kind != "dicom":
                    raise ValueError(f"routes[{r.name}].expected_count_from names {r.expected_count_from!r}; it "
                                     "must be a destination of kind dicom (asked by C-FIND)")
        return self

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    def destination(self, name: str) -> Destination:
        """The destination called ``name``; raises ConfigError when there is none."""
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"no destination named {name!r}; configured: {[d.name for d in self.destinations]}")

    def version(self) -> str:
        """A short hash of the effective configuration, recorded with each job."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``os.environ`` by default)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(NodeConfig)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}  # names are case-insensitive (model_config)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


#: path keys resolved against the configuration file's folder when relative: (section, key)
_FILE_RELATIVE = (("node", "data_dir"), ("node", "tls_cert"), ("node", "tls_key"), ("node", "tls_ca"),
                  ("models", "dir"))
_DEST_FILE_KEYS = ("password_file", "token_file", "tls_ca", "tls_cert", "tls_key")


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    """Make the relative paths of a configuration file absolute, against the file's folder."""
    def fix(table: Any, key: str) -> None:
        if isinstance(table, dict) and isinstance(table.get(key), str) and not Path(table[key]).is_absolute():
            table[key] = str((base / table[key]).resolve())

    for section, key in _FILE_RELATIVE:
        fix(tree.get(section), key)
    for dest in tree.get("destinations", []) or []:
        for key in _DEST_FILE_KEYS:
            fix(dest, key)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        val = err.get("input")
        shown = "" if isinstance(val, dict) else f" (found {val!r})"
        lines.append(f"  {loc}: {err['msg']}{shown}")
    return f"invalid configuration in {source}:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, *, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Load and validate the configuration.

    Args:
        path: a TOML file; None uses the built-in defaults (plus the environment).
        env: the environment to read ``PREANNOT_*`` from; defaults to ``os.environ``.
        overrides: a nested dict applied last (used by tests and the demo).

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: the file is missing or unreadable, or a key or value is invalid; the message
            names the key and the value found.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {p} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from exc
        _resolve_paths(tree, p.resolve().parent)
    try:
        from_env = _Environment(os.environ if env is None else env)()
        tree = _deep_merge(tree, from_env)
        if overrides:
            tree = _deep_merge(tree, overrides)
        cfg = NodeConfig.model_validate({**tree, "source": source})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc
    except ValueError as exc:  # pydantic-settings: an environment value that is not valid JSON for its key
        raise ConfigError(f"invalid configuration in the environment: {exc}") from exc
    return cfg
