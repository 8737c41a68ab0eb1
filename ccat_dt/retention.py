"""The deletion planner: which copies of a package may go, and why (pure reads, no side effects).

Every copy that is not DELETED gets exactly one Decision. Long-term archive copies are never
deleted; a CORRUPT package copy anywhere freezes the whole package (its sources may be needed to
make it again), while a raw file changed at its source since filing keeps only itself (its new
bytes are in no archive; the package's others are); observatory copies go only once the
required number of archive sites hold a verified LTA copy; an archive site's buffer copy goes once
that site's own LTA copy is verified. Location retention and a last-verified-copy check come
on top.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, joinedload

from ccat_dt.claims import abandoned_deletion, holder
from ccat_dt.config import Config
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    StagingRequest,
    _aware,
)

UNFINISHED = (CopyStatus.DELETION_IN_PROGRESS, CopyStatus.DELETION_FAILED)
C = TypeVar("C", bound=PhysicalCopy)


class Action(StrEnum):
    KEEP = "keep"
    DELETE = "delete"


@dataclass(frozen=True)
class Decision:
    copy_id: int
    kind: str  # "package" or "raw_file"
    site: str
    location: str
    location_type: LocationType
    path: str  # absolute
    size: int
    action: Action
    reason: str
    created_at: datetime
    early: bool = False  # kept only by retention age: disk pressure may delete it early


def _fresh(query: Select[tuple[C]]) -> Select[tuple[C]]:
    # populate_existing: rows already in the session's identity map are overwritten from the
    # database, so a long-lived session never decides on stale statuses.
    return query.options(joinedload(PhysicalCopy.location).joinedload(DataLocation.site)) \
        .execution_options(populate_existing=True)


def verified_lta_copies(session: Session, package: RawDataPackage) -> list[PackageCopy]:
    """Verified LTA copies of `package`, at most one per archive site, read fresh from OpsDB."""
    rows = session.scalars(_fresh(
        select(PackageCopy).join(DataLocation, PackageCopy.location_id == DataLocation.id)
        .where(PackageCopy.package_id == package.id,
               DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE,
               PackageCopy.status == CopyStatus.PRESENT, PackageCopy.verified_at.is_not(None))
        .order_by(PackageCopy.verified_at, PackageCopy.id))).unique().all()
    by_site: dict[str, PackageCopy] = {}
    for copy in rows:
        if copy.is_verified and (package.checksum is None or copy.checksum == package.checksum):
            by_site.setdefault(copy.location.site.short_name, copy)
    return list(by_site.values())


def live_copies(session: Session, package: RawDataPackage) -> list[PhysicalCopy]:
    """Package copies then raw-file copies of the package's files, excluding DELETED ones."""
    packages = session.scalars(_fresh(select(PackageCopy).where(
        PackageCopy.package_id == package.id, PackageCopy.status != CopyStatus.DELETED)
        .order_by(PackageCopy.id))).unique().all()
    raw = session.scalars(_fresh(select(RawDataFileCopy)
        .join(RawDataFile, RawDataFileCopy.raw_data_file_id == RawDataFile.id)
        .where(RawDataFile.package_id == package.id, RawDataFileCopy.status != CopyStatus.DELETED)
        .order_by(RawDataFileCopy.id))).unique().all()
    return [*packages, *raw]


def _corrupt_package_copies(session: Session, package: RawDataPackage) -> list[PackageCopy]:
    return list(session.scalars(_fresh(select(PackageCopy).where(
        PackageCopy.status == CopyStatus.CORRUPT, PackageCopy.package_id == package.id)
        .order_by(PackageCopy.id))).unique().all())


def lta_requirement(config: Config, site: str,
                    location_type: LocationType) -> tuple[int, str | None]:
    """Verified LTA copies (distinct sites) deleting a copy here relies on, and a must-have site."""
    if location_type == LocationType.BUFFER and site != config.settings.observatory:
        return 1, site  # an archive site's buffer copy goes once that site's own LTA copy is in
    if location_type == LocationType.PROCESSING:
        return 1, None  # staged files are re-derivable from any verified LTA copy
    return config.settings.required_lta_copies, None


def _unfinished(claim: Operation | None, now: datetime) -> str:
    """Where a deletion left half done stands: who may still be at it, or that the next purge
    of the package finishes it."""
    if claim is None:
        return "no deletion operation recorded"
    if claim.status == OperationStatus.IN_PROGRESS:
        why = abandoned_deletion(claim, now)
        if why is None:
            return f"operation {claim.id}, held by {holder(claim)}"
        return f"operation {claim.id}: abandoned, {why}; the next purge finishes it"
    return f"operation {claim.id} {claim.status.value}; the next purge looks at the file"


def _sites(copies: list[PackageCopy]) -> str:
    return ", ".join(sorted(c.location.site.short_name for c in copies)) or "none"


def _other_verified_package_copy(session: Session, copy: PhysicalCopy) -> bool:
    others = session.scalars(_fresh(select(PackageCopy).where(
        PackageCopy.package_id == copy.package_id, PackageCopy.id != copy.id,
        PackageCopy.status == CopyStatus.PRESENT, PackageCopy.checksum == copy.checksum))).unique()
    return any(other.is_verified for other in others)


