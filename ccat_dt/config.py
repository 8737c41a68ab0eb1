"""One YAML file describes sites, locations, routes and policies; it is validated at load.

Relative paths (location roots, the OpsDB file) are resolved against the file's directory, so a
data root can be moved as a whole.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ccat_dt.opsdb.models import LocationType, StorageType
from ccat_dt.transports.base import check_control_dir

CONFIG_ENV = "CCAT_DT_CONFIG"
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Site short names may also hold '-' (e.g. `cologne-2`): they appear in Celery queue names
# (`{site}_{location}_{operation}`), run keys (`stage:package:site:...`), Dagster partition
# keys and link tags (`origin->destination`), none of which is split on '-'.
SITE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
# Instrument and module names go into package names (`OBS_INSTRUMENT-MODULE_pNN`): a tar's
# file name at every hop and in `rm`/`mv` over ssh, a Dagster partition key ('|' joins the
# dimensions of a package x site key), OpsDB's 200-character package name. The characters of
# observation names, and at most 32 each, so the longest observation's package name fits.
MODULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


class ConfigError(Exception):
    """The configuration file is unreadable or invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MIB = 2**20
S3_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload


class S3Config(_Strict):
    """An LTA location on S3-compatible object storage (`storage: s3`). The credentials come
    from the environment variables named here, never from this file."""

    endpoint_url: str | None = None  # e.g. https://s3.example.org; None: AWS's own endpoint
    bucket: str
    prefix: str = ""  # objects are <prefix>/<package path>
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    access_key_id_env: str = "CCAT_DT_S3_ACCESS_KEY_ID"
    secret_access_key_env: str = "CCAT_DT_S3_SECRET_ACCESS_KEY"
    session_token_env: str | None = None
    # Per-part integrity S3 itself enforces (CRC32C needs botocore[crt]; SHA256 does not).
    checksum_algorithm: Literal["CRC32C", "CRC32", "SHA256", "SHA1"] = "CRC32C"
    # boto3's own defaults (8 MiB, 10 in flight): measured interleaved against 64 MiB and 8 in
    # flight (docs/benchmarks.md section 11), the larger parts cost the store and the client
    # more CPU for the same bytes and the upload took longer. Left at its default, the part
    # grows for a package that would need more than S3_MAX_PARTS of them (objectstore.upload).
    part_size_mib: int = Field(default=8, ge=5, le=5 * 1024)
    max_concurrency: int = Field(default=10, ge=1, le=64)  # parts in flight at once
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"endpoint_url {value!r} must be http(s)://HOST[:PORT] (no path)")
        return value.rstrip("/") if value else value

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not BUCKET.fullmatch(value) or ".." in value:
            raise ValueError(f"bucket {value!r} is not an S3 bucket name (3-63 characters: "
                             "lower-case letters, digits, '.' and '-')")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        parts = [p for p in value.split("/") if p]
        if value.startswith("/") or any(p in (".", "..") for p in parts) or "//" in value:
            raise ValueError(f"prefix {value!r} must be a relative key prefix like 'ccat/lta' "
                             "(no leading '/', no '.' or '..' parts)")
        return "/".join(parts)

    @field_validator("access_key_id_env", "secret_access_key_env", "session_token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an environment variable name: give the NAME of "
                             "the variable holding the secret, never the secret itself")
        return value

    @property
    def url(self) -> str:
        """The location's root as OpsDB records it: s3://bucket[/prefix]."""
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


