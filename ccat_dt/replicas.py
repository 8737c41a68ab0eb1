"""Copies of a package at archive sites: placing them, verifying them, and what they add up to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session

from ccat_dt.checksums import ChecksumMismatch, hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    RawDataPackage,
    utcnow,
)
from ccat_dt.packages import get_package, package_path
from ccat_dt.references import CopyRef, Placement
from ccat_dt.routing import copies_at, replication_source
from ccat_dt.topology import primary_location
from ccat_dt.transports.base import Endpoint, TransferError
from ccat_dt.transports.local import transport_for


class NotReady(Exception):
    """The placement's prerequisites are not in OpsDB yet (e.g. no verified source copy)."""


def plan_placement(opsdb: OpsDB, config: Config, package: str, site: str,
                   kind: LocationType) -> Placement:
    """Pick the verified copy a site's buffer (from routing) or LTA (from its buffer) copies."""
    with opsdb.session() as session:
        pkg = get_package(session, package)
        if kind == LocationType.LONG_TERM_ARCHIVE:
            source = verified_copy(session, pkg, site, LocationType.BUFFER)
        else:
            source = replication_source(session, config, pkg, site)
        if source is None:
            raise NotReady(f"package {package}: no verified copy to send to {site} yet")
        return Placement(package=package, site=site, source=CopyRef.of(source))


def place(opsdb: OpsDB, config: Config, placement: Placement, kind: LocationType, *,
          run_id: str | None = None, attempt: int = 0) -> CopyRef:
    """Copy the package to the site's location of `kind`, verify it, record it.

    Idempotent: an existing verified copy there is returned untouched. LTA copies are
    re-read after they are written; buffer copies are verified in the transfer pass.
    """
    source = placement.source
    with opsdb.session() as session:
        package = get_package(session, placement.package)
        existing = verified_copy(session, package, placement.site, kind)
        if existing is not None:
            return CopyRef.of(existing)
        destination = primary_location(session, placement.site, kind)
        route = config.settings.route(source.site, placement.site)
        transport = transport_for(route.transport if route else "local")
        origin = session.get_one(PackageCopy, source.copy_id)
        if not origin.is_verified:
            raise NotReady(f"package {placement.package}: source copy {source.site}/"
                           f"{source.location} is no longer verified ({origin.status.value})")
        operation = Operation(
            operation_type=(OperationType.ARCHIVE if kind == LocationType.LONG_TERM_ARCHIVE
                            else OperationType.TRANSFER),
            package=package, source_location_id=origin.location_id,
            destination_location_id=destination.id, transport=transport.name,
            retry_count=attempt, run_id=run_id)
        session.add(operation)
        relative = package_path(package)
        target = Path(destination.root) / relative
    try:
        result = transport.copy(Endpoint(PurePosixPath(source.path)),
                                Endpoint(PurePosixPath(target)), source.checksum)
        if kind == LocationType.LONG_TERM_ARCHIVE:
            actual, _ = hash_file(target)
            if actual != source.checksum:
                raise ChecksumMismatch(target, source.checksum, actual)
    except (TransferError, ChecksumMismatch, OSError) as exc:
        finish(opsdb, operation.id, error=str(exc))
        raise
    with opsdb.session() as session:
        package = get_package(session, placement.package)
        now = utcnow()
        for stale in copies_at(session, package, kind, placement.site):
            if stale.status == CopyStatus.CORRUPT:  # overwritten by this repair
                stale.status, stale.deleted_at = CopyStatus.DELETED, now
        copy = PackageCopy(package=package, location_id=destination.id, relative_path=relative,
                           size=result.bytes, checksum=result.checksum, created_at=now,
                           verified_at=utcnow())
        session.add(copy)
        session.flush()
        finish_in(session, operation.id, copy_id=copy.id, nbytes=result.bytes,
                  seconds=result.seconds)
        refresh_state(session, config, package)
        return CopyRef.of(copy)


@dataclass(frozen=True)
class Verification:
    passed: bool
    description: str
    copy_id: int | None
    path: str | None


def verify(opsdb: OpsDB, package: str, site: str, kind: LocationType) -> Verification:
    """Re-read the newest copy at the site's location of `kind` against the package checksum.

    A mismatch marks the copy CORRUPT, which blocks every purge of the package.
    """
    with opsdb.session() as session:
        pkg = get_package(session, package)
        copies = [c for c in copies_at(session, pkg, kind, site)
                  if c.status in (CopyStatus.PRESENT, CopyStatus.CORRUPT)]
        if not copies:
            return Verification(False, f"no copy of {package} at {site} {kind.value}", None, None)
        copy = copies[-1]
        path = Path(copy.location.root) / copy.relative_path
        operation = Operation(operation_type=OperationType.VERIFICATION, package=pkg,
                              copy_id=copy.id, destination_location_id=copy.location_id)
        session.add(operation)
    try:
        actual, size = hash_file(path)
        problem = None if actual == pkg.checksum else (
            f"checksum mismatch: expected {pkg.checksum}, read {actual}")
    except OSError as exc:
        size, problem = 0, f"cannot read {path}: {exc}"
    with opsdb.session() as session:
        stored = session.get_one(PackageCopy, copy.id)
        if problem is None:
            stored.verified_at = utcnow()
        elif stored.status == CopyStatus.PRESENT:
            stored.status = CopyStatus.CORRUPT
        finish_in(session, operation.id, copy_id=copy.id, nbytes=size, seconds=None,
                  error=problem)
    where = f"{site}/{copy.location.name}"
    return Verification(problem is None, f"{where}: {problem or 'checksum matches'}",
                        copy.id, str(path))


def verified_copy(session: Session, package: RawDataPackage, site: str,
                  kind: LocationType) -> PackageCopy | None:
    return next((c for c in copies_at(session, package, kind, site) if c.is_verified), None)


def refresh_state(session: Session, config: Config, package: RawDataPackage) -> None:
    """Derive the package state from its verified copies (never from what a step believes)."""
    lta_sites = {c.location.site.short_name
                 for c in copies_at(session, package, LocationType.LONG_TERM_ARCHIVE)
                 if c.is_verified}
    if len(lta_sites) >= config.settings.required_lta_copies:
        if package.state != PackageState.ARCHIVED:
            package.state, package.archived_at = PackageState.ARCHIVED, utcnow()
    elif package.state in (PackageState.WAITING, PackageState.ARCHIVED):
        package.state = PackageState.TRANSFERRING


def finish(opsdb: OpsDB, operation_id: int, *, error: str | None = None) -> None:
    with opsdb.session() as session:
        finish_in(session, operation_id, copy_id=None, nbytes=None, seconds=None, error=error)


def finish_in(session: Session, operation_id: int, *, copy_id: int | None, nbytes: int | None,
              seconds: float | None, error: str | None = None) -> None:
    operation = session.get_one(Operation, operation_id)
    operation.status = OperationStatus.FAILED if error else OperationStatus.COMPLETED
    operation.error, operation.finished_at = error, utcnow()
    if copy_id is not None:
        operation.copy_id = copy_id
    if nbytes is not None:
        operation.bytes = nbytes
    if seconds is not None:
        operation.duration_s = seconds

