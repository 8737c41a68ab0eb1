"""Copies of a package at archive sites: placing them, verifying them, and what they add up to."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt import claims
from ccat_dt.checksums import ChecksumMismatch
from ccat_dt.config import Config, RouteConfig
from ccat_dt.health import (
    SOURCE_DOWN,
    is_healthy,
    location_failure,
    mark_failed,
    mark_ok,
    mark_readable,
    mark_unreadable_source,
)
from ccat_dt.loss import Health, refresh_loss
from ccat_dt.objectstore import Stores, is_object_root
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
    RawDataPackage,
    Site,
    StorageType,
    _aware,
    utcnow,
)
from ccat_dt.packages import (
    get_package,
    lock_package,
    not_the_package,
    overwritten,
    package_path,
    supersede,
)
from ccat_dt.progress import labelled
from ccat_dt.references import CopyRef, Placement
from ccat_dt.routing import (
    copies_at,
    nearest_lta_copy,
    readable_first,
    replication_source,
    unreadable_copies,
)
from ccat_dt.storage import StorageUnavailable, Wanted
from ccat_dt.topology import primary_location
from ccat_dt.transports.base import (
    FOREIGN_FILE,
    SOURCE_MISSING,
    Endpoint,
    Identity,
    TransferError,
    TransferResult,
    Transport,
)
from ccat_dt.transports.factory import endpoint, ssh_settings, transport_for
from ccat_dt.transports.remote import REMOTE_ARGUMENT_CHARS

log = logging.getLogger(__name__)


class NotReady(Exception):
    """The placement's prerequisites are not in OpsDB yet (e.g. no verified source copy)."""


class BadSource(TransferError):
    """The copy a transfer was sent from, found bad on its storage (re-hashed after the landed
    bytes mismatched, or gone) and quarantined: which copy it is (`check`: that re-read), so
    that the step can say so on that copy's own integrity check, which may have passed in this
    very run. Never retried: the copy is made again from intact data."""

    def __init__(self, message: str, *, package: str, site: str, kind: LocationType,
                 observatory: bool, check: Verification) -> None:
        super().__init__(message, retryable=False)
        self.package, self.site, self.kind = package, site, kind
        self.observatory, self.check = observatory, check


def plan_placement(opsdb: OpsDB, config: Config, package: str, site: str,
                   kind: LocationType) -> Placement:
    """Pick the verified copy a site's buffer or LTA copy is made from: the copy already there
    (place() re-reads it), else the nearest verified copy that can feed it (see `source_for`)."""
    with opsdb.session() as session:
        archived = verified_copy(session, get_package(session, package), site,
                                 LocationType.LONG_TERM_ARCHIVE) is not None
    if not archived:
        adopt_unrecorded(opsdb, config, package, site)
    with opsdb.session() as session:
        pkg = get_package(session, package)
        existing = verified_copy(session, pkg, site, kind)
        if existing is None and kind == LocationType.BUFFER:
            existing = archived_at(session, pkg, site)  # the buffer was only a way there
        if existing is not None:  # already there (by hand, a backfill, a race): place() re-reads it
            return Placement(package=package, site=site, source=CopyRef.of(existing))
        source = source_for(session, config, pkg, site, kind)
        if source is None:
            raise NotReady(f"package {package}: no verified copy to send to {site} yet: "
                           f"{not_ready_reason(session, config, pkg, site, kind)}; nothing "
                           "was copied (the sensors make it once its source is there)")
        return Placement(package=package, site=site, source=CopyRef.of(source))


def not_ready_reason(session: Session, config: Config, package: RawDataPackage, site: str,
                     kind: LocationType) -> str:
    """Why no copy can feed the package's copy at the site's location of `kind` yet (source_for
    found none), in the terms of the stages an operator sees: a "Materialize" clicked before
    its upstream is there says what it waits for, not only that it waits."""
    name = package.name
    if package.checksum is None:
        if package.state == PackageState.FAILED:
            return f"the package failed its packaging (`ccat-dt why {name}` says why)"
        return (f"the package is not built yet ({package.state.value}; packages {name} "
                "builds it)")
    primary = package.primary_site.short_name
    observatory = config.settings.observatory
    if kind == LocationType.LONG_TERM_ARCHIVE:
        return (f"an LTA copy is archived from the site's own buffer copy, and {site}'s buffer "
                f"holds no verified copy (site_copies {name}|{site} makes it), nor does any "
                "other archive site's LTA hold a verified copy to archive from")
    if site != primary and not any(c.is_verified for c in copies_at(
            session, package, LocationType.LONG_TERM_ARCHIVE)):
        return (f"a package leaves {observatory} once, for its primary archive site "
                f"{primary}; {site} receives it from a verified LTA copy at another archive "
                f"site, and none holds one yet (lta_copies {name}|{primary} makes the first)")
    return (f"no verified copy at {observatory}'s buffer to send, nor a verified LTA copy at "
            "another archive site (lost or quarantined: `ccat-dt why "
            f"{name}` says which)")