class LocationConfig(_Strict):
    name: str
    type: LocationType
    storage: StorageType = StorageType.DISK
    priority: int = 0
    root: str
    s3: S3Config | None = None  # with storage: s3 (root is then derived: s3://bucket/prefix)
    host: str | None = None
    retention_hours: float = Field(default=0.0, ge=0)
    high_watermark_pct: float | None = Field(default=None, gt=0, le=100)
    low_watermark_pct: float | None = Field(default=None, ge=0, lt=100)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("must be lower-case letters, digits and '_' (it names queues)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _object_store(cls, data: object) -> object:
        """An S3 location's root is its bucket and prefix; it has no host and no directory."""
        if not isinstance(data, dict) or data.get("storage") != StorageType.S3.value:
            if isinstance(data, dict) and data.get("s3") is not None:
                raise ValueError("an 's3' section needs storage: s3")
            return data
        s3 = data.get("s3")
        if not isinstance(s3, dict):
            raise ValueError("storage: s3 needs an 's3' section with at least 'bucket' "
                             "(and endpoint_url, prefix, region, credential variable names)")
        if data.get("type") != LocationType.LONG_TERM_ARCHIVE.value:
            raise ValueError("storage: s3 is for long_term_archive locations only")
        if data.get("root") is not None or data.get("host") is not None:
            raise ValueError("an s3 location has no 'root' or 'host': it is s3.bucket/s3.prefix")
        config = S3Config.model_validate(s3)
        return {**data, "s3": config, "root": config.url}

    @property
    def is_object_store(self) -> bool:
        return self.s3 is not None

    @model_validator(mode="after")
    def _remote_root(self) -> LocationConfig:
        if self.host is not None and not self.root.startswith("/"):
            raise ValueError(f"root '{self.root}' must be absolute on remote host {self.host}")
        if self.host is not None and (self.host.startswith("-") or not self.host.strip()):
            raise ValueError(f"host '{self.host}' is not an ssh destination")
        return self

    @model_validator(mode="after")
    def _watermarks(self) -> LocationConfig:
        high, low = self.high_watermark_pct, self.low_watermark_pct
        if (high is None) != (low is None):
            raise ValueError("set both high_watermark_pct and low_watermark_pct, or neither")
        if high is not None and low is not None and low >= high:
            raise ValueError(f"low_watermark_pct ({low}) must be below high_watermark_pct ({high})")
        return self


class SiteConfig(_Strict):
    short_name: str
    name: str
    description: str = ""
    locations: list[LocationConfig]

    @field_validator("short_name")
    @classmethod
    def _short_name(cls, value: str) -> str:
        if not SITE_NAME.fullmatch(value) or value.endswith("-"):
            raise ValueError(f"{value!r}: use lower-case letters, digits, '_' and '-', starting "
                             "with a letter and not ending with '-' (the name goes into Celery "
                             "queue names, run keys, Dagster partition keys and paths)")
        return value

    @model_validator(mode="after")
    def _unique_locations(self) -> SiteConfig:
        names = [location.name for location in self.locations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate location name(s) {', '.join(duplicates)}")
        return self

    def locations_of(self, kind: LocationType) -> list[LocationConfig]:
        return sorted((loc for loc in self.locations if loc.type == kind),
                      key=lambda loc: (-loc.priority, loc.name))

    @property
    def is_archive(self) -> bool:
        return bool(self.locations_of(LocationType.LONG_TERM_ARCHIVE))


class BbcpConfig(_Strict):
    """bbcp tuning for a long, high-latency link (see docs/transports.md)."""

    streams: int = Field(default=8, ge=1, le=64)
    window: str | None = "8M"
    progress_interval_s: int = Field(default=10, ge=1)
    # No bytes moved for this long (as bbcp's progress lines show): the link stalled, bbcp is
    # stopped and the attempt fails retryably (rsync's --timeout, for bbcp). 0: never.
    stall_timeout_s: int = Field(default=600, ge=0)
    rate_limit: str | None = None
    port_range: str | None = None
    remote_bbcp: str = "bbcp"

    @model_validator(mode="after")
    def _stall_seen(self) -> BbcpConfig:
        """The stall is seen in progress lines: with fewer than two in it, a healthy link
        would be taken for a stalled one."""
        if 0 < self.stall_timeout_s < 2 * self.progress_interval_s:
            raise ValueError(f"stall_timeout_s ({self.stall_timeout_s}) must be at least twice "
                             f"progress_interval_s ({self.progress_interval_s}), or 0")
        return self


class RouteConfig(_Strict):
    origin: str
    destination: str
    transport: Literal["local", "rsync", "bbcp"] = "local"
    cost: int = Field(default=1, ge=0)
    max_concurrent: int = Field(default=2, ge=1)  # transfers at once on this link
    batch_bytes: int = Field(default=0, ge=0)  # move several waiting packages per session
    bandwidth_limit_kbps: int | None = Field(default=None, gt=0)  # rsync --bwlimit
    bbcp: BbcpConfig = BbcpConfig()

    @property
    def link(self) -> str:
        return f"{self.origin}->{self.destination}"


class MetricsConfig(_Strict):
    """InfluxDB v2 write API (or VictoriaMetrics); off when no url. The token comes from the
    environment variable `token_env`, never from this file."""

    url: str | None = None
    org: str = "ccat"
    bucket: str = "ccat_dt"
    token_env: str = "CCAT_DT_INFLUX_TOKEN"
    interval_s: int = Field(default=60, ge=5)  # how often service-level figures are written
    warn_below_hours: float = Field(default=24.0, gt=0)  # buffer forecast threshold


class ExecutionConfig(_Strict):
    """Where steps run. Without a broker: in the process that launches the run (embedded
    default). With one: dagster-celery, each step on the queue of the site whose data it
    touches (see ccat_dt/queues.py); `$CCAT_DT_CELERY_BROKER` overrides (it holds secrets)."""

    celery_broker: str | None = None
    celery_backend: str | None = None


class SshConfig(_Strict):
    """How every remote host is reached (one key and known_hosts for the deployment)."""

    port: int = Field(default=22, gt=0, lt=65536)
    identity_file: str | None = None
    known_hosts_file: str | None = None
    connect_timeout_s: int = Field(default=20, gt=0)
    # Connection sharing (ssh ControlMaster): one connection per host, kept open this long after
    # its last use, carries every ssh/rsync/bbcp command instead of a handshake each. 0: off.
    control_persist_s: int = Field(default=300, ge=0)
    # Directory of the control sockets (absolute, at most 40 characters, no spaces); default
    # $XDG_RUNTIME_DIR/ccat-dt-ssh, else /tmp/ccat-dt-ssh-UID. Created with mode 0700; when it
    # cannot be, commands connect on their own.
    control_dir: str | None = None

    @field_validator("control_dir")
    @classmethod
    def _control_dir(cls, value: str | None) -> str | None:
        return None if value is None else check_control_dir(value)


class PolicyConfig(_Strict):
    package_max_bytes: int = Field(default=50 * 10**9, gt=0)
    required_lta_copies: int | None = Field(default=None, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    purge_budget_bytes: int = Field(default=10 * 10**12, gt=0)  # per purge cycle
    scrub_bytes_per_day: int = Field(default=10**12, ge=0)  # LTA bytes re-read per day
    # Finished packages leave Dagster's partitions after this many days (OpsDB keeps them).
    retire_partitions_after_days: float = Field(default=30.0, ge=0)
    # `ccat-dt audit --repair` refuses at a location where more copies than this share look
    # lost or changed: that is a broken mount, not lost data.
    audit_max_broken_share: float = Field(default=0.1, gt=0, le=1)
    # A deletion relies only on LTA copies looked at on their storage just before it: present,
    # regular, recorded size and identity, and hashed within this many hours (else hashed now).
    deletion_recheck_hours: float = Field(default=24.0, ge=0)
    # Also re-hash every source file just before deleting it (otherwise only when its size,
    # inode or mtime differ from what was recorded at filing).
    rehash_sources_before_deletion: bool = False
    # Work whose run failed (or whose process died) is requested again by the sensors after a
    # back-off: first_s, doubling per failed attempt up to max_hours, for retry_horizon_hours
    # after its first failure; then it is escalated (a notification; `ccat-dt retry` resumes).
    retry_backoff_first_s: float = Field(default=60.0, gt=0)
    retry_backoff_max_hours: float = Field(default=6.0, gt=0)
    retry_horizon_hours: float = Field(default=72.0, gt=0)
    # Work OpsDB shows as due that no run has done for this long (none in flight, none
    # failing) is requested by the re-attempt sensor's sweep: a run the sensors never asked
    # for because their cursors and run keys, kept in the Dagster instance, were past it (an
    # OpsDB restored from an older backup).
    unattended_after_s: float = Field(default=3600.0, gt=0)
    # OpsDB rows a sensor reads per tick (it continues from its cursor at the next tick).
    sensor_page_rows: int = Field(default=500, ge=1)
    # A location that fails as a whole (unreachable, root unmarked, disk full, permission
    # denied) is passed over for the next one of its kind by priority for this long.
    location_unhealthy_minutes: float = Field(default=30.0, gt=0)
    # An archive site whose buffers have failed without a success for this long is replaced
    # as primary site by another archive site for packages not yet sent (ccat_dt/failover.py).
    site_failover_hours: float = Field(default=24.0, gt=0)


class ServiceConfig(_Strict):
    """The filing service (`ccat-dt serve`) at a site: where its journal lives and what it
    accepts. Relative paths resolve against the configuration file's directory."""

    site: str | None = None  # default: the observatory
    journal: str = "service/filing-journal.sqlite"
    max_body_bytes: int = Field(default=16 * 2**20, gt=0)  # larger requests get 413
    public_reads: bool = False  # GET endpoints and /health without a token (monitoring)
    token_refresh_s: float = Field(default=30.0, gt=0)  # how soon a revocation takes effect
    opsdb_connect_timeout_s: int = Field(default=5, ge=1)




SMTPS_PORT = 465  # implicit TLS (RFC 8314): TLS from the first byte, no greeting before it


class SmtpConfig(_Strict):
    """Mail for notifications; the password (if any) comes from `password_env`.

    `tls` says how the relay is spoken to: `none` (plain SMTP), `starttls` (plain, then
    STARTTLS before anything else: usually port 587 or 25) or `implicit` (TLS from the first
    byte, SMTPS: port 465). Either TLS mode verifies the server's certificate and host name
    against the system's CAs, and those of `ca_file` (PEM; a site-internal CA; relative to this
    file's directory) if set, before the login. Left out, it follows the port (465: implicit,
    else none), and the port follows it (implicit: 465, else 25). `starttls: true`, the setting
    before `tls`, is read as `tls: starttls`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    host: str
    port: int = Field(default=25, gt=0, lt=65536)
    from_: str = Field(default="ccat-dt@localhost", alias="from")
    to: list[str] = Field(min_length=1)
    tls: Literal["none", "starttls", "implicit"] = "none"
    ca_file: str | None = None
    username: str | None = None
    password_env: str = "CCAT_DT_SMTP_PASSWORD"
    timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _tls_mode(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "starttls" in data:  # as configurations said it before `tls`
            starttls = data.pop("starttls")
            if not isinstance(starttls, bool):
                raise ValueError("starttls must be true or false (or say `tls: starttls`)")
            if starttls and data.get("tls") not in (None, "starttls"):
                raise ValueError(f"starttls: true and tls: {data['tls']} say two things; keep "
                                 "only `tls` (none, starttls or implicit)")
            if starttls:
                data["tls"] = "starttls"
        if data.get("tls") is None:
            data["tls"] = "implicit" if data.get("port") in (SMTPS_PORT, str(SMTPS_PORT)) \
                else "none"
        if data.get("port") is None:
            data["port"] = SMTPS_PORT if data["tls"] == "implicit" else 25
        return data

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+|\[?[0-9A-Fa-f:.]+\]?", value) or (
                value.count(":") == 1):
            raise ValueError(f"host {value!r} is not a host name or address (the port goes "
                             "in `port`, no scheme)")
        return value.strip("[]")

    @field_validator("from_", "to")
    @classmethod
    def _addresses(cls, value: str | list[str]) -> str | list[str]:
        for address in [value] if isinstance(value, str) else value:
            _mail_address(address)
        return value

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> SmtpConfig:
        """A login without TLS sends the password as it is over the network (AUTH PLAIN or
        LOGIN: base64), to anybody on the way; only a relay on this host is spared that."""
        modes = ("set `tls: starttls` (the server offers STARTTLS, usually on port 587) or "
                 "`tls: implicit` (SMTPS, usually port 465)")
        if self.username and self.tls == "none" and not _loopback(self.host):
            raise ValueError(
                f"username is set but tls is none: the password would go to {self.host} in "
                f"clear text; {modes}, or drop `username` if the relay takes mail without a "
                "login")
        if self.ca_file and self.tls == "none":
            raise ValueError(f"ca_file is set but tls is none: without TLS no certificate is "
                             f"looked at; {modes}")
        return self


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mail_address(value: str) -> None:
    """One address, bare or with a name ("Ops <ops@example.org>"): a server refuses anything
    else for good, so it is refused here, before anything is told to nobody."""
    from email.utils import getaddresses

    parsed = getaddresses([value])
    spec = parsed[0][1] if len(parsed) == 1 else ""
    local, _, domain = spec.rpartition("@")
    domain_ok = re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", domain)
    if (not local or not domain_ok or spec not in value or any(c.isspace() for c in local)
            or value.count("<") != value.count(">")):
        raise ValueError(f"{value!r} is not one e-mail address (like ops@example.org or "
                         "'Operations <ops@example.org>')")


class WebhookConfig(_Strict):
    """A JSON POST of {"text": ...} (Slack, Mattermost and most chat tools accept it)."""

    url: str
    timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError("url must be http(s)://HOST[:PORT]/PATH")  # not echoed: a secret
        return value


class NotificationsConfig(_Strict):
    """Who is told when a person is needed (see ccat_dt/notify.py); off when neither is set."""

    smtp: SmtpConfig | None = None
    webhook: WebhookConfig | None = None
    remind_after_hours: float = Field(default=24.0, gt=0)
    subject_prefix: str = "[ccat-dt]"


class InstrumentConfig(_Strict):
    name: str
    modules: list[str] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _module_name(value)

    @field_validator("modules")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        for name in value:
            _module_name(name)
        return value

    @model_validator(mode="after")
    def _unique_modules(self) -> InstrumentConfig:
        twice = sorted({m for m in self.modules if self.modules.count(m) > 1})
        if twice:
            raise ValueError(f"instrument {self.name}: module(s) listed twice: {', '.join(twice)}")
        return self


def _module_name(value: str) -> str:
    if not MODULE_NAME.fullmatch(value):
        raise ValueError(f"{value!r}: use 1-32 letters, digits, '_', '.' and '-', starting with "
                         "a letter or digit (the name goes into package names: file names, "
                         "partition keys, paths on other hosts)")
    return value


class Settings(_Strict):
    """The validated configuration of one deployment."""

    opsdb_url: str = "sqlite:///opsdb.sqlite"
    observatory: str
    sites: list[SiteConfig] = Field(min_length=1)
    routes: list[RouteConfig] = Field(default_factory=list)
    policies: PolicyConfig = PolicyConfig()
    instruments: list[InstrumentConfig] = Field(min_length=1)
    ssh: SshConfig = SshConfig()
    metrics: MetricsConfig = MetricsConfig()
    execution: ExecutionConfig = ExecutionConfig()
    service: ServiceConfig = ServiceConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    log_dir: str = "logs"  # per-transfer command output, referenced from OpsDB

    @model_validator(mode="after")
    def _topology(self) -> Settings:
        names = [site.short_name for site in self.sites]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate site short_name {', '.join(twice)}")
        instruments = [i.name for i in self.instruments]
        if len(set(instruments)) != len(instruments):
            twice = sorted({n for n in instruments if instruments.count(n) > 1})
            raise ValueError(f"instrument(s) listed twice: {', '.join(twice)} (list each once, "
                             "with all its modules)")
        observatory = self.site(self.observatory)
        if not observatory.locations_of(LocationType.SOURCE):
            raise ValueError(f"observatory site '{self.observatory}' has no source location")
        if not observatory.locations_of(LocationType.BUFFER):
            raise ValueError(f"observatory site '{self.observatory}' has no buffer location")
        archives = self.archive_sites
        if not archives:
            raise ValueError("no site has a long_term_archive location")
        for site in archives:
            if not site.locations_of(LocationType.BUFFER):
                raise ValueError(f"archive site '{site.short_name}' has no buffer location")
        for route in self.routes:
            for end in (route.origin, route.destination):
                if end not in names:
                    raise ValueError(f"route {route.origin}->{route.destination}: "
                                     f"unknown site '{end}'")
        needed = [(self.observatory, a.short_name) for a in archives]
        needed += [(a.short_name, b.short_name) for a in archives for b in archives if a != b]
        missing = [f"{o}->{d}" for o, d in needed if self.route(o, d) is None]
        if missing:
            raise ValueError(f"routes missing for {', '.join(missing)}; every archive site "
                             "needs a route from the observatory and from every other archive")
        roots: dict[tuple[str | None, str], str] = {}
        for site in self.sites:
            for loc in site.locations:
                key = (loc.host, posixpath.normpath(loc.root))
                for (host, root), label in roots.items():
                    if host == key[0] and (root == key[1] or key[1].startswith(root + "/")
                                           or root.startswith(key[1] + "/")):
                        raise ValueError(
                            f"locations {label} and {site.short_name}/{loc.name} overlap "
                            f"(root '{loc.root}'): one disk area would count as two copies")
                roots[key] = f"{site.short_name}/{loc.name}"
        for route in self.routes:
            hosts = {loc.host for end in (route.origin, route.destination)
                     for loc in self.site(end).locations}
            if route.transport == "local" and hosts != {None}:
                raise ValueError(f"route {route.link}: transport 'local' cannot reach remote "
                                 "locations (a location has a host); use rsync or bbcp")
        for site in self.sites:
            for loc in site.locations:
                if loc.s3 is not None and "part_size_mib" in loc.s3.model_fields_set \
                        and self.policies.package_max_bytes > (
                            loc.s3.part_size_mib * MIB * S3_MAX_PARTS):
                    raise ValueError(
                        f"{site.short_name}/{loc.name}: s3.part_size_mib={loc.s3.part_size_mib} "
                        f"cannot carry a package of policies.package_max_bytes="
                        f"{self.policies.package_max_bytes} in {S3_MAX_PARTS} parts; raise it")
        required = self.policies.required_lta_copies
        if required is not None and required > len(archives):
            raise ValueError(f"policies.required_lta_copies={required} but only "
                             f"{len(archives)} archive site(s) exist")
        return self

    def site(self, short_name: str) -> SiteConfig:
        for site in self.sites:
            if site.short_name == short_name:
                return site
        raise ValueError(f"unknown site '{short_name}'")

    def route(self, origin: str, destination: str) -> RouteConfig | None:
        return next((r for r in self.routes
                     if (r.origin, r.destination) == (origin, destination)), None)

    @property
    def archive_sites(self) -> list[SiteConfig]:
        return [site for site in self.sites if site.is_archive]

    @property
    def required_lta_copies(self) -> int:
        return self.policies.required_lta_copies or len(self.archive_sites)


@dataclass(frozen=True)
class Config:
    """Settings plus where they came from (relative paths resolve against `directory`)."""

    settings: Settings
    path: Path

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def opsdb_url(self) -> str:
        url = os.environ.get("CCAT_DT_OPSDB_URL") or self.settings.opsdb_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            return prefix + str(self.directory / url[len(prefix):])
        return url

    @property
    def celery_broker(self) -> str | None:
        return os.environ.get("CCAT_DT_CELERY_BROKER") or self.settings.execution.celery_broker

    @property
    def celery_backend(self) -> str | None:
        return (os.environ.get("CCAT_DT_CELERY_BACKEND") or self.settings.execution.celery_backend
                or self.celery_broker)

    @property
    def metrics_url(self) -> str | None:
        return os.environ.get("CCAT_DT_METRICS_URL") or self.settings.metrics.url

    @property
    def log_dir(self) -> Path:
        return self.resolve_root(self.settings.log_dir)

    def resolve_root(self, root: str) -> Path:
        path = Path(root)
        return path if path.is_absolute() else self.directory / path

    def location(self, site: str, location: str) -> LocationConfig:
        for loc in self.settings.site(site).locations:
            if loc.name == location:
                return loc
        raise ValueError(f"unknown location {site}/{location}")

    def location_root(self, location: LocationConfig) -> str:
        """What OpsDB records as the location's root: a resolved directory, or s3://..."""
        return location.root if location.is_object_store else str(self.resolve_root(location.root))

    def retention(self, site: str, location: str) -> timedelta:
        return timedelta(hours=self.location(site, location).retention_hours)


def load_config(path: Path | str | None = None) -> Config:
    """Load and validate; every error names the file and the offending key."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        if not env:
            raise ConfigError(f"no configuration file given and ${CONFIG_ENV} is not set; "
                              "run `ccat-dt init DIR` and pass --config DIR/ccat-dt.yaml")
        path = env
    path = Path(path).expanduser().absolute()
    try:
        raw = _parse(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save "
                          "it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid configuration:\n" + _describe(exc)) from None
    config = Config(settings=settings, path=path)
    _refuse_shared_storage(config)
    _check_ca_file(config)
    return config


def _parse(text: str) -> object:
    """The YAML document, read by libyaml's parser where PyYAML has it (a tenth of the time of
    the pure-Python one: 0.003 s of every command); a document it rejects is read again by the
    pure-Python parser, whose error shows the offending line."""
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return yaml.safe_load(text)


def _check_ca_file(config: Config) -> None:
    """The mail relay's CA, read now: a path mistyped would otherwise show only at the first
    problem, as a relay whose certificate is not trusted."""
    import ssl

    smtp = config.settings.notifications.smtp
    if smtp is None or smtp.ca_file is None:
        return
    path = config.resolve_root(smtp.ca_file)
    where = f"{config.path}: notifications.smtp.ca_file: {path}"
    what = "give the PEM file of the CA that signed the mail relay's certificate"
    if not path.is_file():
        raise ConfigError(f"{where}: {'not a file' if path.exists() else 'no such file'} "
                          f"({what}; a relative path is relative to {config.directory})")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except OSError as exc:  # ssl.SSLError included: no certificate in it
        raise ConfigError(f"{where}: not a readable PEM certificate file "
                          f"({getattr(exc, 'reason', None) or exc.strerror or exc}); {what}") \
            from None


def _refuse_shared_storage(config: Config) -> None:
    """Two local roots on one directory (a symlink, a bind mount) would count one disk as two
    copies: compare them as the storage sees them, resolved and by device and inode."""
    roots: list[tuple[str, Path, tuple[int, int] | None]] = []
    for site in config.settings.sites:
        for loc in site.locations:
            if loc.host is not None or loc.is_object_store:
                continue
            root = config.resolve_root(loc.root)
            try:
                info = root.stat()
                identity: tuple[int, int] | None = (info.st_dev, info.st_ino)
            except OSError:
                identity = None  # not there yet: `ccat-dt init` creates it
            resolved = Path(os.path.realpath(root))
            label = f"{site.short_name}/{loc.name}"
            for other, other_resolved, other_identity in roots:
                if (resolved.is_relative_to(other_resolved)
                        or other_resolved.is_relative_to(resolved)
                        or (identity is not None and identity == other_identity)):
                    raise ConfigError(
                        f"{config.path}: sites: locations {other} and {label} are on the same "
                        f"directory on the storage ({other_resolved} and {resolved} after "
                        "resolving symlinks): one disk would count as two copies; give each "
                        "location its own directory")
            roots.append((label, resolved, identity))


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"])
        lines.append(f"  {key.lstrip('.') or '(top level)'}: {error['msg']}")
    return "\n".join(lines)
