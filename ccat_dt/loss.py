"""Is every filed byte of a package still in a good copy somewhere? Loss must be loud.

A package is LOST when some raw file is neither at its source (present, unchanged) nor in any
verified copy of the package; it is AT RISK when its sources are gone and fewer archive sites
than required hold a verified LTA copy (the repair sensor restores those from the others).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import CompoundSelect, select, union
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    PackageCopy,
    PackageState,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
)


class Health(StrEnum):
    SAFE = "safe"
    AT_RISK = "at risk"
    LOST = "lost"


@dataclass(frozen=True)
class Assessment:
    health: Health
    reason: str
    # Judged by its sources alone (every raw file still there): no copy was relied on.
    at_source: bool = False


def assess(session: Session, config: Config, package: RawDataPackage) -> Assessment:
    """Judge the package from OpsDB's current (storage-checked) view of its copies."""
    files = session.scalars(select(RawDataFile).where(RawDataFile.package_id == package.id)
                            ).all()
    intact = {copy.raw_data_file_id for copy in session.scalars(
        select(RawDataFileCopy).join(DataLocation, RawDataFileCopy.location_id == DataLocation.id)
        .where(RawDataFileCopy.raw_data_file_id.in_([f.id for f in files]),
               DataLocation.location_type == LocationType.SOURCE,
               RawDataFileCopy.status == CopyStatus.PRESENT))}
    away = [f for f in files if f.id not in intact]
    if not away:
        return Assessment(Health.SAFE, "every raw file is still at its source", at_source=True)
    good = [c for c in session.scalars(select(PackageCopy).where(
        PackageCopy.package_id == package.id,
        PackageCopy.status == CopyStatus.PRESENT).execution_options(populate_existing=True))
        if c.is_verified and package.checksum is not None and c.checksum == package.checksum]
    if not good:
        return Assessment(Health.LOST, (
            f"DATA LOST: {len(away)} of {len(files)} raw files are no longer at their source "
            "and no verified copy of the package exists anywhere (every copy is gone or "
            "corrupt); restore a copy from a backup to its recorded path, then run "
            "`ccat-dt audit --checksums --repair`"))
    lta_sites = {c.location.site.short_name for c in good
                 if c.location.location_type == LocationType.LONG_TERM_ARCHIVE}
    required = config.settings.required_lta_copies
    if len(lta_sites) < required:
        where = ", ".join(sorted(lta_sites)) or "no archive"
        return Assessment(Health.AT_RISK, (
            f"AT RISK: sources purged and only {len(lta_sites)} of {required} required verified "
            f"LTA copies ({where}); the repair sensor restores the others from a verified copy"))
    return Assessment(Health.SAFE, f"verified LTA copies at {', '.join(sorted(lta_sites))}")


def refresh_loss(session: Session, config: Config, package: RawDataPackage) -> Assessment:
    """Set LOST when it is so, and lift it once a good copy is back (an audit found it)."""
    assessment = assess(session, config, package)
    if assessment.health == Health.LOST:
        package.state = PackageState.LOST
    elif package.state == PackageState.LOST:
        package.state = PackageState.TRANSFERRING  # refresh_state derives the rest
    return assessment


def packages_in_danger(session: Session, config: Config) -> list[tuple[str, Assessment]]:
    """LOST and AT RISK packages, worst first. Only packages marked LOST or with a CORRUPT
    copy can be in danger (every check that finds a bad copy marks it), so this stays cheap."""
    # Each side by its partial index (a plain OR would read every package ever made).
    lost_or_corrupt: CompoundSelect[tuple[int]] = union(
        select(RawDataPackage.id).where(RawDataPackage.state == PackageState.LOST),
        select(PackageCopy.package_id).where(PackageCopy.status == CopyStatus.CORRUPT))
    candidates = session.scalars(select(RawDataPackage).where(
        RawDataPackage.id.in_(lost_or_corrupt)).order_by(RawDataPackage.name)).all()
    found = [(p.name, assess(session, config, p)) for p in candidates]
    danger = [(name, a) for name, a in found if a.health != Health.SAFE]
    return sorted(danger, key=lambda item: item[1].health != Health.LOST)
