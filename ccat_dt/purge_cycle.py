"""A purge cycle: what may be deleted now across all packages, oldest first, within the cycle's
byte budget; where a disk is above its high watermark, copies held back only by their
retention age go early until the low watermark is reached. Pressure never overrides any other
rule (the verified copies a deletion rests on are exactly as for a normal deletion)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.marker import root_problem
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
)
from ccat_dt.retention import Action, Decision, plan_deletions
from ccat_dt.topology import get_location


@dataclass(frozen=True)
class DiskUsage:
    """A file system's use as `df` shows it: Use% = used / (used + available), where
    available excludes the blocks reserved for root (so 100% is full for us). Without
    `available` (a caller that only knows the size), the rest of `total` counts as available."""

    total: int
    used: int
    available: int | None = None

    @property
    def capacity(self) -> int:
        """The bytes this file system can hold for us: used + available."""
        return self.used + (self.available if self.available is not None
                            else max(self.total - self.used, 0))

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.capacity if self.capacity else 0.0


def measure(location: DataLocation) -> DiskUsage | None:
    """The usage of a location's disk when it is mounted here; None for a remote root (this
    host's file system at the same path is another disk) or a root that is not the marked
    disk (unmounted: the empty mount point would report the system disk)."""
    if location.host is not None or root_problem(Path(location.root), location.label):
        return None
    try:
        usage = shutil.disk_usage(location.root)
    except OSError:
        return None
    return DiskUsage(total=usage.total, used=usage.used, available=usage.free)


@dataclass(frozen=True)
class Pressure:
    location: str
    before_pct: float
    after_pct: float
    high_pct: float
    low_pct: float


@dataclass
class CyclePlan:
    deletions: list[tuple[str, Decision]] = field(default_factory=list)  # execution order
    kept: list[tuple[str, Decision]] = field(default_factory=list)
    pressure: list[Pressure] = field(default_factory=list)
    budget_bytes: int = 0

    @property
    def bytes(self) -> int:
        return sum(d.size for _, d in self.deletions)

    def by_site(self) -> dict[tuple[str, str], tuple[list[int], list[int], list[str]]]:
        """(package, site) -> (copy ids to delete, of which early, the locations they are at):
        one purge run each, on the worker of the site whose data it deletes (a site's worker
        serves every location of that site, so one run covers them all)."""
        return self.runs(per_site=True)

    def runs(self, *, per_site: bool
             ) -> dict[tuple[str, str], tuple[list[int], list[int], list[str]]]:
        """The purge runs of this cycle: per package and site (`by_site`), or, where one
        process reaches every site's storage, one per package (site "")."""
        out: dict[tuple[str, str], tuple[list[int], list[int], list[str]]] = {}
        for package, decision in self.deletions:
            ids, early, locations = out.setdefault(
                (package, decision.site if per_site else ""), ([], [], []))
            ids.append(decision.copy_id)
            if decision.early:
                early.append(decision.copy_id)
            if decision.location not in locations:
                locations.append(decision.location)
        return out

    def by_package(self) -> dict[str, tuple[list[int], list[int]]]:
        """package -> (copy ids to delete, of which early under pressure)."""
        out: dict[str, tuple[list[int], list[int]]] = {}
        for package, decision in self.deletions:
            ids, early = out.setdefault(package, ([], []))
            ids.append(decision.copy_id)
            if decision.early:
                early.append(decision.copy_id)
        return out


def packages_with_purgeable_copies(session: Session, limit: int) -> list[RawDataPackage]:
    """Packages holding present copies outside the LTA (only they can have anything to purge),
    or a deletion there that is unfinished or was refused (its plan says why, and who acts).

    Starts from the few non-archive locations and the (location, status) index, so the cost
    follows what is still held there, not every copy ever recorded."""
    outside = select(DataLocation.id).where(
        DataLocation.location_type != LocationType.LONG_TERM_ARCHIVE)
    live = (PhysicalCopy.location_id.in_(outside),
            PhysicalCopy.status.in_([CopyStatus.PRESENT, CopyStatus.STAGED,
                                     CopyStatus.DELETION_IN_PROGRESS,
                                     CopyStatus.DELETION_FAILED]))
    package_copies = select(PhysicalCopy.package_id).where(
        *live, PhysicalCopy.package_id.is_not(None))
    file_copies = select(RawDataFile.package_id).where(RawDataFile.id.in_(
        select(PhysicalCopy.raw_data_file_id).where(
            *live, PhysicalCopy.raw_data_file_id.is_not(None))))
    return list(session.scalars(
        select(RawDataPackage)
        .where(RawDataPackage.id.in_(package_copies) | RawDataPackage.id.in_(file_copies),
               RawDataPackage.checksum.is_not(None))
        .order_by(RawDataPackage.id).limit(limit)))


