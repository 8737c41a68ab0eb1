"""Staging archived packages for processing: copied from the nearest verified LTA copy,
unpacked at a PROCESSING location, every file verified against the manifest. Staged files
stay while their request is active; once it is released or expires the purge cycle removes
them (the LTA copies are never touched)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt import claims
from ccat_dt.checksums import ChecksumMismatch, hash_file
from ccat_dt.config import Config
from ccat_dt.diskstate import inodes_out_here
from ccat_dt.health import (
    describe,
    mark_failed,
    mark_ok,
    mark_readable,
    mark_unreadable_source,
    unreachable,
    write_refused,
)
from ccat_dt.marker import MARKER, root_problem
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    ExecutedObsUnit,
    InstrumentModule,
    LocationType,
    Operation,
    OperationType,
    PackageCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    StagingRequest,
    StagingState,
    _aware,
    new_uuid,
    staging_reason,
    utcnow,
)
from ccat_dt.packages import lock_package
from ccat_dt.replicas import finish, finish_in, reread, source_down
from ccat_dt.retention import verified_lta_copies
from ccat_dt.routing import by_cost, readable_first
from ccat_dt.staged_files import clear_scratch, look_at_staged, scratch_names, through_symlink
from ccat_dt.tarball import ManifestEntry, extract_package
from ccat_dt.topology import UnknownLocation, get_location
from ccat_dt.transports.base import (
    SOURCE_MISSING,
    Endpoint,
    TransferError,
    rename_into_place,
)
from ccat_dt.transports.factory import endpoint, transport_for


class StagingError(Exception):
    """A staging request that cannot be made or acted on; nothing was changed."""


class SourceDown(StagingError):
    """The archive copy a staging read (`source_id`) could not be reached (replicas.source_down:
    its location is now passed over as a source); `next_id`: the verified copy nearest now,
    when it is another, tried at once (`_stage_package_from_any`)."""

    def __init__(self, message: str, *, source_id: int, next_id: int | None) -> None:
        super().__init__(message)
        self.source_id, self.next_id = source_id, next_id


@dataclass(frozen=True)
class Selection:
    observation: str | None = None
    module: str | None = None  # instrument/module
    since: datetime | None = None  # observation started at or after
    until: datetime | None = None  # observation started before
    packages: tuple[str, ...] = ()

    def __str__(self) -> str:
        """As the operator gave it: "observation 'obs-1', module 'chai/lfa'"."""
        parts = [f"{name} '{value}'" for name, value in (
            ("observation", self.observation), ("module", self.module),
            ("started since", self.since), ("started before", self.until)) if value]
        parts += [f"package '{name}'" for name in self.packages]
        return ", ".join(parts) or "everything"


LONGEST_EXPIRY = timedelta(days=3650)  # staged files are scratch, not a second archive


def request_staging(opsdb: OpsDB, *, location: str, selection: Selection,
                    expires_in: timedelta, requested_by: str = "",
                    config: Config | None = None) -> str:
    """Create a staging request; every selected package must already be archived. Given the
    `config` (the CLI's), a location it no longer has (OpsDB keeps a location taken out of
    the configuration) is refused: nothing would stage the request."""
    if not timedelta(0) < expires_in <= LONGEST_EXPIRY:
        raise StagingError(f"expiry must be in the future and at most "
                           f"{LONGEST_EXPIRY.total_seconds() / 3600:g} h (ten years), got "
                           f"{expires_in.total_seconds() / 3600:g} h")
    site, _, name = location.partition("/")
    if config is not None and not any(
            s.short_name == site and loc.name == name
            for s in config.settings.sites for loc in s.locations):
        raise StagingError(f"location '{location}' is not in the configuration "
                           f"{config.path}; give SITE/LOCATION of a processing location")
    with opsdb.session() as session:
        try:
            target = get_location(session, site, name)
        except UnknownLocation as exc:
            raise StagingError(f"{exc}; give SITE/LOCATION of a processing location") from None
        if target.location_type != LocationType.PROCESSING:
            raise StagingError(f"{location} is a {target.location_type.value} location; "
                               "staging targets a processing location")
        if target.host is not None:
            raise StagingError(f"{location} is on {target.host}: staging unpacks on the machine "
                               "that runs it, so run staging where the processing area is")
        packages = _select(session, selection)
        if not packages:
            raise StagingError(f"no package matches {selection}; `ccat-dt status` and "
                               "`ccat-dt why OBSERVATION` name them")
        unarchived = [p.name for p in packages if not verified_lta_copies(session, p)]
        if unarchived:
            raise StagingError("not archived yet (no verified LTA copy): "
                               + ", ".join(unarchived))
        now = utcnow()
        uid = new_uuid()
        session.add(StagingRequest(
            uuid=uid, name=f"stage-{uid[:8]}", location=target, packages=packages,
            requested_by=requested_by, selection=_describe(selection), created_at=now,
            expires_at=now + expires_in))
        return f"stage-{uid[:8]}"


def release(opsdb: OpsDB, name: str) -> StagingState:
    """The scientist is done: the next purge cycle removes the staged files. Returns the
    request's state before (releasing twice changes nothing)."""
    with opsdb.session() as session:
        request = get_request(session, name)
        before = request.state
        if before == StagingState.ACTIVE:
            request.state, request.released_at = StagingState.RELEASED, utcnow()
        root = Path(request.location.root)
    clear_scratch(root, name)  # a killed staging step's: none of the request runs again
    return before