def adopt_unrecorded(opsdb: OpsDB, config: Config, package: str, site: str) -> list[str]:
    """The package's tar at its path in the site's long-term archive, where OpsDB records no
    copy of it (an OpsDB restored from a backup taken before it was archived there): hashed
    now, the package's own bytes are recorded as a verified copy, with a verification
    operation saying it was adopted, so it is never sent there again and the package goes on
    from it. Any other file there is left alone (the transfer's own look refuses it). Returns
    the labels of the locations whose copy was adopted."""
    with opsdb.session() as session:
        pkg = get_package(session, package)
        relative, expected = package_path(pkg), pkg.checksum
        recorded = {c.location_id for c in copies_at(session, pkg, LocationType.LONG_TERM_ARCHIVE)
                    if c.relative_path == relative and c.status != CopyStatus.DELETED}
        locations = [(loc.id, loc.label, loc.root, loc.host) for loc in session.scalars(
            select(DataLocation).join(Site).where(
                Site.short_name == site,
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            .order_by(DataLocation.priority.desc(), DataLocation.name))
            if loc.id not in recorded]
    if expected is None:
        return []  # never built: nothing to compare a file with
    adopted: list[str] = []
    for location_id, label, root, host in locations:
        try:
            [seen] = Stores.of(config).look(root, host, ssh_settings(config),
                                            [Wanted(relative, rehash=True)])
        except StorageUnavailable:
            continue  # nothing known there; the transfer's own look tells why
        if seen.problem is not None or seen.checksum != expected:
            continue
        with opsdb.session() as session:
            lock_package(session, package)
            pkg = get_package(session, package)
            if any(c.location_id == location_id and c.relative_path == relative
                   and c.status != CopyStatus.DELETED for c in pkg.copies):
                continue  # recorded meanwhile (a transfer of it there, another adoption)
            if any([claims.live_claim(session, pkg.id, where) for where in session.scalars(
                    select(DataLocation.id).join(Site).where(Site.short_name == site))]):
                continue  # a transfer there is going on (stale claims, a restored OpsDB's,
                # are closed on the way): it records what it landed
            now = utcnow()
            copy = PackageCopy(package=pkg, location_id=location_id, relative_path=relative,
                               size=seen.size or 0, checksum=expected, created_at=now,
                               verified_at=now, inode=seen.inode, mtime_ns=seen.mtime_ns)
            session.add(copy)
            session.flush()
            session.add(Operation(
                operation_type=OperationType.VERIFICATION, status=OperationStatus.COMPLETED,
                package=pkg, copy_id=copy.id, destination_location_id=location_id,
                bytes=copy.size, started_at=now, finished_at=now,
                reason=f"adopted: {label}/{relative} holds the package's bytes (hashed now: "
                       f"{expected}) but OpsDB recorded no copy there (restored from a "
                       "backup?); recorded as a verified copy, not sent again",
                evidence={"checksum": expected, "verified_by": "re-read",
                          "verified_at": now.isoformat()}))
            refresh_state(session, config, pkg)
        log.warning("package %s: copy at %s adopted (its bytes hashed to the package "
                    "checksum; OpsDB recorded none there)", package, label)
        adopted.append(label)
        break  # one copy per site is what the site needs
    return adopted


def source_for(session: Session, config: Config, package: RawDataPackage, site: str,
               kind: LocationType) -> PackageCopy | None:
    """The verified copy a new copy at the site's location of `kind` is made from: for an LTA
    copy the site's own buffer copy, else the nearest verified LTA copy at another archive
    (its buffer copy purged after archiving, or quarantined); for a buffer copy the routing
    rule (the observatory once, then archive to archive). A source its disk failed to read
    is passed over for the next readable one (routing.readable_first): for an LTA copy whose
    own buffer copy is such a one, the copy that would feed the site's buffer (routing.
    replication_source: the nearest LTA copy at another archive, else another archive's
    buffer copy, else, no archive holding one yet, the observatory's buffer copy)."""
    if kind == LocationType.LONG_TERM_ARCHIVE:
        own = verified_copy(session, package, site, LocationType.BUFFER)
        if own is None:  # purged after archiving, or quarantined
            return nearest_lta_copy(session, config, package, site)
        if own.id not in unreadable_copies(session, package):
            return own
        other = replication_source(session, config, package, site)
        return readable_first(session, package, [own] if other is None else [own, other])
    return replication_source(session, config, package, site)


# A buffer copy deleted, or being deleted: its certificate committed (reaper._claim marks the
# copy DELETION_IN_PROGRESS in the transaction that records the deletion and the verified LTA
# copies allowing it), its unlink under way or left for the next purge to finish.
PURGED = (CopyStatus.DELETED, CopyStatus.DELETION_IN_PROGRESS)


def archived_at(session: Session, package: RawDataPackage, site: str) -> PackageCopy | None:
    """The site's verified LTA copy when its buffer holds no live copy: the buffer copy did
    its job (purged after archiving, or being purged now, or never needed), so there is
    nothing to put there: a copy made while the purge deletes the file would be recorded over
    a file about to go, or send the package again only for the next purge to delete it."""
    live = [c for c in copies_at(session, package, LocationType.BUFFER, site)
            if c.status not in PURGED]
    return None if live else verified_copy(session, package, site,
                                           LocationType.LONG_TERM_ARCHIVE)


@dataclass(frozen=True)
class Placed:
    """A verified copy where it was asked for, and how it got there."""

    ref: CopyRef
    transport: str  # "" when the copy was already there
    seconds: float = 0.0
    streams: int = 0
    log_path: str | None = None
    batched_with: tuple[str, ...] = ()  # other packages moved in the same session
    note: str = ""  # what was found instead of a transfer ("already there, verified now"),
    # or what the transfer repaired ("repaired: replaced the copy found corrupt ...")
    source: CopyRef | None = None  # the copy sent, when it is not the one planned (moved on)
    replaced: tuple[Replaced, ...] = ()  # quarantined copies this new copy superseded


@dataclass(frozen=True)
class Replaced:
    """A quarantined (CORRUPT) copy that a new copy at its site superseded (a repair), and
    what found it bad: its newest failed verification, as OpsDB recorded it."""

    copy_id: int
    location: str  # site/location
    path: str
    found_at: datetime | None  # when that verification ended
    found_by: str  # what read it: the scrub, a re-check before a deletion, the audit, a re-read
    error: str | None  # what it found ("checksum mismatch: expected ..., read ...")
    operation_id: int | None  # that verification operation

    @property
    def when(self) -> str:
        at = self.found_at
        return "at an unrecorded time" if at is None else f"at {_aware(at):%Y-%m-%d %H:%M} UTC"

    def evidence(self) -> dict[str, str | int]:
        at = self.found_at
        return {"copy_id": self.copy_id, "location": self.location, "path": self.path,
                "found_at": _aware(at).isoformat() if at else "",
                "found_by": self.found_by, "error": self.error or "",
                "operation_id": self.operation_id or 0}


def repaired_note(replaced: Collection[Replaced], source: CopyRef) -> str:
    """A repair's outcome in words: which quarantined copy it replaced, found bad when, by what
    and why, and where the new copy was copied from."""
    found = "; ".join(f"{r.copy_id} at {r.location} found corrupt {r.when} by {r.found_by} "
                      f"({r.error or 'failed its verification'})" for r in replaced)
    return (f"repaired: replaced the {'copies' if len(replaced) > 1 else 'copy'} {found}, "
            f"with one copied from {source.site}/{source.location}")


def _replaced(session: Session, stale: list[PackageCopy]) -> tuple[Replaced, ...]:
    """What each quarantined copy a repair supersedes was found bad by (its newest failed
    verification), read before it is recorded as overwritten."""
    out = []
    for bad in stale:
        why = session.scalars(select(Operation).where(
            Operation.copy_id == bad.id, Operation.operation_type == OperationType.VERIFICATION,
            Operation.status == OperationStatus.FAILED).order_by(Operation.id.desc()).limit(1)
        ).first()
        by = "a re-read"
        if why is not None and why.reason:
            by = why.reason
        elif why is not None and why.run_id:
            by = f"a re-read in run {why.run_id}"
        out.append(Replaced(
            bad.id, f"{bad.location.site.short_name}/{bad.location.name}",
            str(endpoint(bad.location, bad.relative_path)),
            (why.finished_at or why.started_at) if why is not None else None, by,
            why.error if why is not None else None, why.id if why is not None else None))
    return tuple(out)


def place(opsdb: OpsDB, config: Config, placement: Placement, kind: LocationType, *,
          run_id: str | None = None, attempt: int = 0) -> Placed:
    """Copy the package to the site's location of `kind`, verify it, record it.

    Idempotent: an existing verified copy there is re-read on its storage and returned ("already
    there, verified now"); one that fails the re-read is quarantined and made again from the
    nearest verified copy. One transfer of a package to a location at a time, whoever starts
    it (ccat_dt/claims.py): while another process's transfer of it there is in flight this
    waits for it, then finds its copy. On a route with a
    batch budget, other packages waiting on the same route travel in the same transport
    session, each verified and recorded on its own. Every transport checksums the copy where it
    landed (re-reading the destination file) before the rename, for buffer and LTA alike; and
    nothing is renamed over a file OpsDB does not record at the final name (_occupied).
    """
    waited: int | None = None  # for another process's transfer there
    while True:
        found = _reverify_existing(opsdb, config, placement, kind, run_id)
        if found is not None:
            return found if waited is None else replace(found, note=(
                f"{found.note}, after waiting for operation {waited} (another run's transfer "
                "of it there)"))
        started = _claim(opsdb, config, placement, kind, run_id, attempt)
        if isinstance(started, _Started):
            break
        if started.operation_id is not None:
            waited = started.operation_id
            claims.wait_until_ended(opsdb, waited)
    placement, jobs = started.placement, started.jobs
    ids = [j.operation_id for j in jobs]
    ended: dict[int, tuple[CopyRef, tuple[Replaced, ...]] | Exception] = {}  # by operation id
    try:
        transport, outcomes, down = _move(opsdb, config, started, jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, Exception):
                finish(opsdb, job.operation_id, error=str(outcome))
                ended[job.operation_id] = outcome
                mark_unreadable_source(opsdb, config, job.placement.source.copy_id,
                                       str(job.placement.source.endpoint.path), outcome)
            else:
                ended[job.operation_id] = _record(opsdb, config, job, kind, outcome, transport)
    except BaseException as exc:  # interrupted (run terminated), OpsDB away: free the claims
        claims.release(opsdb, [i for i in ids if i not in ended],
                       f"interrupted: {exc.__class__.__name__}: {exc}")
        raise
    finally:
        claims.untrack(ids)
    mine, outcome = ended[jobs[0].operation_id], outcomes[0]  # the placement's own: first
    if isinstance(mine, Exception):
        first = next(o for o in outcomes if isinstance(o, Exception))
        if down is not None:
            raise TransferError(f"{mine}; the source {down}: the next attempt reads another "
                                "archive's verified copy while there is one", retryable=True
                                ) from mine
        if location_failure(first) and started.alternatives:
            raise TransferError(f"{mine}; {started.destination_label} is marked unhealthy: the "
                                f"next {kind.value} location at {placement.site} by priority "
                                "is used next", retryable=True) from mine
        raise _source_or_transit(opsdb, config, placement, mine)
    assert not isinstance(outcome, Exception)
    ref, replaced = mine
    return Placed(ref, transport, outcome.seconds, outcome.streams, outcome.log_path,
                  tuple(j.placement.package for j in jobs[1:]), source=placement.source,
                  note=repaired_note(replaced, placement.source) if replaced else "",
                  replaced=replaced)


def _move(opsdb: OpsDB, config: Config, started: _Started, jobs: list[_Job]
          ) -> tuple[str, list[TransferResult | Exception], str | None]:
    """The claimed transfers in one transport session, their claims renewed meanwhile (the
    transport's name, each file's outcome, and what a look at a source location that cannot
    be reached said: `source_down`); a location-level failure marks the source location
    unhealthy when it cannot be looked at, else the destination. Before, an archive that
    could not be reached as the source marked the destination failing."""
    placement = started.placement
    transport = transport_for(config, started.route, remote=started.remote, store=started.store)
    # Each transport finds the location's marker before it writes (a transfer never creates a
    # missing location root: an unmounted archive disk has none), remotely in the round trip
    # that creates the directory; an object store's marker is looked at here (one HEAD).
    unmarked = _unmarked_bucket(config, started.bucket) if started.bucket is not None else None
    with (labelled(site=placement.site, route=f"{placement.source.site}->{placement.site}"),
          claims.Lease(opsdb, [j.operation_id for j in jobs])):
        if unmarked:
            outcomes: list[TransferResult | Exception] = [unmarked] * len(jobs)
        else:
            occupied, repairs = _occupied(opsdb, config, started.destination_id, jobs)
            free = [replace(job, destination=replace(job.destination,
                                                     replaces=repairs.get(job.relative)))
                    for i, job in enumerate(jobs) if i not in occupied]
            moved = iter(_transfer(transport, free) if free else [])
            outcomes = [occupied[i] if i in occupied else next(moved) for i in range(len(jobs))]
    failure = next((o for o in outcomes if isinstance(o, Exception)), None)
    down = None
    if failure is not None and location_failure(failure):
        down = source_down(opsdb, config, placement.source.copy_id,
                           f"{transport.name} to {started.destination_label}")
        if down is None:
            mark_failed(opsdb, config, started.destination_id,
                        f"{transport.name} to {started.destination_label}: {failure}")
    return transport.name, outcomes, down


def _occupied(opsdb: OpsDB, config: Config, destination_id: int, jobs: list[_Job]
              ) -> tuple[dict[int, TransferResult | Exception], dict[str, Identity]]:
    """What already lies at the jobs' final names, looked at now (one look per batch), by job
    index; and the quarantined copies found at their names, which a repair replaces (only
    while that very file is there when the transport renames: another that took its place
    meanwhile is not replaced). Nothing else is renamed over: a file holding the package's
    bytes, re-hashed now, is taken as the copy (a transfer whose recording was cut short); any
    other is left alone and its transfer refused, for a person to look at. (A file that
    appears later, while the package travels, is caught by the transport's rename, which never
    replaces one: transports/base.Occupied.)"""
    with opsdb.session() as session:
        destination = session.get_one(DataLocation, destination_id)
        root, host = destination.root, destination.host
        # The quarantined copies there, with the inode each was recorded with: on a disk, a
        # file at the name with another inode is not the quarantined copy (rot and truncation
        # happen in place) but one that took its place, and is not replaced.
        quarantined = {path: inode for path, inode in session.execute(select(
            PackageCopy.relative_path, PackageCopy.inode).where(
            PackageCopy.location_id == destination_id, PackageCopy.status == CopyStatus.CORRUPT,
            PackageCopy.relative_path.in_([j.relative for j in jobs])))}
    stores, ssh, clock = Stores.of(config), ssh_settings(config), time.monotonic()
    try:
        seen = stores.look(root, host, ssh, [Wanted(j.relative, False) for j in jobs])
        # A name in a directory refused to ccat-dt's user (Seen.refused) is not known to be
        # taken: the transfer then fails on the permission, the destination's fault.
        taken = [i for i, (job, found) in enumerate(zip(jobs, seen, strict=True))
                 if job.relative not in quarantined and not found.refused
                 and not (found.problem or "").startswith("missing")]
        hashed = stores.look(root, host, ssh, [Wanted(jobs[i].relative, True)
                                               for i in taken]) if taken else []
    except StorageUnavailable as exc:
        failure = TransferError(str(exc), retryable=exc.transient)
        return dict.fromkeys(range(len(jobs)), failure), {}
    out: dict[int, TransferResult | Exception] = {}
    for i, found in zip(taken, hashed, strict=True):
        job, expected = jobs[i], jobs[i].placement.source.checksum
        if found.problem is None and found.checksum == expected:
            out[i] = TransferResult(bytes=found.size or 0, seconds=time.monotonic() - clock,
                                    checksum=expected)
        else:
            out[i] = TransferError(
                f"{job.destination} {FOREIGN_FILE} "
                f"({found.problem or f'checksum {found.checksum}'}; the package is {expected}): "
                "nothing was written over it. Find out what wrote it and move it away; the "
                "next attempt then copies the package", retryable=False)
    on_disk = not is_object_root(root)
    for i, (job, found) in enumerate(zip(jobs, seen, strict=True)):
        recorded = quarantined.get(job.relative)
        if (job.relative in quarantined and found.problem is None and on_disk
                and None not in (recorded, found.inode) and recorded != found.inode):
            out[i] = TransferError(
                f"{job.destination} {FOREIGN_FILE} where the quarantined copy was (another "
                f"file: inode {found.inode}, the copy's was {recorded}): nothing was written "
                "over it. Find out what put it there and move it away; the next attempt then "
                "repairs the copy", retryable=False)
            continue
        if job.relative in quarantined and found.problem and not found.missing:
            # Not the quarantined file any more (a symlink, a directory): refused now, not
            # after the package travelled only for the rename to refuse it.
            out[i] = TransferError(
                f"{job.destination} {FOREIGN_FILE} where the quarantined copy was "
                f"({found.problem}): nothing was written over it. Move it away; the next "
                "attempt then repairs the copy", retryable=False)
    repairs = {job.relative: Identity(found.size, found.inode, found.mtime_ns)
               for i, (job, found) in enumerate(zip(jobs, seen, strict=True))
               if job.relative in quarantined and i not in out and found.problem is None
               and found.size is not None and found.inode is not None
               and found.mtime_ns is not None}
    return out, repairs


@dataclass(frozen=True)
class _Started:
    """Transfers claimed (the placement's own first), and where they go."""

    placement: Placement
    jobs: list[_Job]
    route: RouteConfig | None
    destination_id: int
    destination_label: str
    alternatives: int  # other healthy locations of the kind at the site
    bucket: str | None  # an object store's bucket
    remote: bool
    store: bool


@dataclass(frozen=True)
class _Taken:
    """Not started: another process's transfer there is in flight (`operation_id`), or a
    verified copy was recorded there meanwhile (None)."""

    operation_id: int | None


def _claim(opsdb: OpsDB, config: Config, placement: Placement, kind: LocationType,
           run_id: str | None, attempt: int) -> _Started | _Taken:
    """Claim the transfer of the placement's package (and its batch companions) to the site's
    location of `kind`, in one transaction, committed before any byte moves: the batch's
    package rows locked in name order, then the claims looked for and made (claims.py)."""
    ids: list[int] = []
    try:
        return _claim_in(opsdb, config, placement, kind, run_id, attempt, ids)
    except BaseException:  # not committed: nobody holds these
        claims.untrack(ids)
        raise


def _claim_in(opsdb: OpsDB, config: Config, placement: Placement, kind: LocationType,
              run_id: str | None, attempt: int, ids: list[int]) -> _Started | _Taken:
    with opsdb.session() as session:
        package = get_package(session, placement.package)
        origin = session.get(PackageCopy, placement.source.copy_id)
        if (origin is None or not origin.is_verified or origin.location.site.short_name
                == placement.site and origin.location.location_type == kind):
            # The planned source went away meanwhile (purged, quarantined, or it was the copy
            # just found bad here): the nearest verified copy anywhere instead.
            source = source_for(session, config, package, placement.site, kind)
            if source is None:
                raise NotReady(f"package {placement.package}: no verified copy to send to "
                               f"{placement.site} (the planned source {placement.source.site}/"
                               f"{placement.source.location} is no longer verified)")
            placement = Placement(placement.package, placement.site, CopyRef.of(source))
        destination = primary_location(session, placement.site, kind)
        route = (config.settings.route(placement.source.site, placement.site)
                 if placement.source.site != placement.site else None)
        budget = route.batch_bytes if route is not None else 0
        candidates = _companions(session, config, placement, kind, budget) if budget else []
        locked = sorted({placement.package, *(c.package for c in candidates)})
        for name in locked:  # in one order: two batches sharing packages never deadlock
            lock_package(session, name)  # also against a failover re-routing it meanwhile
        # From here on what is read is final until this transaction commits. The destination
        # too, read again under a shared lock on its row, which `ccat-dt migrate` takes first
        # (topology._lock_leaving): a disk move recorded before is read here (the new root);
        # one after finds this claim and is refused until it ends (as a deletion's, reaper).
        destination = session.scalars(select(DataLocation).where(
            DataLocation.id == destination.id).with_for_update(read=True)
            .execution_options(populate_existing=True)).one()
        if (verified_copy(session, package, placement.site, kind) is not None
                or kind == LocationType.BUFFER and archived_at(session, package,
                                                               placement.site) is not None):
            return _Taken(None)  # recorded since it was looked for: re-read it instead
        other = claims.live_claim(session, package.id, destination.id)
        if other is not None:
            return _Taken(other.id)
        batch = [placement] + ([c for c in _companions(session, config, placement, kind, budget)
                                if c.package in locked] if budget else [])
        jobs = [_start(session, config, item, destination, kind, run_id, attempt)
                for item in batch]
        ids += [j.operation_id for j in jobs]
        claims.track(ids)  # held by this process from the commit on
        remote = destination.host is not None or placement.source.host is not None
        alternatives = sum(is_healthy(loc, utcnow()) for loc in session.scalars(
            select(DataLocation).where(DataLocation.site_id == destination.site_id,
                                       DataLocation.location_type == kind,
                                       DataLocation.id != destination.id)))
        bucket = destination.root if destination.storage_type == StorageType.S3 else None
        return _Started(placement, jobs, route, destination.id, destination.label, alternatives,
                        bucket, remote, bucket is not None or placement.source.store is not None)


@dataclass(frozen=True)
class _Job:
    placement: Placement
    destination: Endpoint
    destination_id: int
    relative: str
    operation_id: int


def _source_or_transit(opsdb: OpsDB, config: Config, placement: Placement,
                       failure: Exception) -> Exception:
    """A copy that did not land with the source's checksum, or whose source was not found:
    re-hash the source on its storage to tell a bad or lost source (now quarantined, CORRUPT:
    rebuilt or repaired from an intact copy, never sent again; BadSource names it) from a bad
    transit (retried)."""
    text = str(failure).lower()
    if not (isinstance(failure, ChecksumMismatch) or "checksum mismatch" in text
            or SOURCE_MISSING in text):
        return failure
    try:
        check = reread(opsdb, config, placement.source.copy_id)
    except TransferError:
        return failure  # cannot look at the source now: treat it as transit, retried
    if check.passed:
        return failure
    with opsdb.session() as session:
        location = session.get_one(PackageCopy, placement.source.copy_id).location
        site, kind = location.site.short_name, location.location_type
    return BadSource(f"{failure}; the source re-hashed on its storage: {check.description}: "
                     "a bad source, not a bad transit; it is quarantined and made again "
                     "from intact data", package=placement.package, site=site, kind=kind,
                     observatory=site == config.settings.observatory, check=check)


def _start(session: Session, config: Config, placement: Placement, destination: DataLocation,
           kind: LocationType, run_id: str | None, attempt: int) -> _Job:
    package = get_package(session, placement.package)
    origin = session.get_one(PackageCopy, placement.source.copy_id)
    if not origin.is_verified:
        raise NotReady(f"package {placement.package}: source copy {placement.source.site}/"
                       f"{placement.source.location} is no longer verified "
                       f"({origin.status.value})")
    if placement.source.site == config.settings.observatory:
        primary = session.scalar(select(Site.short_name).join(
            RawDataPackage, RawDataPackage.primary_site_id == Site.id).where(
            RawDataPackage.id == package.id))  # read after the lock: a failover may have won
        if primary != placement.site:
            raise NotReady(f"package {placement.package} leaves the observatory for {primary} "
                           f"now, not {placement.site} "
                           f"({package.primary_site_note or 're-routed'})")
    operation = Operation(
        operation_type=(OperationType.ARCHIVE if kind == LocationType.LONG_TERM_ARCHIVE
                        else OperationType.TRANSFER),
        package=package, source_location_id=origin.location_id,
        destination_location_id=destination.id, retry_count=attempt, run_id=run_id)
    claims.hold(operation)
    session.add(operation)
    session.flush()
    relative = package_path(package)
    return _Job(placement, endpoint(destination, relative), destination.id, relative,
                operation.id)


def _companions(session: Session, config: Config, placement: Placement, kind: LocationType,
                budget: int) -> list[Placement]:
    """Packages of the same observation waiting for the same hop from the same location that
    were never attempted there, up to the batch byte budget and as many as one remote command
    line carries (_argument_chars). An attempt in flight is another process's claim
    (claims.py): read with the packages locked, it leaves the package out."""
    package = get_package(session, placement.package)
    destination = primary_location(session, placement.site, kind)
    siblings = session.scalars(select(RawDataPackage).where(
        RawDataPackage.observation_id == package.observation_id,
        RawDataPackage.id != package.id, RawDataPackage.checksum.is_not(None))
        .order_by(RawDataPackage.id)).all()
    out: list[Placement] = []
    spent = placement.source.size
    chars = _argument_chars(placement.source.path, destination.root, package_path(package))
    for sibling in siblings:
        tried = session.scalar(select(Operation.id).where(
            Operation.package_id == sibling.id,
            Operation.destination_location_id == destination.id).limit(1))
        if tried is not None or copies_at(session, sibling, kind, placement.site):
            continue
        source = (verified_copy(session, sibling, placement.site, LocationType.BUFFER)
                  if kind == LocationType.LONG_TERM_ARCHIVE
                  else replication_source(session, config, sibling, placement.site))
        if source is None or source.location_id != placement_location(session, placement):
            continue
        ref = CopyRef.of(source)
        cost = _argument_chars(ref.path, destination.root, package_path(sibling))
        if spent + source.size > budget or chars + cost > REMOTE_ARGUMENT_CHARS:
            continue
        spent, chars = spent + source.size, chars + cost
        out.append(Placement(sibling.name, placement.site, ref))
    return out


def _argument_chars(source: str, destination_root: str, relative: str) -> int:
    """At most what one package adds to its batch session's one remote command line (its
    source and landing names, its final name, checksum and identity), which must fit the
    kernel's limit (transports.remote.REMOTE_ARGUMENT_CHARS) however small the packages."""
    return len(source) + 2 * len(f"{destination_root}/{relative}") + 200


def placement_location(session: Session, placement: Placement) -> int:
    return session.get_one(PackageCopy, placement.source.copy_id).location_id


def _transfer(transport: Transport, jobs: list[_Job]) -> list[TransferResult | Exception]:
    """One session for the batch; each file's outcome on its own."""
    if len(jobs) == 1:
        job = jobs[0]
        try:
            return [transport.copy(job.placement.source.endpoint, job.destination,
                                   job.placement.source.checksum)]
        except (TransferError, ChecksumMismatch, OSError) as exc:
            return [exc]
    pairs = [(j.placement.source.endpoint, j.destination, j.placement.source.checksum)
             for j in jobs]
    try:
        return list(transport.copy_many(pairs))
    except (TransferError, ChecksumMismatch, OSError) as exc:
        return [exc] * len(jobs)


def _record(opsdb: OpsDB, config: Config, job: _Job, kind: LocationType,
            result: TransferResult, transport: str) -> tuple[CopyRef, tuple[Replaced, ...]]:
    """The landed copy recorded, verified; the quarantined copies of its kind at its site
    recorded as overwritten by it, and returned (what found each bad)."""
    with opsdb.session() as session:
        lock_package(session, job.placement.package)
        package = get_package(session, job.placement.package)
        now = utcnow()
        same = [c for c in copies_at(session, package, kind, job.placement.site)
                if c.location_id == job.destination_id and c.relative_path == job.relative
                and c.is_verified and c.checksum == result.checksum]
        replaced: tuple[Replaced, ...] = ()
        if same:  # a concurrent run of this step recorded the same bytes at the same name first
            copy = same[0]
        else:
            stale = [c for c in copies_at(session, package, kind, job.placement.site)
                     if c.status == CopyStatus.CORRUPT]
            inode, mtime_ns = ((result.inode, result.mtime_ns) if result.inode is not None
                               else _identity(config, job.destination))
            copy = PackageCopy(package=package, location_id=job.destination_id,
                               relative_path=job.relative, size=result.bytes,
                               checksum=result.checksum, created_at=now, verified_at=utcnow(),
                               inode=inode, mtime_ns=mtime_ns)
            session.add(copy)
            session.flush()
            replaced = _replaced(session, stale)
            for bad in stale:  # overwritten by this repair: superseded, on the record
                overwritten(session, package, bad, f"repaired copy {copy.id}", copy.id, now)
        operation = session.get_one(Operation, job.operation_id)
        operation.log_path, operation.transport = result.log_path, transport
        supersede(session, operation)
        finish_in(session, job.operation_id, copy_id=copy.id, nbytes=result.bytes,
                  seconds=result.seconds)
        mark_ok(session, job.destination_id)
        if (origin := session.get(PackageCopy, job.placement.source.copy_id)) is not None:
            mark_readable(session, origin.location_id)  # read whole there: reached again
        refresh_state(session, config, package)
        return CopyRef.of(copy), replaced


def _unmarked_bucket(config: Config, root: str) -> TransferError | None:
    """Why an object-store location cannot be written now (its marker object missing, the
    endpoint unreachable), or None."""
    try:
        Stores.of(config).look(root, None, ssh_settings(config), [])
    except StorageUnavailable as exc:
        return TransferError(str(exc), retryable=exc.transient)
    return None


def _identity(config: Config, where: Endpoint) -> tuple[int | None, int | None]:
    """(inode, mtime_ns) of a copy just verified, so a later re-check notices a replaced file
    (an object's ETag and time); a remote copy's comes with its transfer (TransferResult), or
    with its first re-check (recheck.py)."""
    if where.store is not None:
        return Stores.of(config).identity(where)
    if where.host is not None:
        return None, None
    try:
        info = os.lstat(where.path)
    except OSError:
        return None, None
    return info.st_ino, info.st_mtime_ns


@dataclass(frozen=True)
class Verification:
    passed: bool
    description: str
    copy_id: int | None
    path: str | None
    # How the bytes were read: the landed-bytes checksum, when, by which transport (or
    # "re-read"), the operation id; empty for a copy that was not read.
    evidence: dict[str, str | int] = field(default_factory=dict)
    # False: its storage could not be looked at (disk not mounted, host unreachable); nothing
    # is known of the copy and nothing was marked.
    reached: bool = True


def _reverify_existing(opsdb: OpsDB, config: Config, placement: Placement,
                       kind: LocationType, run_id: str | None) -> Placed | None:
    """The copy already where it is asked for, re-read now; None when there is none (or it
    failed the re-read, which quarantined it)."""
    with opsdb.session() as session:
        package = get_package(session, placement.package)
        existing = verified_copy(session, package, placement.site, kind)
        stands_in = existing is None and kind == LocationType.BUFFER
        if stands_in:
            existing = archived_at(session, package, placement.site)
        if existing is None:
            return None
        copy_id = existing.id
    check = reread(opsdb, config, copy_id, run_id=run_id)
    if not check.passed:
        return None
    with opsdb.session() as session:
        ref = CopyRef.of(session.get_one(PackageCopy, copy_id))
    note = (f"not needed: archived at {placement.site} ({ref.location}), its buffer copy "
            "purged after archiving; the LTA copy verified now" if stands_in
            else "already there, verified now")
    return Placed(ref, transport="", note=note)


def verify(opsdb: OpsDB, config: Config, package: str, site: str,
           kind: LocationType, *, reason: str | None = None) -> Verification:
    """Re-read the newest copy at the site's location of `kind` against the package checksum.

    A mismatch marks the copy CORRUPT, which blocks every purge of the package; a location
    that cannot be looked at marks nothing (`reached` False).
    """
    with opsdb.session() as session:
        pkg = get_package(session, package)
        copy = newest_copy(session, pkg, site, kind)
        if copy is None:
            refused = [c for c in copies_at(session, pkg, kind, site)
                       if c.status == CopyStatus.DELETION_FAILED]
            if refused:  # not "no copy": a person is asked to look at a foreign file there
                path = f"{refused[-1].location.root}/{refused[-1].relative_path}"
                return Verification(False, f"deletion refused at {site} {kind.value}: {path} "
                                    f"is not the recorded copy of {package} (something other "
                                    "than ccat-dt wrote it); nothing deleted, a person decides "
                                    f"(`ccat-dt why {package}`)", refused[-1].id, None)
            return Verification(False, f"no copy of {package} at {site} {kind.value}", None, None)
        copy_id = copy.id
    try:
        return reread(opsdb, config, copy_id, reason=reason)
    except TransferError as exc:
        return Verification(False, str(exc), copy_id, None, reached=False)


def none_recorded(opsdb: OpsDB, package: str, site: str, kind: LocationType) -> str | None:
    """What a stage's integrity check would say of `package` at the site's location of `kind`
    when OpsDB records no copy of it there in any state (not made yet, or never): that there
    is none, with nothing to read. None when a copy is recorded there (present, corrupt,
    deleted, ...: the check has something to read or to account for) or the package is
    unknown."""
    with opsdb.session() as session:
        try:
            pkg = get_package(session, package)
        except LookupError:
            return None
        if copies_at(session, pkg, kind, site):
            return None
    return f"no copy of {package} at {site} {kind.value}"


def newest_copy(session: Session, package: RawDataPackage, site: str,
                kind: LocationType) -> PackageCopy | None:
    """The copy `verify` re-reads: the newest present or corrupt one there."""
    copies = [c for c in copies_at(session, package, kind, site)
              if c.status in (CopyStatus.PRESENT, CopyStatus.CORRUPT)]
    return copies[-1] if copies else None


def check_stage(opsdb: OpsDB, config: Config, package: str, site: str,
                kind: LocationType, run_id: str | None = None) -> Verification:
    """What a stage's integrity check reports: for a copy run `run_id` placed (or re-read)
    the read it did, with its evidence (every written byte is read back once: the transport
    hashed the landed bytes before the rename); else the copy re-read now; or, for a buffer copy
    purged after archiving (it did its job), or being purged now (a purge took it, before or
    while it was read), the verified LTA copies that made the purge allowed."""
    if kind == LocationType.BUFFER and (purged := purged_buffer(opsdb, config, package,
                                                                site)) is not None:
        return purged
    if run_id is not None:
        found = read_in_run(opsdb, package, site, kind, run_id)
        if found is not None:
            return found
    verification = verify(opsdb, config, package, site, kind)
    if not verification.passed and kind == LocationType.BUFFER:
        # the purge may have claimed the copy while it was read (its unlink emptied the path)
        return purged_buffer(opsdb, config, package, site) or verification
    return verification


def purged_buffer(opsdb: OpsDB, config: Config, package: str, site: str) -> Verification | None:
    """A passed check for the site's buffer when it holds no copy but purged ones (deleted, or
    being deleted under a committed certificate) and the verified LTA copies a purge of it
    relies on are there (purged after archiving, or archived without it); else None. Those
    LTA copies are looked at on their storage first, as the purge looks before it deletes
    (recheck): OpsDB's last verification alone passed this check, "verified LTA copies at
    cologne/lta, us/lta", run alone from the UI after both were deleted or rotted. When they
    are not all there now, the check fails saying so (a warning while only their storage
    could not be looked at)."""
    from ccat_dt.recheck import recheck_lta_copies  # it builds on this module

    observatory = site == config.settings.observatory
    required = config.settings.required_lta_copies if observatory else 1

    def enough(labels: list[str]) -> bool:
        return (len({a.split("/")[0] for a in labels}) >= required
                and (observatory or any(a.startswith(f"{site}/") for a in labels)))

    def archived_copies(session: Session, pkg: RawDataPackage) -> dict[int, str]:
        return {c.id: f"{c.location.site.short_name}/{c.location.name}"
                for c in copies_at(session, pkg, LocationType.LONG_TERM_ARCHIVE)
                if c.is_verified}

    with opsdb.session() as session:
        pkg = get_package(session, package)
        buffered = copies_at(session, pkg, LocationType.BUFFER, site)
        if any(c.status not in PURGED for c in buffered):
            return None
        recorded = sorted(archived_copies(session, pkg).values())
        if not enough(recorded):  # none purged: no copy there (yet); else its LTA copies
            # were found bad since (the repair sensor makes them again)
            return None if not buffered else Verification(
                False, f"{site}/{LocationType.BUFFER.value}: none left (purged after "
                f"archiving), and too few verified LTA copies now to stand for it "
                f"({', '.join(recorded) or 'none'}): a quarantined one is made again from an "
                "intact copy", None, None)
    looked = recheck_lta_copies(opsdb, config, package,
                                reason=f"re-check for the check of {site}'s buffer copy")
    with opsdb.session() as session:
        pkg = get_package(session, package)
        buffered = copies_at(session, pkg, LocationType.BUFFER, site)
        if any(c.status not in PURGED for c in buffered):
            return None  # a new copy meanwhile: it is checked instead
        verified = archived_copies(session, pkg)
        archived = sorted(label for i, label in verified.items() if i in looked.passed)
        deleting = sorted(c.id for c in buffered if c.status == CopyStatus.DELETION_IN_PROGRESS)
        operations = [str(i) for i in session.scalars(select(Operation.id).where(
            Operation.copy_id.in_(deleting),
            Operation.operation_type == OperationType.DELETION).order_by(Operation.id))]
    where = f"{site}/{LocationType.BUFFER.value}"
    if not enough(archived):
        unknown = [label for i, label in verified.items() if i in looked.unavailable]
        return Verification(False, f"{where}: none left (purged after archiving, or archived "
                            "without it), and the verified LTA copies that allowed it are not "
                            f"all on their storage now: {'; '.join(looked.problems)}", None,
                            None, reached=not enough(archived + unknown))
    lta = f"verified LTA copies at {', '.join(archived)}"
    if deleting:
        return Verification(True, f"{where}: being purged after archiving (deletion "
                            f"operation {', '.join(operations) or 'unrecorded'} under way); "
                            f"{lta}", deleting[-1], None,
                            {"purge_operations": ", ".join(operations)})
    return Verification(True, f"{where}: none left (purged after archiving, or archived "
                        f"without it); {lta}", None, None)


READS = (OperationType.PACKAGING, OperationType.TRANSFER, OperationType.ARCHIVE,
         OperationType.VERIFICATION)


def read_by(operation: Operation) -> str:
    """What read a copy's bytes in `operation` (one of READS): its transport, its build or a
    re-read."""
    return operation.transport or ("packaging" if operation.operation_type
                                   == OperationType.PACKAGING else "re-read")


def read_in_run(opsdb: OpsDB, package: str, site: str, kind: LocationType,
                run_id: str) -> Verification | None:
    """The newest copy there, if run `run_id` read it on its storage to the package checksum
    (its build or transport on the landed bytes, or a re-read) and nothing has marked it bad since;
    None otherwise (then the check re-reads it)."""
    with opsdb.session() as session:
        pkg = get_package(session, package)
        copy = newest_copy(session, pkg, site, kind)
        if copy is None or not copy.is_verified or copy.checksum != pkg.checksum:
            return None
        operation = session.scalars(select(Operation).where(
            Operation.copy_id == copy.id, Operation.run_id == run_id,
            Operation.status == OperationStatus.COMPLETED, Operation.error.is_(None),
            Operation.operation_type.in_(READS)).order_by(Operation.id.desc()).limit(1)).first()
        if operation is None or operation.finished_at is None:
            return None
        by = read_by(operation)
        label = f"{copy.location.site.short_name}/{copy.location.name}"
        evidence: dict[str, str | int] = {
            "checksum": copy.checksum or "", "verified_at": operation.finished_at.isoformat(),
            "verified_by": by, "operation_id": operation.id}
        return Verification(True, f"{label}: checksum matches, read on its storage by {by} in "
                            f"this run (operation {operation.id}); not read again", copy.id,
                            str(endpoint(copy.location, copy.relative_path)), evidence)


def reread(opsdb: OpsDB, config: Config, copy_id: int, *,
           run_id: str | None = None, reason: str | None = None) -> Verification:
    """Re-read one copy on its storage against the package checksum and record it (a
    verification operation of run `run_id`, its reason `reason`: what re-read it, e.g. the
    scrub; verified_at on success, CORRUPT on a mismatch or a file gone from a mounted
    location; a CORRUPT copy whose bytes match again, put back by a person, is PRESENT again).

    A location that cannot be looked at (root unmarked: the disk not mounted; host or bucket
    unreachable), or a file its disk fails to read (EIO), says nothing about the copy:
    TransferError (retryable when the host could not be reached or the read failed), nothing
    marked but the location's failure. A file refused to ccat-dt's user for lack of permission
    (a mode, an owner, a directory it cannot enter, an ACL) says nothing about the copy nor
    its disk: TransferError naming the file and whom to make it readable by, not retryable
    within the run, nothing marked (`routing.refused_reread`: a person is told, notify.py); the next
    re-read (the scrub's) verifies it once it is readable."""
    with opsdb.session() as session:
        copy = session.get_one(PackageCopy, copy_id)
        pkg = copy.package
        where = endpoint(copy.location, copy.relative_path)
        root, host, relative = copy.location.root, copy.location.host, copy.relative_path
        location_id = copy.location_id
        operation = Operation(operation_type=OperationType.VERIFICATION, package=pkg,
                              copy_id=copy.id, destination_location_id=copy.location_id,
                              run_id=run_id, reason=reason)
        session.add(operation)
        label = f"{copy.location.site.short_name}/{copy.location.name}"
        expected, name = pkg.checksum, pkg.name
    try:
        [seen] = Stores.of(config).look(root, host, ssh_settings(config),
                                        [Wanted(relative, rehash=True)])
    except StorageUnavailable as exc:
        finish(opsdb, operation.id, error=f"not re-read: {exc}")
        mark_failed(opsdb, config, location_id, f"copy {copy_id} not re-read: {exc}")
        raise TransferError(f"{label}: copy {copy_id} not re-read: {exc}",
                            retryable=exc.transient) from exc
    if seen.refused:  # a permission, not the disk: a person grants it
        finish(opsdb, operation.id, error=f"not re-read: {seen.problem}")
        raise TransferError(f"{label}: copy {copy_id} not re-read: {seen.problem} (not marked "
                            "corrupt, its disk not at fault: read again once readable)",
                            retryable=False)
    if seen.unreadable:  # the disk failed the read: the copy is not proved bad by that
        finish(opsdb, operation.id, error=f"not re-read: {seen.problem}")
        mark_failed(opsdb, config, location_id, f"copy {copy_id} at {where}: {seen.problem}")
        raise TransferError(f"{label}: copy {copy_id} not re-read: {seen.problem} (not marked "
                            "corrupt: read again later)", retryable=True)
    actual, size = seen.checksum or "", seen.size or 0
    problem = seen.problem or (None if actual == expected else
                               f"checksum mismatch: expected {expected}, read {actual}")
    with opsdb.session() as session:
        lock_package(session, name)  # against a file taken out (exclude) meanwhile
        stored = session.get_one(PackageCopy, copy_id)
        if problem is None and stored.status == CopyStatus.CORRUPT:
            # intact bytes of a tar that is not the package any more (a file was taken out):
            # quarantined until the rebuild replaces it, never PRESENT again
            problem = not_the_package(stored.package, stored)
        if problem is None:
            stored.verified_at = utcnow()
            if stored.status == CopyStatus.CORRUPT:
                stored.status = CopyStatus.PRESENT
            # The identity of the file just hashed intact: the copy, whatever identity was
            # recorded (a disk copied without its mtimes, which `migrate` could not tell by a
            # stat). Before, an intact copy kept a stale one: once it rotted, its repair took
            # it for another file and refused to write over it, for ever.
            if seen.inode is not None and seen.mtime_ns is not None:
                stored.inode, stored.mtime_ns = seen.inode, seen.mtime_ns
            mark_readable(session, location_id)  # read intact now: its own mark too
        elif stored.status == CopyStatus.PRESENT:
            stored.status = CopyStatus.CORRUPT
        finish_in(session, operation.id, copy_id=copy_id, nbytes=size, seconds=None,
                  error=problem)
        session.flush()
        refresh_state(session, config, stored.package)  # ARCHIVED may fall back, or LOST
    evidence: dict[str, str | int] = {
        "checksum": actual, "verified_by": "re-read",
        "verified_at": utcnow().isoformat(), "operation_id": operation.id}
    return Verification(problem is None, f"{label}: {problem or 'checksum matches'}",
                        copy_id, str(where), evidence)


def source_down(opsdb: OpsDB, config: Config, copy_id: int, doing: str) -> str | None:
    """After a read of the copy as a source failed (`doing`: what read it), its location is
    looked at (its marker: a stat, a HEAD, one ssh round trip). When it cannot be (its host or
    endpoint unreachable or refusing, its disk unmounted) the location is marked failing
    (health.SOURCE_DOWN) and so passed over as a source (routing.readable_first) while another
    verified copy can be read, until its hold ends or a read there succeeds; the copy is not
    judged. Returns what the look said, or None when the location answers (the failure was
    the file's, the link's or the destination's)."""
    with opsdb.session() as session:
        location = session.get_one(PackageCopy, copy_id).location
        root, host, location_id, label = (location.root, location.host, location.id,
                                          location.label)
    try:
        Stores.of(config).look(root, host, ssh_settings(config), [])
    except StorageUnavailable as exc:
        mark_failed(opsdb, config, location_id, f"{label} {SOURCE_DOWN} ({doing}): {exc}")
        return f"{label}: {exc}"
    return None


def verified_copy(session: Session, package: RawDataPackage, site: str,
                  kind: LocationType) -> PackageCopy | None:
    return next((c for c in copies_at(session, package, kind, site) if c.is_verified), None)


def refresh_state(session: Session, config: Config, package: RawDataPackage) -> None:
    """Derive the package state from its verified copies (never from what a step believes)."""
    if refresh_loss(session, config, package).health == Health.LOST:
        return
    lta_sites = {c.location.site.short_name
                 for c in copies_at(session, package, LocationType.LONG_TERM_ARCHIVE)
                 if c.is_verified}
    if len(lta_sites) >= config.settings.required_lta_copies:
        if package.state != PackageState.ARCHIVED:
            package.state, package.archived_at = PackageState.ARCHIVED, utcnow()
    elif package.state in (PackageState.WAITING, PackageState.ARCHIVED):
        package.state = PackageState.TRANSFERRING


def settle_states(session: Session, config: Config, among: Collection[str]) -> list[str]:
    """Those of `among` (package names, e.g. the live partitions) still TRANSFERRING though
    they hold the verified LTA copies the configuration requires now: `required_lta_copies`
    lowered, or an archive site that held none of their copies removed, after their last copy
    changed (the state is derived only when a copy changes). Their state is derived again,
    ARCHIVED, as `refresh_state` would; the names of those now ARCHIVED."""
    names, settled = sorted(set(among)), []
    for start in range(0, len(names), 500):
        for package in session.scalars(select(RawDataPackage).where(
                RawDataPackage.name.in_(names[start:start + 500]),
                RawDataPackage.state == PackageState.TRANSFERRING,
                RawDataPackage.verified_lta_sites >= config.settings.required_lta_copies)):
            refresh_state(session, config, package)
            if package.state == PackageState.ARCHIVED:
                settled.append(package.name)
    return settled


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