def plan_cycle(session: Session, config: Config, now: datetime, *,
               usage: Callable[[DataLocation], DiskUsage | None] = measure,
               limit: int = 2000) -> CyclePlan:
    budget = config.settings.policies.purge_budget_bytes
    plan = CyclePlan(budget_bytes=budget)
    decided: list[tuple[str, Decision]] = []
    for candidate in packages_with_purgeable_copies(session, limit):
        decided += [(candidate.name, d) for d in plan_deletions(session, config, candidate, now)]
    decided.sort(key=lambda item: (item[1].created_at, item[1].copy_id))
    spent = 0
    chosen: set[int] = set()
    for package, decision in decided:
        if decision.action == Action.DELETE and spent + decision.size <= budget:
            plan.deletions.append((package, decision))
            chosen.add(decision.copy_id)
            spent += decision.size
    locations = {(d.site, d.location) for _, d in decided}
    for site, name in sorted(locations):
        settings = config.location(site, name)
        high, low = settings.high_watermark_pct, settings.low_watermark_pct
        if high is None or low is None:
            continue
        measured = usage(get_location(session, site, name))
        if measured is None or measured.percent <= high:
            continue
        freed = sum(d.size for _, d in plan.deletions
                    if (d.site, d.location) == (site, name))
        to_free = measured.used - int(low / 100 * measured.capacity)
        for package, decision in decided:
            if freed >= to_free:
                break
            if ((decision.site, decision.location) == (site, name) and decision.early
                    and decision.copy_id not in chosen and spent + decision.size <= budget):
                plan.deletions.append((package, _early(decision)))
                chosen.add(decision.copy_id)
                spent += decision.size
                freed += decision.size
        plan.pressure.append(Pressure(
            f"{site}/{name}", measured.percent,
            100.0 * (measured.used - freed) / measured.capacity, high, low))
    plan.kept = [(p, d if d.action == Action.KEEP else _over_budget(d, budget))
                 for p, d in decided if d.copy_id not in chosen]
    return plan


def pressure_gone(session: Session, config: Config, site: str, name: str, *,
                  usage: Callable[[DataLocation], DiskUsage | None] = measure) -> str | None:
    """Why a copy planned to go early under disk pressure must now wait for its retention age:
    its disk, measured now, is no longer above the low watermark (or cannot be measured).
    None while the pressure lasts. A cycle's plan (or a run re-executed days later) says what
    the disk was; the deletion looks at what it is."""
    low = config.location(site, name).low_watermark_pct
    measured = usage(get_location(session, site, name))
    if low is None or measured is None:
        return f"disk pressure at {site}/{name} can no longer be measured"
    if measured.percent <= low:
        return (f"disk pressure at {site}/{name} is over ({measured.percent:.1f}% used, low "
                f"watermark {low:g}%)")
    return None


def _over_budget(decision: Decision, budget: int) -> Decision:
    # Deletable, but not in this cycle: it must not be reported as a deletion.
    return replace(decision, action=Action.KEEP,
                   reason=f"not in this purge cycle's budget ({budget} bytes); {decision.reason}")


def _early(decision: Decision) -> Decision:
    return replace(decision, action=Action.DELETE,
                   reason=decision.reason.replace("deletable after", "disk pressure: deleting "
                                                  "early; would have been deletable after"))



def newest_package_copies(session: Session, packages: Collection[str]) -> dict[str, int]:
    """The id of each package's newest copy (any location, any status)."""
    rows = session.execute(
        select(RawDataPackage.name, func.max(PackageCopy.id))
        .join(PackageCopy, PackageCopy.package_id == RawDataPackage.id)
        .where(RawDataPackage.name.in_(list(packages))).group_by(RawDataPackage.name)).all()
    return {name: newest for name, newest in rows}
