"""Work that OpsDB shows is possible now but not done: what the re-attempt sensor considers
for its next automatic attempt (with the run history: ccat_dt/reattempt.py), and what an
operator's `ccat-dt retry` re-runs once past the re-attempt horizon or after fixing a
permanent cause (a restored source file: `--rebuild-failed`).

Retrying is always safe: each step is idempotent (a verified copy already there is returned
untouched), so retrying work that is in fact done or in flight costs a little I/O, never a
byte.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.claims import abandoned_deletion
from ccat_dt.config import Config
from ccat_dt.diagnosis import last_staging
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    StagingRequest,
    StagingState,
    _aware,
    utcnow,
)
from ccat_dt.recovery import needs_rebuild
from ccat_dt.routing import copies_at, replication_source
from ccat_dt.staged_files import look_at_staged
from ccat_dt.stages import Stage
from ccat_dt.topology import primary_location

if TYPE_CHECKING:
    from ccat_dt.reaper import PurgeReport


@dataclass(frozen=True)
class Stalled:
    """One partition to re-run: the stage that materialises it, the package (for staging: the
    request, its partition), the site ("" for per-package work) and what OpsDB says about its
    last attempt."""

    stage: Stage
    package: str
    site: str
    reason: str


def stalled_work(opsdb: OpsDB, config: Config, *, packages: Collection[str] | None = None,
                 rebuild_failed: bool = False) -> list[Stalled]:
    """Every package x stage that can be done now and is not, in lifecycle order, then every
    active staging request not staged yet (`packages` may name requests too).

    A FAILED package (a source file that changed after filing) is rebuilt only with
    `rebuild_failed`, once a person has restored the file: the build re-reads every byte
    against the filed checksums, so a package still built from wrong bytes fails again."""
    with opsdb.session() as session:
        return stalled_in(session, config, packages=packages, rebuild_failed=rebuild_failed)


def stalled_in(session: Session, config: Config, *, packages: Collection[str] | None = None,
               rebuild_failed: bool = False) -> list[Stalled]:
    """stalled_work, read in `session`."""
    out: list[Stalled] = []
    query = select(RawDataPackage).order_by(RawDataPackage.id)
    if packages is not None:
        query = query.where(RawDataPackage.name.in_(list(packages)))
    for package in session.scalars(query):
        if package.state == PackageState.FAILED:
            if rebuild_failed:
                out.append(Stalled(Stage.PACKAGING, package.name, "",
                                   _last(session, package, OperationType.PACKAGING, None)))
            continue
        if package.checksum is None:
            out.append(Stalled(Stage.PACKAGING, package.name, "",
                               _last(session, package, OperationType.PACKAGING, None)))
            continue
        if rebuild := needs_rebuild(session, config, package):
            out.append(Stalled(Stage.PACKAGING, package.name, "", rebuild))
            continue
        for site in config.settings.archive_sites:
            out += _at_site(session, config, package, site.short_name)
    return out + _staging(session, packages)


def _staging(session: Session, names: Collection[str] | None) -> list[Stalled]:
    """Active requests whose files are not all there: never staged yet (a transient fault,
    the processing disk not mounted, a link down, is re-attempted like any other stage's), or
    staged files gone from the disk or changed there since."""
    query = select(StagingRequest).where(StagingRequest.state == StagingState.ACTIVE)
    if names is not None:
        query = query.where(StagingRequest.name.in_(list(names)))
    now = utcnow()
    return [Stalled(Stage.STAGING, request.name, "", _said(OperationType.STAGING,
                                                            last_staging(session, request)))
            for request in session.scalars(query.order_by(StagingRequest.id))
            if request.is_active(now) and (request.staged_at is None or look_at_staged(
                list(session.scalars(select(RawDataFileCopy).where(
                    RawDataFileCopy.staging_request_id == request.id,
                    RawDataFileCopy.status == CopyStatus.STAGED))), rehash=False))]


def _at_site(session: Session, config: Config, package: RawDataPackage,
             site: str) -> list[Stalled]:
    if any(c.is_verified for c in copies_at(session, package, LocationType.LONG_TERM_ARCHIVE,
                                            site)):
        return []
    buffer = primary_location(session, site, LocationType.BUFFER)
    if any(c.is_verified for c in copies_at(session, package, LocationType.BUFFER, site)):
        lta = primary_location(session, site, LocationType.LONG_TERM_ARCHIVE)
        return [Stalled(Stage.LTA_COPY, package.name, site,
                        _last(session, package, OperationType.ARCHIVE, lta.id))]
    if replication_source(session, config, package, site) is None:
        return []  # waits for a verified copy elsewhere (or for a repair of the first hop)
    return [Stalled(Stage.SITE_COPY, package.name, site,
                    _last(session, package, OperationType.TRANSFER, buffer.id))]


def _last(session: Session, package: RawDataPackage, kind: OperationType,
          destination_id: int | None) -> str:
    query = select(Operation).where(Operation.package_id == package.id,
                                    Operation.operation_type == kind)
    if destination_id is not None:
        query = query.where(Operation.destination_location_id == destination_id)
    return _said(kind, session.scalars(query.order_by(Operation.id.desc()).limit(1)).first())


def _said(kind: OperationType, last: Operation | None) -> str:
    if last is None:
        return f"no {kind.value} attempted yet"
    when = _aware(last.started_at).strftime("%Y-%m-%d %H:%M:%S")
    if last.status == OperationStatus.FAILED:
        return f"{kind.value} operation {last.id} failed (started {when}): {last.error}"
    if last.status == OperationStatus.IN_PROGRESS:
        return (f"{kind.value} operation {last.id} started {when} never finished "
                "(its process died?)")
    return f"{kind.value} operation {last.id} {last.status.value} (started {when})"


@dataclass(frozen=True)
class Abandoned:
    """A deletion whose certificate was committed but whose end is unknown: its process never
    recorded it, or its unlink or `rm` failed (the link dropped, say); whether the file went,
    the next purge looks."""

    package: str
    copy_id: int
    operation_id: int
    path: str
    started_at: datetime
    site: str = ""
    location: str = ""


def abandoned_deletions(opsdb: OpsDB, now: datetime | None = None) -> list[Abandoned]:
    """Copies DELETION_IN_PROGRESS whose newest deletion operation is still IN_PROGRESS but
    abandoned (`claims.abandoned_deletion`: its process is gone, say), or FAILED (its process
    ended)."""
    now = now or utcnow()
    out = []
    with opsdb.session() as session:
        copies = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETION_IN_PROGRESS)
            .order_by(PhysicalCopy.id)).all()
        for copy in copies:
            operation = session.scalars(select(Operation).where(
                Operation.copy_id == copy.id, Operation.operation_type == OperationType.DELETION)
                .order_by(Operation.id.desc()).limit(1)).first()
            if operation is None or operation.status != OperationStatus.FAILED and (
                    operation.status != OperationStatus.IN_PROGRESS
                    or abandoned_deletion(operation, now) is None):
                continue
            package_id = copy.package_id or session.scalar(select(RawDataFile.package_id).where(
                RawDataFile.id == copy.raw_data_file_id))
            package = session.get(RawDataPackage, package_id) if package_id else None
            if package is None:
                continue
            out.append(Abandoned(package.name, copy.id, operation.id,
                                 f"{copy.location.root}/{copy.relative_path}",
                                 _aware(operation.started_at), copy.location.site.short_name,
                                 copy.location.name))
    return out


def resume_deletions(opsdb: OpsDB, config: Config, *,
                     now: datetime | None = None) -> list[PurgeReport]:
    """Finish every abandoned deletion (see `ccat_dt.reaper`): a purge of each package that
    has one, limited to those copies, whether or not anything else of the package is due."""
    from ccat_dt import reaper  # here: the re-attempt rows' readers (`status`, the
    # notices) read this module, and the purge's imports (transports, tar) are not theirs
    names = sorted({a.package for a in abandoned_deletions(opsdb, now)})
    return [reaper.purge_package(opsdb, config, name, now=now, copy_ids=()) for name in names]