@dataclass(frozen=True)
class Staged:
    request: str
    packages: int
    files: int
    bytes: int
    note: str = ""  # why nothing was staged (a request released or expired meanwhile)


def stage(opsdb: OpsDB, config: Config, name: str, *, run_id: str | None = None) -> Staged:
    """Unpack every package of the request at its processing location (idempotent): what is
    not there on the disk now, never recorded or since removed, is staged (again); a staged
    file changed since is kept, and the request fails with its name for a person."""
    files = nbytes = 0
    if ended := not_active(opsdb, name):  # released before its run came: not a failure
        with opsdb.session() as session:
            root = Path(get_request(session, name).location.root)
        clear_scratch(root, name)  # an earlier attempt's, killed
        return Staged(name, 0, 0, 0, note=ended)
    with opsdb.session() as session:
        package_names = [p.name for p in get_request(session, name).packages]
    changed: list[str] = []
    for package_name in package_names:
        try:
            count, size, kept = _stage_package_from_any(opsdb, config, name, package_name,
                                                        run_id)
        except Exception:
            if ended := not_active(opsdb, name):  # released meanwhile (its scratch taken)
                return Staged(name, 0, files, nbytes, note=f"stopped: {ended}")
            raise
        files, nbytes, changed = files + count, nbytes + size, changed + kept
        if ended := not_active(opsdb, name):  # released meanwhile: stage nothing more
            return Staged(name, 0, files, nbytes, note=f"stopped: {ended}")
    if changed:
        raise StagingError(
            f"{len(changed)} staged file(s) changed at the processing location since they "
            f"were staged: {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}. They "
            "are kept (their bytes are in no archive); move them away if their owner no "
            "longer needs them, then Materialize this partition (or `ccat-dt retry --package "
            f"{name}`) to stage them again")
    with opsdb.session() as session:
        get_request(session, name).staged_at = utcnow()
    return Staged(name, len(package_names), files, nbytes)


def not_active(opsdb: OpsDB, name: str) -> str:
    """Why a request's files are not (or no longer) wanted at its processing location; ""
    while it is active."""
    with opsdb.session() as session:
        request = get_request(session, name)
        if request.is_active(utcnow()):
            return ""
        return (f"staging request {name} is {request.state.value} (expires "
                f"{_aware(request.expires_at):%Y-%m-%d %H:%M} UTC): nothing to stage")


def staged_problems(opsdb: OpsDB, name: str) -> list[str]:
    """Staged files of an active request that are missing or differ from their filed
    checksum."""
    problems = []
    with opsdb.session() as session:
        request = get_request(session, name)
        copies = session.scalars(select(RawDataFileCopy).where(
            RawDataFileCopy.staging_request_id == request.id,
            RawDataFileCopy.status == CopyStatus.STAGED)).all()
        expected = sum(len(p.files) for p in request.packages)
        checks = [(Path(c.location.root) / c.relative_path, c.raw_data_file.checksum)
                  for c in copies]
    if len(checks) != expected:
        problems.append(f"{len(checks)} of {expected} files staged")
    for path, checksum in checks:
        try:
            actual, _ = hash_file(path)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        if actual != checksum:
            problems.append(f"{path}: checksum {actual}, filed {checksum}")
    return problems


def get_request(session: Session, name: str) -> StagingRequest:
    request = session.scalar(select(StagingRequest).where(StagingRequest.name == name))
    if request is None:
        raise StagingError(f"unknown staging request '{name}'")
    return request