class _Planner:
    """The facts shared by every decision for one package, read once per transaction."""

    def __init__(self, session: Session, config: Config, package: RawDataPackage, now: datetime,
                 early_ids: Collection[int] = ()):
        self.session, self.config, self.package, self.now = session, config, package, _aware(now)
        self.early_ids = early_ids
        self.required = config.settings.required_lta_copies
        self.lta = verified_lta_copies(session, package)
        self.corrupt = _corrupt_package_copies(session, package)

    def decide(self, copy: PhysicalCopy) -> Decision:
        location = copy.location
        action, reason, early = self._rule(copy)
        return Decision(copy_id=copy.id, kind=copy.kind, site=location.site.short_name,
                        location=location.name, location_type=location.location_type,
                        path=str(Path(location.root) / copy.relative_path), size=copy.size,
                        action=action, reason=reason, created_at=_aware(copy.created_at),
                        early=early)

    def _staged_rule(self, copy: PhysicalCopy) -> tuple[Action, str, bool]:
        """Staged files go once their request is released or expired."""
        request = (self.session.get(StagingRequest, copy.staging_request_id)
                   if copy.staging_request_id else None)
        if request is None:
            return Action.KEEP, "not part of a staging request", False
        if request.is_active(self.now):
            return (Action.KEEP, f"needed by active staging request {request.name} until "
                    f"{_aware(request.expires_at).isoformat()}", False)
        if not self.lta:
            return Action.KEEP, "last verified copy", False
        ended = (f"released at {_aware(request.released_at).isoformat()}" if request.released_at
                 else f"expired at {_aware(request.expires_at).isoformat()}")
        return (Action.DELETE, f"staging request {request.name} {ended}; verified LTA copies at "
                f"{_sites(self.lta)}", False)

    def _rule(self, copy: PhysicalCopy) -> tuple[Action, str, bool]:
        location, site = copy.location, copy.location.site.short_name
        kind = location.location_type
        if copy.status == CopyStatus.DELETED:
            return Action.KEEP, "already deleted", False
        if kind == LocationType.LONG_TERM_ARCHIVE:
            return (Action.KEEP, "long-term archive copies are never deleted automatically",
                    False)
        if copy.status == CopyStatus.CORRUPT and copy.kind == "raw_file":
            return Action.KEEP, ("changed at its source since filing: these bytes are in no "
                                 "archive (the package holds the filed ones); kept for a "
                                 "person to take away (or to put the filed bytes back), then "
                                 f"`ccat-dt purge --package {self.package.name}`"), False
        if self.corrupt:
            names = ", ".join(f"{c.location.label}" for c in self.corrupt)
            return Action.KEEP, (f"integrity check failed for {names} copy; "
                                 "nothing is purged until it is repaired"), False
        if copy.status in UNFINISHED:
            claim = self.session.scalars(select(Operation).where(
                Operation.copy_id == copy.id, Operation.operation_type == OperationType.DELETION)
                .order_by(Operation.id.desc()).limit(1)).first()
            operation = claim.id if claim is not None else None
            if copy.status == CopyStatus.DELETION_FAILED:
                return (Action.KEEP, f"deletion refused, the file is not the recorded copy (see "
                        f"operation {operation}): for a person to take away, then `ccat-dt "
                        "purge --package` records it deleted", False)
            return (Action.KEEP, "previous deletion did not finish "
                    f"({_unfinished(claim, self.now)})", False)
        if kind == LocationType.PROCESSING:
            return self._staged_rule(copy)
        observatory = site == self.config.settings.observatory
        blockers: list[str] = []
        if (kind == LocationType.SOURCE and copy.kind == "raw_file") or (
                kind == LocationType.BUFFER and observatory and copy.kind == "package"):
            have = len(self.lta)
            grounds = f"{have} of {self.required} required verified LTA copies ({_sites(self.lta)})"
            if have < self.required:
                blockers.append(grounds)
        elif kind == LocationType.BUFFER and copy.kind == "package":
            own = [c for c in self.lta if c.location.site.short_name == site]
            grounds = f"verified LTA copy at {site} ({_sites(own)})"
            if not own:
                blockers.append(f"no verified LTA copy at {site} yet")
        else:
            return (Action.KEEP, f"no deletion rule for {copy.kind} copies at {location.label}",
                    False)
        try:
            retention = self.config.retention(site, location.name)
        except ValueError:
            return (Action.KEEP, f"location {location.label} is not in the configuration",
                    False)
        hours = f"{retention.total_seconds() / 3600:g}h"
        deletable_after = _aware(copy.created_at) + retention
        too_young = self.now < deletable_after
        if blockers:
            if too_young:
                blockers.append(f"retention {hours} not reached: deletable after "
                                f"{deletable_after.isoformat()}")
            return Action.KEEP, "; ".join(blockers), False
        if (copy.kind == "raw_file" and not self.lta) or (
                copy.kind == "package" and not _other_verified_package_copy(self.session, copy)):
            return Action.KEEP, "last verified copy", False
        if too_young:
            if copy.id in self.early_ids:
                return Action.DELETE, (f"{grounds}; retention {hours} not reached, "
                                       "deleted early under disk pressure"), True
            return Action.KEEP, (f"retention {hours} not reached: deletable after "
                                 f"{deletable_after.isoformat()}"), True
        return Action.DELETE, f"{grounds}; retention {hours} passed", False


def plan_deletions(session: Session, config: Config, package: RawDataPackage,
                   now: datetime, early_ids: Collection[int] = ()) -> list[Decision]:
    """One Decision for every copy of `package` (and of its raw files) that is not DELETED.

    `early_ids` are copies that disk pressure lets go before their retention age; pressure
    never overrides any other rule."""
    planner = _Planner(session, config, package, now, early_ids)
    return [planner.decide(copy) for copy in live_copies(session, package)]


def decide_copy(session: Session, config: Config, package: RawDataPackage, copy: PhysicalCopy,
                now: datetime, early_ids: Collection[int] = ()
                ) -> tuple[Decision, list[PackageCopy]]:
    """Re-run the plan for one copy from fresh reads; also the LTA copies the decision relied on."""
    planner = _Planner(session, config, package, now, early_ids)
    return planner.decide(copy), planner.lta
