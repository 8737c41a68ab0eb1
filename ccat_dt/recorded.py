"""What OpsDB records as done, for the Dagster UI to be told again when its own record of it
is gone (an operator's "Wipe materializations" or Runs → Delete, which deletes a run's event
log with its materializations; a Dagster instance restored from an older backup): the
packages built, the verified package copies (present, or deleted by the purge after
archiving), each with its newest verification, the copies quarantined (found bad, not yet
made again), and the packages the purge deleted copies of.
Told, not re-read: re-reading every copy of an archive could be terabytes; the fixity scrub
re-reads LTA copies on its budget."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, case, func, select
from sqlalchemy.orm import Session

from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    RawDataFile,
    RawDataPackage,
    Site,
)
from ccat_dt.pending import PAGE
from ccat_dt.replicas import READS, read_by

# (package, site, kind) of a verified package copy
Placed = tuple[str, str, LocationType]


@dataclass(frozen=True)
class Verified:
    """A verified copy and its newest verification (None: no read of it is recorded)."""

    package: str
    site: str
    kind: LocationType
    copy_id: int
    verified_at: datetime
    operation_id: int | None
    verified_by: str | None
    deleted_at: datetime | None = None  # deleted by the purge after it was verified


@dataclass(frozen=True)
class Quarantined:
    """A copy quarantined (CORRUPT: a re-read found it bad) with no verified copy of its kind
    at its site, and what its newest failed verification recorded."""

    package: str
    site: str
    kind: LocationType
    copy_id: int
    location: str  # site/location
    error: str | None
    found_at: datetime | None  # when that verification ended
    operation_id: int | None


@dataclass(frozen=True)
class Built:
    """A package built (its raw files packed into its tar)."""

    package: str
    files: int
    bytes: int
    built_at: datetime


@dataclass(frozen=True)
class Purged:
    """A package the purge deleted copies of (sources, buffer copies)."""

    package: str
    deleted: int
    deleted_bytes: int
    last_deleted_at: datetime | None


def _copies(query: Select[Any]) -> Select[Any]:
    """`query` of the package copies, with their location, site and package."""
    return (query.select_from(PackageCopy)
            .join(DataLocation, PackageCopy.location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)
            .join(RawDataPackage, PackageCopy.package_id == RawDataPackage.id))


# A copy verified after it was written (PackageCopy.is_verified, whatever its status now)
VERIFIED_AFTER_WRITE = and_(PackageCopy.verified_at.is_not(None),
                            PackageCopy.verified_at >= PackageCopy.created_at)


def _verified(query: Select[Any], *statuses: CopyStatus) -> Select[Any]:
    """`query` of the package copies verified after they were written, of these statuses
    (PRESENT alone by default)."""
    return _copies(query).where(PackageCopy.status.in_(statuses or (CopyStatus.PRESENT,)),
                                VERIFIED_AFTER_WRITE)


def verified_placements(session: Session) -> set[Placed]:
    """Where OpsDB holds a verified copy of a package: one query, names only (compared with
    what Dagster shows as materialized)."""
    return {(package, site, LocationType(kind)) for package, site, kind in session.execute(
        _verified(select(RawDataPackage.name, Site.short_name, DataLocation.location_type)))}


def purged_placements(session: Session) -> set[Placed]:
    """Where every copy of a package OpsDB records is DELETED, one of them verified before it
    was: a copy made, verified and then deleted by the purge after archiving (a place holding a
    copy in any other state is not: present, quarantined, unverified, being deleted). One
    query, grouped in the database: names only."""
    return {(package, site, LocationType(kind)) for package, site, kind in session.execute(
        _copies(select(RawDataPackage.name, Site.short_name, DataLocation.location_type))
        .group_by(RawDataPackage.name, Site.short_name, DataLocation.location_type)
        .having(func.sum(case((PackageCopy.status != CopyStatus.DELETED, 1), else_=0)) == 0,
                func.sum(case((VERIFIED_AFTER_WRITE, 1), else_=0)) > 0))}


def quarantined_placements(session: Session) -> set[Placed]:
    """Where OpsDB holds a copy of a package quarantined (CORRUPT), whatever else it holds
    there (the caller leaves out the places with a verified copy: a repair made since): one
    query, names only."""
    return {(package, site, LocationType(kind)) for package, site, kind in session.execute(
        _copies(select(RawDataPackage.name, Site.short_name, DataLocation.location_type))
        .where(PackageCopy.status == CopyStatus.CORRUPT).distinct())}


def quarantines(session: Session, placed: Collection[Placed]) -> list[Quarantined]:
    """For each of `placed`, its newest quarantined copy and that copy's newest failed
    verification (why, when); asked by pages of packages."""
    wanted = set(placed)
    names = sorted({package for package, _, _ in wanted})
    newest: dict[Placed, tuple[int, str]] = {}
    for start in range(0, len(names), PAGE):
        for copy_id, package, site, location, kind in session.execute(_copies(select(
                PackageCopy.id, RawDataPackage.name, Site.short_name, DataLocation.name,
                DataLocation.location_type)).where(
                PackageCopy.status == CopyStatus.CORRUPT,
                RawDataPackage.name.in_(names[start:start + PAGE])).order_by(PackageCopy.id)):
            key = (package, site, LocationType(kind))
            if key in wanted:
                newest[key] = (copy_id, f"{site}/{location}")  # the newest last
    ids = sorted(copy_id for copy_id, _ in newest.values())
    failed: dict[int, Operation] = {}
    for start in range(0, len(ids), PAGE):
        for operation in session.scalars(select(Operation).where(
                Operation.copy_id.in_(ids[start:start + PAGE]),
                Operation.operation_type == OperationType.VERIFICATION,
                Operation.status == OperationStatus.FAILED).order_by(Operation.id)):
            assert operation.copy_id is not None
            failed[operation.copy_id] = operation  # the newest last
    out = []
    for (package, site, kind), (copy_id, location) in sorted(newest.items()):
        why = failed.get(copy_id)
        out.append(Quarantined(package, site, kind, copy_id, location,
                               why.error if why else None,
                               (why.finished_at or why.started_at) if why else None,
                               why.id if why else None))
    return out


def built_packages(session: Session) -> set[str]:
    """The packages OpsDB records as built: one query, names only."""
    return set(session.scalars(select(RawDataPackage.name).where(
        RawDataPackage.built_at.is_not(None))))


def purged_packages(session: Session) -> set[str]:
    """The packages the purge deleted a copy of (a completed deletion operation): one query,
    names only."""
    return set(session.scalars(select(RawDataPackage.name).join(
        Operation, Operation.package_id == RawDataPackage.id).where(
        Operation.operation_type == OperationType.DELETION,
        Operation.status == OperationStatus.COMPLETED).distinct()))


def builds(session: Session, packages: Collection[str]) -> list[Built]:
    """Each of `packages` that is built: its files and bytes, and when; by pages."""
    names, out = sorted(packages), []
    for start in range(0, len(names), PAGE):
        for name, files, size, built_at in session.execute(
                select(RawDataPackage.name, func.count(RawDataFile.id),
                       func.coalesce(func.sum(RawDataFile.size), 0), RawDataPackage.built_at)
                .outerjoin(RawDataFile, RawDataFile.package_id == RawDataPackage.id)
                .where(RawDataPackage.name.in_(names[start:start + PAGE]),
                       RawDataPackage.built_at.is_not(None))
                .group_by(RawDataPackage.id).order_by(RawDataPackage.name)):
            out.append(Built(name, int(files), int(size), built_at))
    return out


def purges(session: Session, packages: Collection[str]) -> list[Purged]:
    """For each of `packages`, its completed deletions: how many, their bytes, the newest;
    by pages."""
    names, out = sorted(packages), []
    for start in range(0, len(names), PAGE):
        for name, deleted, size, last in session.execute(
                select(RawDataPackage.name, func.count(Operation.id),
                       func.coalesce(func.sum(Operation.bytes), 0),
                       func.max(Operation.finished_at))
                .join(Operation, Operation.package_id == RawDataPackage.id)
                .where(RawDataPackage.name.in_(names[start:start + PAGE]),
                       Operation.operation_type == OperationType.DELETION,
                       Operation.status == OperationStatus.COMPLETED)
                .group_by(RawDataPackage.id).order_by(RawDataPackage.name)):
            out.append(Purged(name, int(deleted), int(size), last))
    return out


def verifications(session: Session, placed: Collection[Placed],
                  purged: Collection[Placed] = ()) -> list[Verified]:
    """For each of `placed`, its newest verified copy, and for each of `purged`, its newest
    verified copy the purge deleted, with that copy's newest successful read (its build, its
    transfer or a re-read); asked by pages of packages."""
    wanted, gone = set(placed), set(purged)
    names = sorted({package for package, _, _ in wanted | gone})
    newest: dict[Placed, tuple[int, datetime, datetime | None]] = {}
    for start in range(0, len(names), PAGE):
        for copy_id, verified_at, deleted_at, status, package, site, kind in session.execute(
                _verified(select(
                    PackageCopy.id, PackageCopy.verified_at, PackageCopy.deleted_at,
                    PackageCopy.status, RawDataPackage.name, Site.short_name,
                    DataLocation.location_type), CopyStatus.PRESENT, CopyStatus.DELETED).where(
                RawDataPackage.name.in_(names[start:start + PAGE])).order_by(PackageCopy.id)):
            key = (package, site, LocationType(kind))
            if key in (wanted if status == CopyStatus.PRESENT else gone):
                newest[key] = (copy_id, verified_at,
                               None if status == CopyStatus.PRESENT else deleted_at)
    ids = sorted(copy_id for copy_id, _, _ in newest.values())
    reads: dict[int, Operation] = {}
    for start in range(0, len(ids), PAGE):
        for operation in session.scalars(select(Operation).where(
                Operation.copy_id.in_(ids[start:start + PAGE]),
                Operation.operation_type.in_(READS),
                Operation.status == OperationStatus.COMPLETED, Operation.error.is_(None))
                .order_by(Operation.id)):
            assert operation.copy_id is not None
            reads[operation.copy_id] = operation  # the newest last
    out = []
    for (package, site, kind), (copy_id, verified_at, deleted_at) in sorted(newest.items()):
        read = reads.get(copy_id)
        out.append(Verified(package, site, kind, copy_id, verified_at,
                            read.id if read else None, read_by(read) if read else None,
                            deleted_at))
    return out
