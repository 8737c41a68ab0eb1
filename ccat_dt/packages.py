"""Raw data packages: which files go together (planning) and building the tar at the buffer."""

from __future__ import annotations

import errno
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dt import claims
from ccat_dt.checksums import ALGORITHM, ChecksumMismatch
from ccat_dt.config import Config
from ccat_dt.diskstate import inodes_out_here
from ccat_dt.health import is_healthy, location_failure, mark_failed, mark_ok
from ccat_dt.marker import root_problem
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    ExecutedObsUnit,
    LocationType,
    ObservationStatus,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataFile,
    RawDataPackage,
    utcnow,
)
from ccat_dt.progress import labelled
from ccat_dt.references import CopyRef
from ccat_dt.routing import copies_at, has_left_observatory, next_primary_site
from ccat_dt.tarball import (
    BuiltPackage,
    PackageMember,
    PackagingError,
    build_package,
    split_into_packages,
)
from ccat_dt.topology import primary_location
from ccat_dt.transports.base import DENIED_ERRNO, denied_here, identity_at


class PackageBuildFailed(Exception):
    """The package cannot be built from what is on disk; retrying will not help."""


class SourceRefused(PackageBuildFailed):
    """A raw file refused to ccat-dt for lack of permission (mode 0600 of another user, a
    directory it cannot enter): retrying within the run cannot help, and the package is not
    quarantined for it; a person grants the permission (notify.py tells it), and the next
    automatic attempt reads the file."""


class TarTooLarge(PackageBuildFailed):
    """The tar is larger than the observatory buffer takes (EFBIG: its file system's largest
    file, or the file-size limit of the user writing it): retrying within the run cannot help,
    the buffer is not marked failing (smaller tars still go there) and the package is not
    quarantined; a person lifts the limit (notify.py tells it), and the next automatic attempt
    builds it."""


