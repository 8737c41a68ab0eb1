"""A purge cycle: what may be deleted now across all packages, oldest first, within the cycle's
byte budget; where a disk is above its high watermark, copies held back only by their
retention age go early until the low watermark is reached. Pressure never overrides any other
rule (the verified copies a deletion rests on are exactly as for a normal deletion)."""

from __future__ import annotations

import os
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
    `available` (a caller that only knows the size), the rest of `total` counts as available.
    Its inodes likewise, as `df -i` shows them, when known: a disk out of inodes refuses every
    new file (ENOSPC) with bytes free, so the fill the watermarks compare (`fill_percent`) is
    the higher of the two."""

    total: int
    used: int
    available: int | None = None
    inodes: int = 0  # 0: not known, or a file system that counts none (btrfs)
    inodes_used: int = 0
    inodes_available: int | None = None

    @property
    def capacity(self) -> int:
        """The bytes this file system can hold for us: used + available."""
        return self.used + (self.available if self.available is not None
                            else max(self.total - self.used, 0))

    @property
    def percent(self) -> float:
        """Of its bytes (df's Use%)."""
        return 100.0 * self.used / self.capacity if self.capacity else 0.0

    @property
    def inode_capacity(self) -> int:
        """The files this file system can hold for us: inodes used + available."""
        return self.inodes_used + (self.inodes_available if self.inodes_available is not None
                                   else max(self.inodes - self.inodes_used, 0))

    @property
    def inode_percent(self) -> float:
        """Of its inodes (df -i's IUse%); 0 for a file system that counts none."""
        return 100.0 * self.inodes_used / self.inode_capacity if self.inode_capacity else 0.0

    @property
    def fill_percent(self) -> float:
        """What the watermarks compare: the higher of bytes and inodes used."""
        return max(self.percent, self.inode_percent)

    @property
    def filled_by(self) -> str:
        """"inodes" when they are fuller than the bytes (`fill_percent`), else "bytes"."""
        return "inodes" if self.inode_percent > self.percent else "bytes"

    def without(self, nbytes: int, files: int) -> DiskUsage:
        """As it would be once `files` files of `nbytes` bytes in all are deleted."""
        return replace(
            self, used=max(self.used - nbytes, 0),
            available=None if self.available is None else self.available + nbytes,
            inodes_used=max(self.inodes_used - files, 0),
            inodes_available=(None if self.inodes_available is None
                              else self.inodes_available + files))


def measure(location: DataLocation) -> DiskUsage | None:
    """The usage of a location's disk, bytes and inodes, when it is mounted here; None for a
    remote root (this host's file system at the same path is another disk) or a root that is
    not the marked disk (unmounted: the empty mount point would report the system disk)."""
    if location.host is not None or root_problem(Path(location.root), location.label):
        return None
    try:
        info = os.statvfs(location.root)
    except OSError:
        return None
    # bytes as shutil.disk_usage (and df) count them; inodes as df -i
    return DiskUsage(total=info.f_blocks * info.f_frsize,
                     used=(info.f_blocks - info.f_bfree) * info.f_frsize,
                     available=info.f_bavail * info.f_frsize, inodes=info.f_files,
                     inodes_used=info.f_files - info.f_ffree, inodes_available=info.f_favail)


def _used(usage: DiskUsage, of: str) -> str:
    """"85.0% used" (its bytes), or "85.0% of its inodes used" when they are the fuller."""
    return (f"{usage.fill_percent:.1f}% " + ("of its inodes " if of == "inodes" else "")
            + "used")


@dataclass(frozen=True)
class Pressure:
    location: str
    before_pct: float  # the fill: the higher of bytes and inodes used (DiskUsage.fill_percent)
    after_pct: float
    high_pct: float
    low_pct: float
    filled_by: str = "bytes"  # or "inodes": a disk of many small files, bytes free

    def said(self) -> str:
        """How `purge --plan` says it: what fill is above the high watermark, and to where."""
        of = " of its inodes" if self.filled_by == "inodes" else ""
        return (f"disk pressure at {self.location}: {self.before_pct:.1f}%{of} used -> "
                f"{self.after_pct:.1f}% (high {self.high_pct:g}%, low {self.low_pct:g}%)")


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
        if measured is None or measured.fill_percent <= high:
            continue
        # Each copy deleted frees its bytes and its inode (one file): early ones go until
        # both are at the low watermark.
        there = [d for _, d in plan.deletions if (d.site, d.location) == (site, name)]
        freed, files = sum(d.size for d in there), len(there)
        to_free = measured.used - int(low / 100 * measured.capacity)
        files_to_free = measured.inodes_used - int(low / 100 * measured.inode_capacity)
        why = (f"disk pressure at {site}/{name} ({_used(measured, measured.filled_by)}, high "
               f"watermark {high:g}%)")
        for package, decision in decided:
            if freed >= to_free and files >= files_to_free:
                break
            if ((decision.site, decision.location) == (site, name) and decision.early
                    and decision.copy_id not in chosen and spent + decision.size <= budget):
                plan.deletions.append((package, _early(decision, why)))
                chosen.add(decision.copy_id)
                spent += decision.size
                freed += decision.size
                files += 1
        plan.pressure.append(Pressure(
            f"{site}/{name}", measured.fill_percent,
            measured.without(freed, files).fill_percent, high, low, measured.filled_by))
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
    if measured.fill_percent <= low:
        return (f"disk pressure at {site}/{name} is over ({_used(measured, measured.filled_by)}, "
                f"low watermark {low:g}%)")
    return None


def _over_budget(decision: Decision, budget: int) -> Decision:
    # Deletable, but not in this cycle: it must not be reported as a deletion.
    return replace(decision, action=Action.KEEP,
                   reason=f"not in this purge cycle's budget ({budget} bytes); {decision.reason}")


def _early(decision: Decision, why: str) -> Decision:
    """`why`: the disk pressure, "disk pressure at LOCATION (85.0% of its inodes used, high
    watermark 80%)"."""
    return replace(decision, action=Action.DELETE,
                   reason=decision.reason.replace("deletable after", f"{why}: deleting early; "
                                                  "would have been deletable after"))



def newest_package_copies(session: Session, packages: Collection[str]) -> dict[str, int]:
    """The id of each package's newest copy (any location, any status)."""
    rows = session.execute(
        select(RawDataPackage.name, func.max(PackageCopy.id))
        .join(PackageCopy, PackageCopy.package_id == RawDataPackage.id)
        .where(RawDataPackage.name.in_(list(packages))).group_by(RawDataPackage.name)).all()
    return {name: newest for name, newest in rows}