def _stage_package_from_any(opsdb: OpsDB, config: Config, request_name: str,
                            package_name: str, run_id: str | None
                            ) -> tuple[int, int, list[str]]:
    """`_stage_package`, from the next archive's verified copy at once while the nearest one's
    location cannot be reached (SourceDown), without a person or a failed run; when no other
    can be read, the failure naming the source that is down (the re-attempt tries again).
    Each copy is tried once per call."""
    tried: set[int] = set()
    while True:
        try:
            return _stage_package(opsdb, config, request_name, package_name, run_id)
        except SourceDown as exc:
            tried.add(exc.source_id)
            if exc.next_id is None or exc.next_id in tried or not_active(opsdb, request_name):
                raise


def _stage_package(opsdb: OpsDB, config: Config, request_name: str, package_name: str,
                   run_id: str | None) -> tuple[int, int, list[str]]:
    """Stage the package's files that are not at the processing location now; returns the
    files and bytes staged, and the staged files found changed there (left as they are).
    One process at a time stages a package for a request (its claim)."""
    while True:
        with opsdb.session() as session:
            request = get_request(session, request_name)
            package = session.scalars(select(RawDataPackage).where(
                RawDataPackage.name == package_name)).one()
            staged = list(session.scalars(select(RawDataFileCopy).where(
                RawDataFileCopy.staging_request_id == request.id,
                RawDataFileCopy.status == CopyStatus.STAGED,
                RawDataFileCopy.raw_data_file_id.in_([f.id for f in package.files]))))
            damage = look_at_staged(staged, rehash=True)
            kept = [str(Path(c.location.root) / c.relative_path) for c in damage.changed]
            intact = {c.raw_data_file.relative_path for c in staged} - {
                c.raw_data_file.relative_path for c in damage.missing + damage.changed}
            lost = {c.raw_data_file.relative_path: c.id for c in damage.missing}
            wanted = {f.relative_path for f in package.files} - intact - {
                c.raw_data_file.relative_path for c in damage.changed}
            if not wanted:
                return 0, 0, kept
            site = request.location.site.short_name
            source = _nearest(session, config, package, site)
            if source is None:
                raise StagingError(f"{package_name}: no verified LTA copy to stage from")
            # The claim: the package's row locked after the look (which may hash files), so
            # what is read from here on is final until this transaction commits. Another
            # process staging it for this request (a Materialize beside the sensor's run), or
            # one that staged files since the look: wait for it, then look again. Before, both
            # removed each other's scratch and each recorded every file it took as staged.
            lock_package(session, package_name)
            other = claims.live_claim(session, package.id, request.location_id,
                                      kinds=(OperationType.STAGING,),
                                      reason=staging_reason(request_name))
            busy = other.id if other is not None else None
            if other is None and _identities(session, request.id, package) == {
                    (c.id, c.inode, c.mtime_ns) for c in staged}:
                root = Path(request.location.root)
                directory = PurePosixPath(request_name) / package_name
                # Scratch names a processing job does not use for its own files.
                tar, scratch = scratch_names(root, request_name, package_name)
                origin = endpoint(source.location, source.relative_path)
                route = config.settings.route(source.location.site.short_name, site)
                transport = transport_for(config, route, remote=origin.host is not None,
                                          store=origin.store is not None)
                operation = Operation(operation_type=OperationType.STAGING, package=package,
                                      source_location_id=source.location_id,
                                      destination_location_id=request.location_id, run_id=run_id,
                                      reason=staging_reason(request_name))
                claims.hold(operation)
                session.add(operation)
                files = {f.relative_path: f for f in package.files}
                checksum, location_id = package.checksum or "", request.location_id
                request_id = request.id
                where = request.location.label
                source_id, source_label = source.id, source.location.label
                source_location_id = source.location_id
                break
        if busy is not None:
            claims.wait_until_ended(opsdb, busy)
    started = time.monotonic()
    # Entries at their staged names, each with the identity its verified file had then: a job
    # writing into it before it is recorded must not have its bytes recorded as staged.
    moved: list[tuple[ManifestEntry, os.stat_result]] = []
    try:
        # An unmounted disk's bare mount point is not the processing area: nothing is written
        # there (the extraction would make the directories); the run fails, and its re-attempt
        # stages once the disk is back. The transport looks at the marker again as it writes.
        if problem := root_problem(root):
            raise StagingError(f"{problem}; nothing was written there")
        # The tar and the directory it is unpacked in are this step's scratch, removed below
        # (an earlier attempt's, killed, may be there): a file reaches its name only whole and
        # verified, so a disk that fills leaves nothing half-written under a staged name.
        tar.unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
        with claims.holding(opsdb, [operation.id]):  # in flight, as `audit` sees it
            transport.copy(origin, Endpoint(PurePosixPath(tar),
                                            marker=PurePosixPath(root / MARKER)), checksum)
            try:
                manifest = extract_package(tar, scratch, only=wanted)
                for entry in manifest:
                    relative = str(directory / entry.path)
                    if through_symlink(root, relative):  # never written outside the location
                        raise StagingError(
                            f"{package_name}: {root / relative} passes through a symlink or a "
                            f"non-directory at {where}; nothing is written through it: move it "
                            "away, then retry")
                    final = root / relative
                    final.parent.mkdir(parents=True, exist_ok=True)
                    verified = os.lstat(scratch / entry.path)  # as hashed; a rename keeps it
                    try:
                        rename_into_place(str(scratch / entry.path), str(final))
                    except FileExistsError:
                        # Taken since the look above (a job wrote there while the package
                        # travelled): kept unless it holds the archive's bytes (an earlier
                        # attempt's, renamed there before it was recorded).
                        there = _holds(final, entry)
                        if there is None:
                            kept.append(str(final))
                            continue
                        verified = there
                    moved.append((entry, verified))
            except OSError as exc:  # the processing disk full, say: its re-attempt, not this run's
                lack = inodes_out_here(root) if exc.errno == errno.ENOSPC else ""
                raise StagingError(f"{package_name}: unpacking at {where} failed: "
                                   f"{exc.strerror or exc} ({exc.filename or root})"
                                   + (f"; {lack}" if lack else "") + "; nothing of it was left "
                                   "there but what is recorded staged") from exc
    except Exception as exc:
        if moved:  # at their staged names, verified: on the record, so they are purged later
            with opsdb.session() as session:
                _record_staged(session, moved, files, lost, directory, location_id,
                               request_id)
        # The source's location looked at: one that cannot be (unreachable, unmounted,
        # refusing) is marked down and passed over; its copy is not judged (nor re-read).
        down = source_down(opsdb, config, source_id, f"staging {request_name}")
        moving_on = None if down is None else _moving_on(opsdb, config, package_name, site,
                                                         source_id, f"{exc}; the source {down}")
        finish(opsdb, operation.id, error=str(moving_on or exc))
        if write_refused(exc):  # for `status` and a person (notify.py) until a staging succeeds
            mark_failed(opsdb, config, location_id, f"staging {request_name}: {exc}")
        mark_unreadable_source(opsdb, config, source_id, str(origin.path), exc)
        if moving_on is not None:
            raise moving_on from exc
        said = str(exc).lower()
        if (isinstance(exc, ChecksumMismatch) or "checksum mismatch" in said
                or SOURCE_MISSING in said):
            # A bad or lost source, or a bad transit? The source re-hashed on its storage: a bad
            # or lost one is quarantined (its repair follows, or a person is told the package
            # is lost), and the next attempt stages from another copy. Before, a missing
            # source was tried again at every attempt, the other archive's copy never.
            try:
                check = reread(opsdb, config, source_id)
            except TransferError:  # its storage cannot be looked at now: not judged
                check = None
            if check is not None and not check.passed:
                raise StagingError(f"{exc}; the source {source_label} re-hashed on its "
                                   f"storage: {check.description}: quarantined; the next "
                                   "attempt stages from another archive copy") from exc
        raise
    finally:
        tar.unlink(missing_ok=True)  # the archive is not kept at processing: it saves space
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(e.size for e, _ in moved)
    with opsdb.session() as session:
        _record_staged(session, moved, files, lost, directory, location_id,
                       request_id)
        finish_in(session, operation.id, copy_id=None, nbytes=size,
                  seconds=time.monotonic() - started)
        mark_ok(session, location_id)
        mark_readable(session, source_location_id)  # read whole there: reached again
    return len(moved), size, kept


