"""The Operations Database: where every byte is, what happened to it, and why.

Names follow the original ops-db (DOMAIN.md §2). Only portable SQL types are used so the same
models run on SQLite (embedded default) and PostgreSQL (production).

No `from __future__ import annotations` here: SQLAlchemy would eval() the ~300 annotations of
the mapped classes one string at a time (0.008 s of every `ccat-dt` command); as objects,
Python evaluates them with the class bodies. A class named before its definition is quoted.
"""

import enum
import os
import socket
import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def worker_name() -> str:
    """Who ran an operation: the site worker's name when one is set, else the host name."""
    return os.environ.get("CCAT_DT_WORKER") or socket.gethostname()


class LocationType(enum.StrEnum):
    SOURCE = "source"
    BUFFER = "buffer"
    LONG_TERM_ARCHIVE = "long_term_archive"
    PROCESSING = "processing"


class StorageType(enum.StrEnum):
    DISK = "disk"
    S3 = "s3"
    TAPE = "tape"


class ObservationStatus(enum.StrEnum):
    OPEN = "open"
    FINISHED = "finished"


class PackageState(enum.StrEnum):
    PLANNED = "planned"  # files assigned, tar not yet built
    WAITING = "waiting"  # built, only at the observatory buffer
    TRANSFERRING = "transferring"  # left the observatory, not yet in enough archives
    ARCHIVED = "archived"  # in the required number of verified LTA copies
    FAILED = "failed"
    LOST = "lost"  # some filed byte has no good copy anywhere: a person must act


class CopyStatus(enum.StrEnum):
    PRESENT = "present"
    STAGED = "staged"
    CORRUPT = "corrupt"  # an integrity check found the bytes differ from the checksum
    DELETION_IN_PROGRESS = "deletion_in_progress"
    DELETED = "deleted"
    DELETION_FAILED = "deletion_failed"


class StagingState(enum.StrEnum):
    ACTIVE = "active"  # files wanted at the processing location
    RELEASED = "released"  # the scientist is done; staged files may go
    FAILED = "failed"


class OperationType(enum.StrEnum):
    PACKAGING = "packaging"
    TRANSFER = "transfer"
    ARCHIVE = "archive"
    VERIFICATION = "verification"
    STAGING = "staging"
    DELETION = "deletion"


class OperationStatus(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


def _enum(kind: type[enum.StrEnum]) -> Enum:
    # Stored as plain strings (no native/CHECK enum) so adding a value needs no table rewrite.
    return Enum(kind, native_enum=False, create_constraint=False, length=32,
                values_callable=lambda e: [m.value for m in e])


def _partial(name: str, *columns: str, where: str) -> Index:
    """An index over the rows matching `where` (SQL both databases read), as its migration
    creates it. Declared with its columns only, the WHERE kept in `info`: a `sqlite_where` or
    `postgresql_where` argument makes SQLAlchemy import that dialect with these models (the
    PostgreSQL one: 0.02 s of every command on a SQLite OpsDB). Nothing creates tables from
    the models (the migrations do), and Alembic's autogenerate compares no WHERE."""
    return Index(name, *columns, info={"where": where})


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Site(Base):
    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(primary_key=True)
    short_name: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(200), default="")
    locations: Mapped[list["DataLocation"]] = relationship(back_populates="site")


