"""Recovery paths for packages stuck at the observatory: a corrupt buffer tar rebuilt from its
intact raw files, and a raw file an operator takes out of its package (`ccat-dt exclude`) so
the rest can be rebuilt and go.

Both only apply before the package has left the observatory: after that its archive copies are
the package, and a bad copy there is repaired from another archive (the repair sensor)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataFile,
    RawDataPackage,
    utcnow,
)
from ccat_dt.routing import copies_at, has_left_observatory


class ExcludeRefused(Exception):
    """The file cannot be taken out (unknown, already out, or its package already left the
    observatory); nothing was changed."""


@dataclass(frozen=True)
class Rebuild:
    """A package to build again at the observatory, and the run key of that attempt (a new
    cause, a new key)."""

    package: str
    run_key: str
    reason: str


def _sources_present(package: RawDataPackage) -> bool:
    """Every raw file still filed at its source (the build re-hashes each against its
    recorded checksum: a changed one fails it, and the package is quarantined)."""
    return bool(package.files) and all(
        any(c.status == CopyStatus.PRESENT for c in f.copies) for f in package.files)


def needs_rebuild(session: Session, config: Config, package: RawDataPackage) -> str | None:
    """Why the package must be built again now, or None: built once, no verified copy left
    anywhere, nothing sent out, its tar at the observatory found corrupt, raw files at the
    source; or planned again after a file was taken out of it."""
    if package.state in (PackageState.FAILED, PackageState.LOST, PackageState.ARCHIVED):
        return None
    if package.checksum is None:
        excluded = session.scalar(select(func.count()).select_from(RawDataFile).where(
            RawDataFile.excluded_from == package.name))
        return "a file was taken out of it; built without it" if excluded else None
    if any(c.is_verified for c in package.copies) or has_left_observatory(session, config,
                                                                           package):
        return None
    corrupt = [c for c in copies_at(session, package, LocationType.BUFFER,
                                    config.settings.observatory)
               if c.status == CopyStatus.CORRUPT]
    if not corrupt or not _sources_present(package):
        return None
    return (f"its tar at {corrupt[-1].location.label} is corrupt (copy {corrupt[-1].id}); "
            "rebuilt from the raw files, re-hashed against their filed checksums")


def rebuilds_due(session: Session, config: Config, limit: int) -> list[Rebuild]:
    """Packages to rebuild: those with a corrupt observatory tar and those with a file taken
    out, each keyed by its newest cause."""
    candidates = set(session.scalars(
        select(RawDataPackage.name).join(PackageCopy, PackageCopy.package_id
                                         == RawDataPackage.id)
        .join(DataLocation, PackageCopy.location_id == DataLocation.id)
        .where(PackageCopy.status == CopyStatus.CORRUPT,
               DataLocation.location_type == LocationType.BUFFER)
        .limit(limit)))
    candidates |= set(session.scalars(select(RawDataFile.excluded_from).where(
        RawDataFile.excluded_from.is_not(None)).distinct().limit(limit)))
    out = []
    for name in sorted(n for n in candidates if n):
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        if package is None or (reason := needs_rebuild(session, config, package)) is None:
            continue
        newest_copy = max((c.id for c in package.copies), default=0)
        newest_exclusion = session.scalar(select(func.max(RawDataFile.id)).where(
            RawDataFile.excluded_from == name)) or 0
        out.append(Rebuild(name, f"rebuild:{name}:{newest_copy}:{newest_exclusion}", reason))
    return out


@dataclass(frozen=True)
class Excluded:
    path: str
    package: str | None
    rebuild: bool  # the package is built again without it


def exclude_file(opsdb: OpsDB, config: Config, what: str, *, reason: str,
                 by: str) -> Excluded:
    """Take a raw file (id, path relative to its source root, or absolute path) out of its
    package, recorded with who, when and why. The file itself stays where it is, filed, and
    is never deleted by the purge; it is never packaged again. The package, if it has not left
    the observatory, is built again without it (its old tar is quarantined and replaced)."""
    # Imported here: `why` reads needs_rebuild from this module and builds no package.
    from ccat_dt.failover import transfer_under_way
    from ccat_dt.packages import lock_package

    if not reason.strip():
        raise ExcludeRefused("give a reason: --reason \"...\" (it is recorded)")
    with opsdb.session() as session:
        raw = _find(session, what)
        if raw.excluded_at is not None:
            raise ExcludeRefused(f"{raw.relative_path} was already taken out of "
                                 f"{raw.excluded_from or 'its package'} on "
                                 f"{raw.excluded_at:%Y-%m-%d %H:%M} by {raw.excluded_by}: "
                                 f"{raw.excluded_reason}")
        package = raw.package
        if package is not None:
            lock_package(session, package.name)
            session.refresh(package)
            if package.state == PackageState.ARCHIVED or has_left_observatory(
                    session, config, package):
                raise ExcludeRefused(
                    f"package {package.name} has already left the observatory "
                    f"({package.state.value}): its tar is archived as it is, with "
                    f"{raw.relative_path}; nothing was changed")
            if transfer_under_way(session, package, utcnow(), config):
                raise ExcludeRefused(f"package {package.name} is being sent out of the "
                                     "observatory now; nothing was changed: run the command "
                                     "again once that transfer has ended")
            if len(package.files) == 1:
                raise ExcludeRefused(f"{raw.relative_path} is the only file of package "
                                     f"{package.name}: nothing would be left to send; "
                                     "nothing was changed")
        now = utcnow()
        raw.excluded_at, raw.excluded_by, raw.excluded_reason = now, by, reason.strip()
        raw.excluded_from = package.name if package is not None else None
        raw.package = None
        if package is None:
            return Excluded(raw.relative_path, None, rebuild=False)
        session.flush()
        session.refresh(package)
        for copy in package.copies:  # the tar holds the file: not the package any more
            if copy.status in (CopyStatus.PRESENT, CopyStatus.STAGED):
                copy.status = CopyStatus.CORRUPT
                session.add(Operation(
                    operation_type=OperationType.VERIFICATION, status=OperationStatus.FAILED,
                    package=package, copy_id=copy.id, destination_location_id=copy.location_id,
                    started_at=now, finished_at=now,
                    error=f"superseded: {raw.relative_path} taken out of the package by {by} "
                          f"({reason.strip()}); rebuilt without it"))
        if package.checksum is None:
            package.state = PackageState.PLANNED
        elif package.state == PackageState.FAILED:
            package.state = PackageState.WAITING
        return Excluded(raw.relative_path, package.name, rebuild=True)


def _find(session: Session, what: str) -> RawDataFile:
    if what.isdigit():
        found = session.get(RawDataFile, int(what))
        if found is not None:
            return found
    matches = list(session.scalars(select(RawDataFile).where(RawDataFile.relative_path == what)))
    if not matches and Path(what).is_absolute():
        for location in session.scalars(select(DataLocation).where(
                DataLocation.location_type == LocationType.SOURCE)):
            if Path(what).is_relative_to(location.root):
                matches += session.scalars(select(RawDataFile).where(
                    RawDataFile.source_location_id == location.id,
                    RawDataFile.relative_path == Path(what).relative_to(location.root)
                    .as_posix()))
    if not matches:
        raise ExcludeRefused(f"no filed raw file {what!r} (give its id, its path relative to "
                             "the source root, or its absolute path)")
    if len(matches) > 1:
        ids = ", ".join(str(m.id) for m in matches)
        raise ExcludeRefused(f"{what!r} names several filed files (ids {ids}): give the id")
    return matches[0]