def _moving_on(opsdb: OpsDB, config: Config, package_name: str, site: str, source_id: int,
               failure: str) -> SourceDown:
    """What a staging whose source location is down (`failure` says which) does next: the
    nearest verified copy now (another archive's, or, every one down, the one passed over
    longest), or nothing but the re-attempt; naming the other archives down."""
    with opsdb.session() as session:
        package = session.scalars(select(RawDataPackage).where(
            RawDataPackage.name == package_name)).one()
        nearest, now = _nearest(session, config, package, site), utcnow()
        also = [describe(c.location) for c in verified_lta_copies(session, package)
                if c.id != source_id and unreachable(c.location, now)]
        every = nearest is not None and unreachable(nearest.location, now)
    next_id = nearest.id if nearest is not None and nearest.id != source_id else None
    then = ("no other archive holds a verified copy; the re-attempt stages once it is back"
            if next_id is None else "the next archive's verified copy is tried" if not every
            else "every archive holding a verified copy is marked down: each is tried again, "
            "the one down longest first, at every re-attempt until one is back")
    return SourceDown(f"{package_name}: {failure}: not judged, passed over as a source for now; "
                      + then + "".join(f"; also down: {text}" for text in also),
                      source_id=source_id, next_id=next_id)


def _identities(session: Session, request_id: int, package: RawDataPackage
                ) -> set[tuple[int, int | None, int | None]]:
    """The package's files recorded staged for the request, as OpsDB has them now."""
    return {(i, inode, mtime) for i, inode, mtime in session.execute(
        select(RawDataFileCopy.id, RawDataFileCopy.inode, RawDataFileCopy.mtime_ns).where(
            RawDataFileCopy.staging_request_id == request_id,
            RawDataFileCopy.status == CopyStatus.STAGED,
            RawDataFileCopy.raw_data_file_id.in_([f.id for f in package.files])))}