class DataLocation(Base):
    __tablename__ = "data_locations"
    __table_args__ = (UniqueConstraint("site_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    name: Mapped[str] = mapped_column(String(64))
    location_type: Mapped[LocationType] = mapped_column(_enum(LocationType))
    storage_type: Mapped[StorageType] = mapped_column(_enum(StorageType))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    root: Mapped[str] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Location-level health (ccat_dt/health.py): the first failure of the location itself
    # (unreachable, unmarked root, disk full, permission denied) since its last success, and
    # until when routing passes it over for the next location by priority.
    failing_since: Mapped[datetime | None] = mapped_column(nullable=True)
    unhealthy_until: Mapped[datetime | None] = mapped_column(nullable=True)
    unhealthy_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    site: Mapped[Site] = relationship(back_populates="locations")

    @property
    def label(self) -> str:
        return f"{self.site.short_name}/{self.name}"


class InstrumentModule(Base):
    __tablename__ = "instrument_modules"
    __table_args__ = (UniqueConstraint("instrument", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    instrument: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))

    @property
    def label(self) -> str:
        return f"{self.instrument}/{self.name}"


class ExecutedObsUnit(Base):
    """One observation actually carried out; instruments file raw files against it."""

    __tablename__ = "executed_obs_units"
    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[ObservationStatus] = mapped_column(
        _enum(ObservationStatus), default=ObservationStatus.OPEN)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class RawDataPackage(Base):
    """A tar of the raw files of one observation x module (split when over the size limit)."""

    __tablename__ = "raw_data_packages"
    __table_args__ = (UniqueConstraint("observation_id", "module_id", "part"),
                      # the service level's unsafe packages, oldest first (migration 0014)
                      Index("ix_raw_data_packages_verified_lta_sites", "verified_lta_sites",
                            "created_at"),
                      # the few LOST packages, which `status` lists first (migration 0014)
                      _partial("ix_raw_data_packages_lost", "id", where="state = 'lost'"))
    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # the Dagster partition key
    observation_id: Mapped[int] = mapped_column(ForeignKey("executed_obs_units.id"))
    module_id: Mapped[int] = mapped_column(ForeignKey("instrument_modules.id"))
    part: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[PackageState] = mapped_column(_enum(PackageState), default=PackageState.PLANNED)
    primary_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checksum_algorithm: Mapped[str | None] = mapped_column(String(16), nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(64), nullable=True)
    adler32: Mapped[str | None] = mapped_column(String(8), nullable=True)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    built_at: Mapped[datetime | None] = mapped_column(nullable=True)
    archived_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Why the primary site is not the one first assigned (an archive site down past the
    # failover horizon before the package left the observatory); None when never changed.
    primary_site_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Distinct sites holding a verified LTA copy: kept by the database's triggers
    # (ccat_dt/opsdb/archived_sites.py), never written by the code; read in queries only.
    verified_lta_sites: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    observation: Mapped[ExecutedObsUnit] = relationship()
    module: Mapped[InstrumentModule] = relationship()
    primary_site: Mapped[Site] = relationship()
    files: Mapped[list["RawDataFile"]] = relationship(back_populates="package",
                                                      order_by="RawDataFile.relative_path")
    copies: Mapped[list["PackageCopy"]] = relationship(back_populates="package",
                                                       order_by="PackageCopy.id")


class RawDataFile(Base):
    __tablename__ = "raw_data_files"
    __table_args__ = (UniqueConstraint("source_location_id", "relative_path"),
                      Index("ix_raw_data_files_filed_at", "filed_at"))
    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    source_location_id: Mapped[int] = mapped_column(ForeignKey("data_locations.id"))
    relative_path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    checksum_algorithm: Mapped[str] = mapped_column(String(16))
    checksum: Mapped[str] = mapped_column(String(64))
    observation_id: Mapped[int] = mapped_column(ForeignKey("executed_obs_units.id"))
    module_id: Mapped[int] = mapped_column(ForeignKey("instrument_modules.id"))
    package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_packages.id"),
                                                   nullable=True, index=True)
    filed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Taken out of its package by an operator (`ccat-dt exclude`): never packaged again, never
    # deleted by the purge; who, when, why and from which package.
    excluded_at: Mapped[datetime | None] = mapped_column(nullable=True)
    excluded_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    excluded_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    excluded_from: Mapped[str | None] = mapped_column(String(200), nullable=True)

    source_location: Mapped[DataLocation] = relationship()
    observation: Mapped[ExecutedObsUnit] = relationship()
    module: Mapped[InstrumentModule] = relationship()
    package: Mapped[RawDataPackage | None] = relationship(back_populates="files")
    copies: Mapped[list["RawDataFileCopy"]] = relationship(back_populates="raw_data_file")


class PhysicalCopy(Base):
    """One copy of a file or package at one location. Nothing is deleted without these."""

    __tablename__ = "physical_copies"
    # The purge cycle starts from the copies still present outside the archives; `status`
    # counts copies per location and status, sums the live ones' bytes and forecasts buffers
    # from the arrivals and departures of the last hours (migration 0008).
    __table_args__ = (
        Index("ix_physical_copies_location_status", "location_id", "status"),
        _partial("ix_physical_copies_live", "location_id", "size",
                 where="status IN ('present', 'staged')"),
        Index("ix_physical_copies_created_at", "created_at"),
        Index("ix_physical_copies_deleted_at", "deleted_at"),
        # the few corrupt copies, which `status` and the sensors start from, and the verified
        # package copies, by package, which the service level counts sites of (migration 0012)
        _partial("ix_physical_copies_corrupt", "package_id", where="status = 'corrupt'"),
        _partial("ix_physical_copies_verified", "package_id", "location_id",
                 where="status = 'present' AND verified_at >= created_at "
                 "AND package_id IS NOT NULL"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    location_id: Mapped[int] = mapped_column(ForeignKey("data_locations.id"))
    relative_path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[CopyStatus] = mapped_column(_enum(CopyStatus), default=CopyStatus.PRESENT)
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    verified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # What the file was when recorded (st_ino, st_mtime_ns): a deletion that finds either
    # changed re-hashes the file before it trusts it is still the one filed.
    inode: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_packages.id"),
                                                   nullable=True, index=True)
    raw_data_file_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_files.id"),
                                                         nullable=True, index=True)
    staging_request_id: Mapped[int | None] = mapped_column(ForeignKey("staging_requests.id"),
                                                           nullable=True, index=True)
    location: Mapped[DataLocation] = relationship()

    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "copy"}

    @property
    def is_verified(self) -> bool:
        """Present and checked by checksum after it was written."""
        return (self.status == CopyStatus.PRESENT and self.verified_at is not None
                and _aware(self.verified_at) >= _aware(self.created_at))


class PackageCopy(PhysicalCopy):
    package: Mapped[RawDataPackage] = relationship(back_populates="copies")
    __mapper_args__ = {"polymorphic_identity": "package"}


class RawDataFileCopy(PhysicalCopy):
    raw_data_file: Mapped[RawDataFile] = relationship(back_populates="copies")
    __mapper_args__ = {"polymorphic_identity": "raw_file"}


# Rows and bytes per (subject, location, status) in slots, kept by database triggers
# (ccat_dt/opsdb/totals.py): what `ccat-dt status` reads instead of counting the tables.
totals = Table(
    "totals", Base.metadata,
    Column("subject", String(16), primary_key=True),  # copy | raw_file | package | operation
    Column("location_id", Integer, primary_key=True),  # 0: not per location
    Column("status", String(64), primary_key=True),
    Column("slot", Integer, primary_key=True),  # PostgreSQL: the writer's pid modulo 64
    Column("items", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
)


staging_request_packages = Table(
    "staging_request_packages", Base.metadata,
    Column("staging_request_id", ForeignKey("staging_requests.id"), primary_key=True),
    Column("package_id", ForeignKey("raw_data_packages.id"), primary_key=True),
)


class StagingRequest(Base):
    """Packages a scientist wants unpacked at a PROCESSING location until released/expired."""

    __tablename__ = "staging_requests"
    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # the Dagster partition key
    location_id: Mapped[int] = mapped_column(ForeignKey("data_locations.id"))
    state: Mapped[StagingState] = mapped_column(_enum(StagingState), default=StagingState.ACTIVE)
    selection: Mapped[dict[str, Any]] = mapped_column()
    requested_by: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    released_at: Mapped[datetime | None] = mapped_column(nullable=True)
    staged_at: Mapped[datetime | None] = mapped_column(nullable=True)

    location: Mapped[DataLocation] = relationship()
    packages: Mapped[list[RawDataPackage]] = relationship(secondary=staging_request_packages,
                                                          order_by="RawDataPackage.id")

    def is_active(self, now: datetime) -> bool:
        return self.state == StagingState.ACTIVE and _aware(self.expires_at) > _aware(now)


class Operation(Base):
    """Packaging, transfer, archive, verification and deletion, with their outcome."""

    __tablename__ = "operations"
    id: Mapped[int] = mapped_column(primary_key=True)
    operation_type: Mapped[OperationType] = mapped_column(_enum(OperationType))
    status: Mapped[OperationStatus] = mapped_column(_enum(OperationStatus),
                                                    default=OperationStatus.IN_PROGRESS)
    package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_packages.id"),
                                                   nullable=True, index=True)
    copy_id: Mapped[int | None] = mapped_column(ForeignKey("physical_copies.id"), nullable=True)
    source_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_locations.id"),
                                                           nullable=True)
    destination_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_locations.id"),
                                                                nullable=True)
    transport: Mapped[str | None] = mapped_column(String(32), nullable=True)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    evidence: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True, default=worker_name)
    log_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # full command output
    # A transfer or archive in flight claims its (package, destination): the process holding
    # the claim and until when it holds it unless it renews it (ccat_dt/claims.py, 0013).
    owner_host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    owner_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # `status` reads the last hour's transfers by it (migration 0012)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)

    package: Mapped[RawDataPackage | None] = relationship()
    copy: Mapped[PhysicalCopy | None] = relationship()


