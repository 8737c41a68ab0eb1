"""What OpsDB records as done, for the Dagster UI to be told again when its own record of it
is gone (an operator's "Wipe materializations", a Dagster instance restored from an older
backup): the verified package copies, each with its newest verification. Told, not re-read:
re-reading every copy of an archive could be terabytes; the fixity scrub re-reads LTA copies
on its budget."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    PackageCopy,
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


def _verified(query: Select[Any]) -> Select[Any]:
    """`query` of the verified package copies (PackageCopy.is_verified), with their location,
    site and package."""
    return (query.select_from(PackageCopy)
            .join(DataLocation, PackageCopy.location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)
            .join(RawDataPackage, PackageCopy.package_id == RawDataPackage.id)
            .where(PackageCopy.status == CopyStatus.PRESENT, PackageCopy.verified_at.is_not(None),
                   PackageCopy.verified_at >= PackageCopy.created_at))


def verified_placements(session: Session) -> set[Placed]:
    """Where OpsDB holds a verified copy of a package: one query, names only (compared with
    what Dagster shows as materialized)."""
    return {(package, site, LocationType(kind)) for package, site, kind in session.execute(
        _verified(select(RawDataPackage.name, Site.short_name, DataLocation.location_type)))}


def verifications(session: Session, placed: Collection[Placed]) -> list[Verified]:
    """For each of `placed`, its newest verified copy and that copy's newest successful read
    (its build, its transfer or a re-read); asked by pages of packages."""
    wanted = set(placed)
    names = sorted({package for package, _, _ in wanted})
    newest: dict[Placed, tuple[int, datetime]] = {}
    for start in range(0, len(names), PAGE):
        for copy_id, verified_at, package, site, kind in session.execute(_verified(select(
                PackageCopy.id, PackageCopy.verified_at, RawDataPackage.name, Site.short_name,
                DataLocation.location_type)).where(
                RawDataPackage.name.in_(names[start:start + PAGE])).order_by(PackageCopy.id)):
            key = (package, site, LocationType(kind))
            if key in wanted:
                newest[key] = (copy_id, verified_at)
    ids = sorted(copy_id for copy_id, _ in newest.values())
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
    for (package, site, kind), (copy_id, verified_at) in sorted(newest.items()):
        read = reads.get(copy_id)
        out.append(Verified(package, site, kind, copy_id, verified_at,
                            read.id if read else None, read_by(read) if read else None))
    return out