def _holds(path: Path, entry: ManifestEntry) -> os.stat_result | None:
    """The identity of the regular file at `path` if it holds the entry's bytes, read now
    (and was not written to while it was read), else None."""
    try:
        before = os.lstat(path)
        if not stat.S_ISREG(before.st_mode):
            return None
        actual, size = hash_file(path)
        after = os.lstat(path)
    except OSError:
        return None
    same = (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    return before if same and (actual, size) == (entry.checksum, entry.size) else None


def _record_staged(session: Session, entries: list[tuple[ManifestEntry, os.stat_result]],
                   files: dict[str, RawDataFile], lost: dict[str, int],
                   directory: PurePosixPath, location_id: int, request_id: int) -> None:
    """The files moved to their staged names, recorded STAGED (so the purge after the
    release removes them), even when the step stopped before its last file."""
    now = utcnow()
    for entry, info in entries:
        raw_file = files[entry.path]
        # Its identity as extracted and verified, not as a look now finds it (a job may have
        # written into it since): the purge after the release then knows an untouched file
        # without reading it again, and re-hashes (and keeps) a changed one.
        if entry.path in lost:  # staged before, removed since: its record, staged again
            copy = session.get_one(RawDataFileCopy, lost[entry.path])
            copy.verified_at, copy.inode, copy.mtime_ns = now, info.st_ino, info.st_mtime_ns
            continue
        session.add(RawDataFileCopy(
            raw_data_file_id=raw_file.id, location_id=location_id,
            relative_path=str(directory / entry.path), size=entry.size,
            checksum=entry.checksum, status=CopyStatus.STAGED, created_at=now,
            verified_at=now, staging_request_id=request_id, inode=info.st_ino,
            mtime_ns=info.st_mtime_ns))


def _nearest(session: Session, config: Config, package: RawDataPackage, site: str
             ) -> PackageCopy | None:
    """The verified LTA copy on the cheapest route to `site`, passing over one its disk failed
    to read as a source while another can be read (routing.readable_first)."""
    copies = verified_lta_copies(session, package)
    return readable_first(session, package, by_cost(config, copies, site))


def _select(session: Session, selection: Selection) -> list[RawDataPackage]:
    query = select(RawDataPackage).join(ExecutedObsUnit).join(InstrumentModule)
    if selection.observation:
        query = query.where(ExecutedObsUnit.name == selection.observation)
    if selection.module:
        instrument, _, module = selection.module.partition("/")
        query = query.where(InstrumentModule.instrument == instrument,
                            InstrumentModule.name == module)
    if selection.since:
        query = query.where(ExecutedObsUnit.started_at >= selection.since)
    if selection.until:
        query = query.where(ExecutedObsUnit.started_at < selection.until)
    if selection.packages:
        query = query.where(RawDataPackage.name.in_(selection.packages))
        found = set(session.scalars(select(RawDataPackage.name).where(
            RawDataPackage.name.in_(selection.packages))))
        missing = sorted(set(selection.packages) - found)
        if missing:
            raise StagingError("unknown package " + ", ".join(f"'{m}'" for m in missing)
                               + ": `ccat-dt status` and `ccat-dt why` name the packages")
    return list(session.scalars(query.order_by(RawDataPackage.id)))


def _describe(selection: Selection) -> dict[str, object]:
    return {"observation": selection.observation, "module": selection.module,
            "since": selection.since.isoformat() if selection.since else None,
            "until": selection.until.isoformat() if selection.until else None,
            "packages": list(selection.packages)}