def staging_reason(request: str) -> str:
    """A staging operation's `reason`: the request it staged for, so that `why` of a request
    reads its own operations, not another request's of the same package and place."""
    return f"for staging request {request}"


def _aware(moment: datetime) -> datetime:
    # SQLite returns naive datetimes even for timezone-aware columns; all we store is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class ApiToken(Base):
    """A filing-service token: only its sha256 is stored; scoped to one site and, when
    `instruments` is not empty, to those instruments' modules."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    site: Mapped[str] = mapped_column(String(64))
    instruments: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ApiRequest(Base):
    """A filing-service request applied to OpsDB, written in the same transaction as its
    effect: a journal replayed after a crash finds it and does not apply the request twice."""

    __tablename__ = "api_requests"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    observation: Mapped[str] = mapped_column(String(128))
    token_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    accepted_at: Mapped[datetime] = mapped_column()
    applied_at: Mapped[datetime] = mapped_column(default=utcnow)


class FilingDeadLetter(Base):
    """A filing-service request that can never be applied, as the site's journal holds it (the
    journal is the truth; the service mirrors it here so the notifications can tell a person).
    The row goes when the request is retried successfully or discarded."""

    __tablename__ = "filing_dead_letters"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column()
    kind: Mapped[str] = mapped_column(String(16))
    observation: Mapped[str] = mapped_column(String(128))
    error: Mapped[str] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Reattempt(Base):
    """Work (one stage x partition) whose last run failed, died or was canceled by an
    operator, waiting for its next automatic attempt: written by the re-attempt sensor, read
    by `why`, `status` and the notifications. `attempts` counts the failed runs only (an
    operator's cancel is none: 0 when its runs were all canceled; `stopped_*` tell of runs
    stopped again and again with no person's doing). The row goes at the
    sensor's next tick once the work is done; until then readers leave it out when OpsDB
    shows the work done (reattempt.unsettled), whatever did it."""

    __tablename__ = "reattempts"
    __table_args__ = (UniqueConstraint("stage", "partition"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    stage: Mapped[str] = mapped_column(String(64))  # a ccat_dt.stages.Stage
    partition: Mapped[str] = mapped_column(String(300))
    package: Mapped[str] = mapped_column(String(200), index=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed runs so far
    first_failed_at: Mapped[datetime] = mapped_column()
    last_failed_at: Mapped[datetime] = mapped_column()
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    escalated_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The newest runs in a row stopped with no person's doing (a drive under `timeout`, a
    # shutdown), the first's end, and when a person was told (past the horizon): the work is
    # still re-attempted automatically (reattempt._stopped).
    stopped_runs: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    stopped_since: Mapped[datetime | None] = mapped_column(nullable=True)
    stopped_told_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Notification(Base):
    """One problem told to people over one channel: sent once, reminded after a while,
    resolved once it clears. A failed delivery leaves `sent_at` unset: the next tick tries
    again."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_open", "problem_key", "channel", "closed"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    problem_key: Mapped[str] = mapped_column(String(300))
    channel: Mapped[str] = mapped_column(String(16))  # smtp | webhook
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(nullable=True)  # last message delivered
    sends: Mapped[int] = mapped_column(Integer, default=0)  # problem + reminders delivered
    resolved_at: Mapped[datetime | None] = mapped_column(nullable=True)
    closed: Mapped[bool] = mapped_column(default=False)  # resolved and told (or never told)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class UndeliverableChannel(Base):
    """A notification channel that refused a message for good (an SMTP 5xx reply, an unknown
    host, a webhook's 4xx): sent again with the same settings it is refused again, so it is not
    tried at every tick. `held`: nothing got through (every recipient refused): its messages
    wait until its settings change, or `remind_after_hours` after `tried_at`; otherwise only
    some recipients were refused and the others got the message. `status`, the overview and the
    other channels name it. The row goes once a message over it reaches every recipient."""

    __tablename__ = "undeliverable_channels"
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)  # smtp | webhook
    settings: Mapped[str] = mapped_column(String(64))  # digest of the settings refused
    reason: Mapped[str] = mapped_column(Text)  # "<recipient or server>: <reply>"
    held: Mapped[bool] = mapped_column()
    since: Mapped[datetime] = mapped_column()  # first refused for this reason and settings
    tried_at: Mapped[datetime] = mapped_column()


class FailingChannel(Base):
    """A notification channel whose every delivery failed for now (an SMTP 421/451, a
    connection refused or timing out, a webhook's 5xx/429/408) since `since`, nothing
    delivered over it since: tried again at every tick, and told over the other channels and
    by `status` once that lasts `remind_after_hours`. The row goes once a message over it is
    delivered (to any recipient), or once it refuses for good (UndeliverableChannel)."""

    __tablename__ = "failing_channels"
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)  # smtp | webhook
    error: Mapped[str] = mapped_column(Text)  # the last failure
    since: Mapped[datetime] = mapped_column()  # the first failure since its last delivery
    failed_at: Mapped[datetime] = mapped_column()  # the last failure


class Lease(Base):
    """Work one process at a time does across processes and hosts, claimed by a conditional
    UPDATE (the row's `holder` set only where the lease is free, run out or already the
    caller's): the notification sensor's sending (notify.reconcile), so that two ticks at
    once (the daemon's and the UI's "Test sensor", a drive's) never send one notice twice.
    `until` by the holder's clock, renewed as the work goes on; NULL once released."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    until: Mapped[datetime | None] = mapped_column(nullable=True)