class BufferFailed(Exception):
    """The observatory buffer failed as a whole (unmounted, full, read-only, permission denied):
    `retryable` when another healthy buffer can take the next attempt at once; otherwise
    retrying within the run only repeats the fault (the re-attempt across runs takes over)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def package_name(observation: str, instrument: str, module: str, part: int) -> str:
    return f"{observation}_{instrument}-{module}_p{part:02d}"


LOG = logging.getLogger(__name__)


def plan_new_packages(opsdb: OpsDB, config: Config, *, dry_run: bool = False) -> list[str]:
    """plan_packages in a transaction of its own; the names planned (with `dry_run`, those
    that would be, nothing planned). Two planners at once (a
    daemon's package sensor beside a drive's) plan each file once: the one that commits second
    hits the unique index on (observation, module, part) and plans nothing this time (the
    first one's packages are the ones found next), instead of failing its tick."""
    try:
        with opsdb.session(undo=dry_run) as session:
            return [package.name for package in plan_packages(session, config)]
    except IntegrityError:
        LOG.info("another planner planned the same files at the same moment; nothing planned "
                 "here this time")
        return []


def plan_packages(session: Session, config: Config) -> list[RawDataPackage]:
    """Group the unpackaged files of finished observations into packages (one observation x
    module, split at the configured size) and pick each package's primary archive site."""
    files = session.scalars(
        select(RawDataFile).join(ExecutedObsUnit)
        .where(RawDataFile.package_id.is_(None), RawDataFile.excluded_at.is_(None),
               ExecutedObsUnit.status == ObservationStatus.FINISHED)
        .order_by(RawDataFile.observation_id, RawDataFile.module_id, RawDataFile.relative_path))
    groups: dict[tuple[int, int], list[RawDataFile]] = defaultdict(list)
    for raw_file in files:
        groups[(raw_file.observation_id, raw_file.module_id)].append(raw_file)
    planned = []
    for (observation_id, module_id), group in groups.items():
        by_path = {f.relative_path: f for f in group}
        members = [PackageMember(Path(f.relative_path), f.relative_path, f.size, f.checksum)
                   for f in group]
        parts = session.scalars(select(RawDataPackage.part).where(
            RawDataPackage.observation_id == observation_id,
            RawDataPackage.module_id == module_id)).all()
        next_part = max(parts, default=-1) + 1
        cap = config.settings.policies.package_max_bytes
        for offset, chunk in enumerate(split_into_packages(members, cap)):
            first = by_path[chunk[0].arcname]
            package = RawDataPackage(
                name=package_name(first.observation.name, first.module.instrument,
                                  first.module.name, next_part + offset),
                observation_id=observation_id, module_id=module_id, part=next_part + offset,
                primary_site=next_primary_site(session, config))
            session.add(package)
            session.flush()
            for member in chunk:
                by_path[member.arcname].package = package
            session.flush()
            planned.append(package)
            if chunk[0].size > cap:  # split_into_packages gives such a file a package alone
                LOG.warning(
                    "%s is %d bytes, more than policies.package_max_bytes (%d): it gets a "
                    "package of its own, %s, larger than the cap (files are never split)",
                    chunk[0].arcname, chunk[0].size, cap, package.name,
                    extra={"notice": True, "package": package.name, "bytes": chunk[0].size})
    return planned


def package_path(package: RawDataPackage) -> str:
    """Where the tar lives relative to any location root (the same at every hop)."""
    return str(PurePosixPath(package.observation.name) / f"{package.name}.tar")


def built_copy(session: Session, config: Config, package: RawDataPackage) -> PackageCopy | None:
    copies = copies_at(session, package, LocationType.BUFFER, config.settings.observatory)
    return next((c for c in copies if c.is_verified), None)


@dataclass(frozen=True)
class Built:
    """What materialising a package found or did: the copy it is read from next, and, when
    nothing was built, why (an operator's "Materialize" on a finished package)."""

    ref: CopyRef
    note: str  # "" when built now
    verified: tuple[str, ...]  # "site/location (verified <when>)" of every verified copy


def ensure_built(opsdb: OpsDB, config: Config, name: str, *,
                 run_id: str | None = None) -> Built:
    """Build the package unless it was built before. A package built before is never rebuilt
    from its sources (they may be purged after archiving): its verified copies are reported
    instead, and nothing in OpsDB changes. Without any verified copy left it is rebuilt
    (the tar is deterministic; a source that changed fails the build, and a package that was
    built once is never marked FAILED by that: its state follows its copies)."""
    with opsdb.session() as session:
        package = get_package(session, name)
        verified = [c for c in package.copies if c.is_verified]
        verified.sort(key=lambda c: (c.location.location_type != LocationType.BUFFER, c.id))
        listed = tuple(f"{c.location.site.short_name}/{c.location.name} (verified "
                       f"{c.verified_at:%Y-%m-%d %H:%M:%S})" for c in verified)
        if package.checksum is not None and verified:
            buffered = built_copy(session, config, package)
            note = ("already built" if buffered is not None else
                    "built before, its tar at the observatory purged after archiving: not rebuilt")
            return Built(CopyRef.of(buffered or verified[0]), note, listed)
    return Built(build(opsdb, config, name, run_id=run_id), "", listed)


def build(opsdb: OpsDB, config: Config, name: str, *, run_id: str | None = None) -> CopyRef:
    """Build the package's tar at the observatory buffer, reading each raw file once.

    Idempotent: a package already built and verified is returned as it is. A rebuild (its tar
    found corrupt, or a file taken out) goes where the bad tar is, so it replaces it there.
    A buffer that fails as a whole is marked unhealthy: the next attempt uses the next buffer.
    """
    with opsdb.session() as session:
        package = get_package(session, name)
        existing = built_copy(session, config, package)
        if existing is not None:
            return CopyRef.of(existing)
        buffer = _build_location(session, config, package)
        buffer_label = buffer.label
        members = [PackageMember(Path(f.source_location.root) / f.relative_path,
                                 f.relative_path, f.size, f.checksum) for f in package.files]
        sources = {f.source_location.root: (f.source_location.id, f.source_location.label)
                   for f in package.files}
        destination = Path(buffer.root) / package_path(package)
        quarantined_there = any(  # the bad tar a rebuild replaces
            c.status == CopyStatus.CORRUPT and c.location_id == buffer.id
            and c.relative_path == package_path(package) for c in package.copies)
        rebuilding = (package.checksum is not None and not any(c.is_verified
                                                               for c in package.copies)
                      and not has_left_observatory(session, config, package))
        operation = Operation(operation_type=OperationType.PACKAGING, package=package,
                              destination_location_id=buffer.id, run_id=run_id)
        claims.hold(operation)  # its process, so that `audit` tells its tar from a stray file
        session.add(operation)
    started = time.monotonic()
    try:
        if problem := root_problem(Path(buffer.root)):  # never build onto an unmounted disk
            raise OSError(problem)
        # the bad tar a rebuild replaces, as it lies there now: only that file is replaced
        replaces = identity_at(str(destination)) if quarantined_there else None
        with labelled(site=config.settings.observatory), claims.holding(opsdb, [operation.id]):
            built = build_package(members, destination, package_name=name, replaces=replaces)
    except (PackagingError, ChecksumMismatch) as exc:
        _fail(opsdb, operation.id, package_id=package.id, error=str(exc), quarantine=rebuilding)
        raise PackageBuildFailed(f"package {name}: {exc}") from exc
    except OSError as exc:
        source = next((at for root, at in sources.items() if exc.filename is not None
                       and str(exc.filename).startswith(f"{root.rstrip('/')}/")), None)
        if source is not None and exc.errno in DENIED_ERRNO:  # nor the source disk's fault
            error = f"packaging {name}: " + denied_here(exc.filename,
                                                        f"{exc.filename} at {source[1]}")
            _fail(opsdb, operation.id, package_id=None, error=error)
            raise SourceRefused(error) from exc
        if source is not None:  # a source file its disk failed to read: not the buffer's fault
            error = (f"packaging {name}: cannot read source file {exc.filename} at "
                     f"{source[1]}: {exc.strerror or exc}")
            _fail(opsdb, operation.id, package_id=None, error=error)
            if location_failure(exc):
                mark_failed(opsdb, config, source[0], error)
            raise OSError(exc.errno, error) from exc  # retried: a read error may pass
        if exc.errno == errno.EFBIG:
            error = (f"packaging {name} at {buffer_label} ({buffer.root}): {exc.strerror or exc}"
                     ": the tar is larger than that disk, or the user writing it, takes")
            _fail(opsdb, operation.id, package_id=None, error=error)
            raise TarTooLarge(error) from exc
        # Where: a write that fails mid-tar (a disk filling) names no file of its own; "no
        # space" with bytes free: what the disk lacks, which `df -h` does not show.
        lack = inodes_out_here(Path(buffer.root)) if exc.errno == errno.ENOSPC else ""
        said = f"{exc}; {lack}" if lack else str(exc)
        _fail(opsdb, operation.id, package_id=None,
              error=f"packaging at {buffer_label} ({buffer.root}): {said}")
        if location_failure(exc) and (exc.filename is None
                                      or str(exc.filename).startswith(buffer.root)):
            mark_failed(opsdb, config, buffer.id, f"packaging {name}: {said}")
            with opsdb.session() as session:
                alternative = primary_location(session, config.settings.observatory,
                                               LocationType.BUFFER)
                elsewhere = alternative.id != buffer.id and is_healthy(alternative, utcnow())
            raise BufferFailed(f"packaging {name} at {buffer_label} ({buffer.root}): "
                               f"{exc.strerror or exc}" + (f"; {lack}" if lack else "") + (
                                   f"; the next attempt builds it at {alternative.label}"
                                   if elsewhere else ""), retryable=elsewhere) from exc
        raise
    with opsdb.session() as session:
        for location_id in [buffer.id, *(at[0] for at in sources.values())]:
            mark_ok(session, location_id)  # every byte written there, every source read
        recorded = _record_built(session, name, built, buffer.id, operation.id,
                                 time.monotonic() - started)
        ref = CopyRef.of(recorded)
        stale = not recorded.is_verified
    if stale:  # committed as quarantined: the retry builds it again, over this tar
        raise OSError(f"package {name}: its files changed while it was built (a file taken "
                      "out of it): the tar is quarantined and built again")
    return ref


def _build_location(session: Session, config: Config, package: RawDataPackage) -> DataLocation:
    """Where the package's bad tar is (a rebuild replaces it in place, so no stale tar stays
    under the package's name), when that buffer is healthy; else the buffer routing picks."""
    now = utcnow()
    for copy in copies_at(session, package, LocationType.BUFFER, config.settings.observatory):
        if copy.status == CopyStatus.CORRUPT and is_healthy(copy.location, now):
            return copy.location
    return primary_location(session, config.settings.observatory, LocationType.BUFFER)


def _record_built(session: Session, name: str, built: BuiltPackage, buffer_id: int,
                  operation_id: int, seconds: float) -> PackageCopy:
    lock_package(session, name)
    package = get_package(session, name)
    now = utcnow()
    operation = session.get_one(Operation, operation_id)
    operation.status, operation.finished_at = OperationStatus.COMPLETED, now
    operation.bytes, operation.duration_s = built.size, seconds
    supersede(session, operation)
    earlier = next((c for c in package.copies if c.location_id == buffer_id and c.is_verified),
                   None)
    if earlier is not None:  # a concurrent run of this step built and recorded it first
        if earlier.checksum != built.checksum:  # tars are deterministic: should never happen
            operation.status = OperationStatus.FAILED
            operation.error = (f"built concurrently by another run as {earlier.checksum}; this "
                               f"build ({built.checksum}) replaced that file, so the recorded "
                               "copy is checked (and found corrupt) next")
        return earlier
    if sorted(e.path for e in built.manifest) != sorted(f.relative_path for f in package.files):
        # A file was taken out (`ccat-dt exclude`) after this build read the members: the tar
        # is not the package. Recorded quarantined where it lies, so the rebuild replaces it.
        operation.status = OperationStatus.FAILED
        operation.error = ("the package's files changed while it was built (a file taken out "
                           "of it): this tar is quarantined and the package built again")
        tar = built.path.stat()
        stale = PackageCopy(package=package, location_id=buffer_id,
                            relative_path=package_path(package), size=built.size,
                            checksum=built.checksum, status=CopyStatus.CORRUPT, created_at=now,
                            inode=tar.st_ino, mtime_ns=tar.st_mtime_ns)
        session.add(stale)
        session.flush()
        return stale
    if package.checksum not in (None, built.checksum):  # rebuilt: the member mtimes changed
        operation.reason = (f"rebuilt; the package checksum changed from {package.checksum} "
                            f"to {built.checksum} (no verified copy of the old bytes existed)")
    package.size, package.checksum, package.adler32 = built.size, built.checksum, built.adler32
    package.checksum_algorithm = ALGORITHM
    package.manifest = {"files": [{"path": e.path, "size": e.size, "checksum": e.checksum}
                                  for e in built.manifest]}
    package.state, package.built_at = PackageState.WAITING, now
    for raw in package.files:  # identities confirmed by this read of the filed bytes
        for source in raw.copies:
            found = built.identities.get(str(Path(source.location.root) / source.relative_path))
            if found and source.status == CopyStatus.PRESENT:
                source.inode, source.mtime_ns = found
    tar = built.path.stat()
    copy = PackageCopy(package=package, location_id=buffer_id, relative_path=package_path(package),
                       size=built.size, checksum=built.checksum, status=CopyStatus.PRESENT,
                       created_at=now, verified_at=now, inode=tar.st_ino,
                       mtime_ns=tar.st_mtime_ns)
    session.add(copy)
    session.flush()
    operation.copy_id = copy.id  # the build read the tar back: the copy's verification
    for bad in package.copies:  # the corrupt (or superseded) tar this build overwrote
        if (bad.id != copy.id and bad.location_id == buffer_id and bad.status
                == CopyStatus.CORRUPT and bad.relative_path == copy.relative_path):
            overwritten(session, package, bad, f"rebuilt copy {copy.id}", copy.id, now)
    return copy


def _fail(opsdb: OpsDB, operation_id: int, *, package_id: int | None, error: str,
          quarantine: bool = False) -> None:
    """Record a failed build. A package never built is FAILED (quarantined); so is one being
    rebuilt with nothing verified left and nothing sent out (`quarantine`). Otherwise a built
    package's state follows its copies, not this."""
    with opsdb.session() as session:
        operation = session.get_one(Operation, operation_id)
        operation.status, operation.error, operation.finished_at = (
            OperationStatus.FAILED, error, utcnow())
        package = session.get(RawDataPackage, package_id) if package_id is not None else None
        if package is not None and (package.checksum is None or quarantine):
            package.state = PackageState.FAILED


def lock_package(session: Session, name: str) -> None:
    """Make `name`'s row the transaction's first write: concurrent transactions that do the
    same wait here for each other (SQLite: the database write lock, taken before this
    transaction reads anything; PostgreSQL: the row lock), so what they read next is final.
    Recording a new copy does this first, so two runs of one step record one copy."""
    session.execute(update(RawDataPackage).where(RawDataPackage.name == name)
                    .values(state=RawDataPackage.state)
                    .execution_options(synchronize_session=False))


def supersede(session: Session, operation: Operation) -> None:
    """Close the other attempts at what `operation` just recorded (same package, kind and
    destination) that never finished: their process died (killed, or its OpsDB write failed)
    and the copy now exists. A racer still running overwrites this when it finishes."""
    session.execute(update(Operation).where(
        Operation.package_id == operation.package_id,
        Operation.operation_type == operation.operation_type,
        Operation.destination_location_id == operation.destination_location_id,
        Operation.status == OperationStatus.IN_PROGRESS, Operation.id != operation.id)
        .values(status=OperationStatus.FAILED, finished_at=utcnow(),
                error=f"never finished (its process died?); superseded by operation "
                      f"{operation.id}, which recorded the copy")
        .execution_options(synchronize_session=False))


def not_the_package(package: RawDataPackage, copy: PackageCopy) -> str | None:
    """Why a copy of the package, however intact its bytes, is not the package now (None
    when it is): a tar of another build (its checksum is not the package's: one quarantined
    because a file was taken out while it was built, or one a rebuild replaced), or the tar
    from before a file was taken out (`ccat-dt exclude`: its manifest lists a file the package
    no longer has). Such a copy stays CORRUPT whatever a re-read or an audit finds in it: only
    the rebuild replaces it."""
    if copy.checksum != package.checksum:
        return (f"copy {copy.id} is the tar of another build ({copy.checksum}; the package is "
                f"{package.checksum or 'not built yet'}): it stays quarantined")
    listed = (package.manifest or {}).get("files")
    if listed is not None and sorted(e["path"] for e in listed) != sorted(
            f.relative_path for f in package.files):
        return (f"copy {copy.id} holds the package as built before a file was taken out of "
                "it: it stays quarantined until the package is built again")
    return None


def overwritten(session: Session, package: RawDataPackage, old: PackageCopy, by: str,
                new_id: int, now: datetime) -> None:
    """Record a copy whose file a new copy replaced in place (a rebuild, a repair): DELETED,
    with the deletion operation saying what superseded it, so certificates stay explained."""
    old.status, old.deleted_at = CopyStatus.DELETED, now
    session.add(Operation(
        operation_type=OperationType.DELETION, status=OperationStatus.COMPLETED,
        package=package, copy_id=old.id, source_location_id=old.location_id,
        reason=f"superseded by {by}", started_at=now, finished_at=now,
        evidence={"superseded_by": new_id}))


def get_package(session: Session, name: str) -> RawDataPackage:
    package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
    if package is None:
        raise LookupError(f"unknown package '{name}'")
    return package


def partition_problem(session: Session, config: Config, key: str, *,
                      per_site: bool) -> str | None:
    """Why `key`, a partition typed in by a person (run config from the Dagster UI's
    Launchpad), names no package OpsDB holds (`PACKAGE`), or no archive site of one
    (`PACKAGE|SITE`: the partitions' site dimension): "not PACKAGE|SITE", "no package X in
    OpsDB", ...; None when it names one."""
    shape = "PACKAGE|SITE" if per_site else "PACKAGE"
    parts = key.split("|")
    if len(parts) != shape.count("|") + 1 or not all(parts):
        return f"not {shape}"
    problems = []
    if session.scalar(select(RawDataPackage.id).where(RawDataPackage.name == parts[0])) is None:
        problems.append(f"no package {parts[0]} in OpsDB")
    sites = [site.short_name for site in config.settings.archive_sites]
    if per_site and parts[1] not in sites:
        problems.append(f"{parts[1]} is not an archive site (those are {', '.join(sites)})")
    return ", ".join(problems) or None


@dataclass(frozen=True)
class FiledFiles:
    """The raw files of one package as OpsDB records them at the source."""

    package: str
    count: int
    bytes: int
    locations: tuple[str, ...]


def filed_files(opsdb: OpsDB, name: str) -> FiledFiles:
    with opsdb.session() as session:
        files = get_package(session, name).files
        return FiledFiles(package=name, count=len(files), bytes=sum(f.size for f in files),
                          locations=tuple(sorted({f.source_location.label for f in files})))


@dataclass(frozen=True)
class SourceState:
    """The package's raw files at the source, as the raw_files_present check reports them."""

    problems: list[str]  # missing, or not of their filed size
    purged: int  # deleted after archiving (under certificates): not expected there any more
    files: int
    unmounted: list[str] = field(default_factory=list)  # source roots without their marker
    # files refused to ccat-dt for lack of permission: not judged changed (a person grants it)
    refused: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not (self.problems or self.unmounted or self.refused)

    def summary(self) -> str:
        if not self.passed:
            return "\n".join([*self.unmounted, *self.refused, *self.problems])
        if not self.purged:
            return "all present"
        return (f"{self.files - self.purged} present, {self.purged} purged after archiving "
                "(not expected at the source any more)")


def source_problems(opsdb: OpsDB, name: str) -> SourceState:
    """Raw files of the package that are missing at the source or differ in size from their
    filing (checksums are re-checked in the packaging pass, which reads every byte anyway).
    Files on a disk not mounted (no marker at its root) are not judged: it says nothing
    about them, and the disk comes back; nor files refused for lack of permission (a
    directory ccat-dt's user cannot enter), which a person makes readable (`refused`)."""
    problems, refused, purged, files = [], [], 0, 0
    unmounted: dict[str, str | None] = {}
    with opsdb.session() as session:
        for raw_file in get_package(session, name).files:
            files += 1
            if not any(c.status == CopyStatus.PRESENT for c in raw_file.copies):
                purged += 1  # already purged after archiving: not a problem of the source
                continue
            root = raw_file.source_location.root
            if root not in unmounted:
                unmounted[root] = root_problem(Path(root), raw_file.source_location.label)
            if unmounted[root] is not None:
                continue
            path = Path(root) / raw_file.relative_path
            try:
                size = path.stat().st_size
            except OSError as exc:
                if exc.errno in DENIED_ERRNO:  # a directory it cannot enter: not a change
                    refused.append(denied_here(path, f"{path} at "
                                                     f"{raw_file.source_location.label}"))
                else:
                    problems.append(f"{raw_file.relative_path}: {exc.strerror}")
                continue
            if size != raw_file.size:
                problems.append(f"{raw_file.relative_path}: {size} bytes on disk, "
                                f"{raw_file.size} filed")
    return SourceState(problems, purged, files,
                       [problem for problem in unmounted.values() if problem is not None],
                       refused)


def fail_unbuilt(opsdb: OpsDB, config: Config, name: str, found: SourceState) -> bool:
    """Record that an unbuilt package cannot be built from what is at the source, as build()
    records it when it finds the same: a failed packaging operation saying why, and, for
    files changed or missing, the package FAILED (nothing leaves; `ccat-dt why` shows the
    reason; a rebuild is an operator's decision); a source disk not mounted, or a file
    refused for lack of permission, is only this attempt's failure (the re-attempt looks
    again). For the raw_files_present check, which stops the run before build() does. So is
    a package whose rebuild is its only way on
    (built once, no verified copy left, none ever made outside the observatory: an OpsDB
    restored from a backup after its sources were purged), as build() quarantines it.
    Returns False (and changes nothing) for a package built that goes on from its copies,
    or without problems."""
    if found.passed:
        return False
    with opsdb.session() as session:
        package = get_package(session, name)
        if package.checksum is not None and (
                any(c.is_verified for c in package.copies)
                or has_left_observatory(session, config, package)):
            return False
        now = utcnow()
        error = ("source changed since filing: " + "; ".join(found.problems) if found.problems
                 else "source disk not mounted: " + "; ".join(found.unmounted) if found.unmounted
                 else "packaging: " + "; ".join(found.refused))
        session.add(Operation(operation_type=OperationType.PACKAGING, package=package,
                              status=OperationStatus.FAILED, started_at=now, finished_at=now,
                              error=error))
        if found.problems:
            package.state = PackageState.FAILED
    return True
