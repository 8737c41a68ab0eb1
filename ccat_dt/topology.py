"""Sites, locations and instrument modules: the configuration mirrored into OpsDB."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from ccat_dt.claims import abandoned_deletion, holder, stale
from ccat_dt.config import Config, LocationConfig
from ccat_dt.health import choose
from ccat_dt.marker import MARKER
from ccat_dt.opsdb.database import OpsDB, migrate
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    InstrumentModule,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PhysicalCopy,
    RawDataPackage,
    Site,
    StagingRequest,
    StagingState,
    _aware,
    utcnow,
)
from ccat_dt.routing import next_primary_site

LOG = logging.getLogger(__name__)


class UnknownLocation(LookupError):
    """A site or location name that OpsDB does not know."""


class TopologyDrift(ValueError):
    """The configuration and OpsDB disagree on the locations: nothing may act on either."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _held(session: Session, location: DataLocation) -> int:
    """Copies OpsDB records at the location that are not deleted."""
    return session.scalar(select(func.count(PhysicalCopy.id)).where(
        PhysicalCopy.location_id == location.id,
        PhysicalCopy.status != CopyStatus.DELETED)) or 0


def _active_requests(session: Session, location: DataLocation) -> list[str]:
    """Staging requests still to be staged or kept at the location (active, not expired)."""
    return list(session.scalars(select(StagingRequest.name).where(
        StagingRequest.location_id == location.id, StagingRequest.state == StagingState.ACTIVE,
        StagingRequest.expires_at > utcnow()).order_by(StagingRequest.id)))


def _recorded(session: Session) -> dict[tuple[str, str], DataLocation]:
    return {(location.site.short_name, location.name): location
            for location in session.scalars(select(DataLocation)
                                            .options(joinedload(DataLocation.site)))}


def unsafe_changes(session: Session, config: Config,
                   recorded: dict[tuple[str, str], DataLocation] | None = None) -> list[str]:
    """What `migrate` must not apply: a location that holds copies dropped from the
    configuration, or given another type (buffer copies would count as archive copies, or
    archive copies be purged as buffer copies); a location dropped that active staging
    requests target (nothing could stage them: the staging sensor would fail on it)."""
    recorded = _recorded(session) if recorded is None else recorded
    configured = {(site.short_name, location.name): location
                  for site in config.settings.sites for location in site.locations}
    problems = []
    for key, row in sorted(recorded.items()):
        wanted = configured.get(key)
        if wanted is not None and wanted.type == row.location_type:
            continue
        held = _held(session, row)
        if not held:
            if wanted is None and (requests := _active_requests(session, row)):
                names = ", ".join(requests[:3]) + (", ..." if len(requests) > 3 else "")
                problems.append(
                    f"location {row.label} is no longer in the configuration, but "
                    f"{len(requests)} active staging request(s) target it ({names}): put it "
                    "back, release them (`ccat-dt stage --release NAME`), then take it out")
            continue
        copies = f"{held} cop{'y' if held == 1 else 'ies'}"
        if wanted is None:
            problems.append(
                f"location {row.label} holds {copies} in OpsDB but is no longer in the "
                "configuration: put it back (a location cannot leave the configuration while "
                "OpsDB records copies there)")
        else:
            problems.append(
                f"location {row.label} holds {copies} in OpsDB as a {row.location_type} "
                f"location; the configuration makes it a {wanted.type}: put its type back "
                "(a location holding copies cannot change its type)")
    return problems


def routed_to_removed_sites(session: Session, config: Config,
                            recorded: dict[tuple[str, str], DataLocation] | None = None
                            ) -> dict[str, list[RawDataPackage]]:
    """Packages in no archive yet whose primary archive site is no longer an archive site in
    the configuration (removed, renamed, its LTA location dropped), by that site: nothing
    would ever send them (the site is no partition any more; before, the copy sensor failed
    on "unknown site" at every tick, for every package). Asked only while OpsDB records an
    archive site the configuration lacks."""
    recorded = _recorded(session) if recorded is None else recorded
    archives = {site.short_name for site in config.settings.archive_sites}
    gone = {row.site_id for row in recorded.values()
            if row.location_type == LocationType.LONG_TERM_ARCHIVE
            and row.site.short_name not in archives}
    out: dict[str, list[RawDataPackage]] = {}
    if not gone:
        return out
    for package in session.scalars(select(RawDataPackage).where(
            RawDataPackage.verified_lta_sites == 0, RawDataPackage.primary_site_id.in_(gone))
            .options(joinedload(RawDataPackage.primary_site)).order_by(RawDataPackage.id)):
        out.setdefault(package.primary_site.short_name, []).append(package)
    return out


def reroute_from_removed_sites(session: Session, config: Config) -> list[str]:
    """Give every package of `routed_to_removed_sites` a configured archive site as its
    primary (round-robin, as when planned; the note says why, as a failover's does); `migrate`
    does it. Safe as a failover is: a transfer out of the observatory checks the primary
    under the package's lock as it starts (replicas._start). Returns what was re-routed."""
    done = []
    now = _aware(utcnow())
    for old, packages in routed_to_removed_sites(session, config).items():
        for package in packages:
            new = next_primary_site(session, config)
            package.primary_site = new
            package.primary_site_note = (
                f"re-routed from {old} to {new.short_name} at {now:%Y-%m-%d %H:%M} UTC by "
                f"`ccat-dt migrate`: {old} is no longer an archive site in the configuration")
            session.flush()  # the next round-robin pick reads this assignment
            done.append(f"{package.name}: {old} -> {new.short_name}")
    return done


LEFT = "left the configuration"


def _leaving(session: Session, config: Config) -> dict[int, tuple[DataLocation, str]]:
    """Recorded locations the configuration takes out, gives another type, or moves (another
    root or host: a disk move), by id, each with what happens to it."""
    configured = {(site.short_name, location.name): location
                  for site in config.settings.sites for location in site.locations}
    out = {}
    for key, row in _recorded(session).items():
        wanted = configured.get(key)
        if wanted is None:
            out[row.id] = (row, LEFT)
        elif wanted.type != row.location_type:
            out[row.id] = (row, f"became a {wanted.type} location")
        elif (where := _where(config, wanted)) != (row.root, row.host):
            out[row.id] = (row, f"moved from {_shown(row.root, row.host)} to {_shown(*where)}")
    return out


def _claims_on_leaving(session: Session, config: Config
                       ) -> list[tuple[Operation, DataLocation, str, str | None]]:
    """Operations in flight that write to a location leaving the configuration, changing its
    type or moving to another root or host (_leaving): a transfer, an archiving, a build or a
    staging to it, or a deletion of a copy there (it unlinks at the root it read when it
    claimed the copy: the old one, for a move). Each with what happens to the location and
    why its claim is stale (None: live, its process may still write or delete there)."""
    leaving = _leaving(session, config)
    if not leaving:
        return []
    now = utcnow()
    deletion = Operation.operation_type == OperationType.DELETION
    out = []
    for operation in session.scalars(select(Operation).where(
            Operation.finished_at.is_(None), Operation.status == OperationStatus.IN_PROGRESS,
            or_(and_(~deletion, Operation.destination_location_id.in_(list(leaving))),
                and_(deletion, Operation.source_location_id.in_(list(leaving)))))
            .order_by(Operation.id)):
        if operation.operation_type == OperationType.DELETION:  # at the copy's location
            where, why = operation.source_location_id, abandoned_deletion(operation, now)
        else:
            where, why = operation.destination_location_id, stale(operation, now)
        out.append((operation, *leaving[where or 0], why))
    return out


def transfers_under_way(session: Session, config: Config) -> list[str]:
    """What `migrate` must not apply yet: a location leaving the configuration, changing its
    type or moving to another root or host while a transfer, an archiving, a build or a
    staging still writes to it, or a deletion (a purge) of a copy there is under way (a live
    claim: ccat_dt/claims.py). Its copy would be recorded at a location the configuration no
    longer knows (everything would stop on it after `migrate` had said yes), or, moved,
    recorded at the new root while its bytes land at the old one; a deletion would unlink at
    the old root and record the copy deleted while the new root still holds it. Asked at
    `migrate` only (nothing else writes there once the configuration lacks the location or
    OpsDB records its new place; a deletion claims its copy under a lock on its location's
    row that `migrate` takes first, sync_topology, and checks at its unlink that the
    location is still where it looked: reaper._execute)."""
    problems = []
    for operation, row, how, why in _claims_on_leaving(session, config):
        if why is not None:
            continue  # its process is gone: nothing writes there any more
        if operation.operation_type == OperationType.DELETION:
            copy = operation.copy
            what = (f"package {operation.package.name}'s copy "
                    f"{copy.relative_path if copy is not None else operation.copy_id}"
                    if operation.package else f"copy {operation.copy_id}")
            moved = (" (it deletes at the old root: then move the old root to the new one "
                     "again, so that the new one lacks what it deleted)"
                     if how.startswith("moved") else "")
            problems.append(
                f"location {row.label}: a deletion of {what} there is under way (operation "
                f"{operation.id}, {holder(operation)}): let it end{moved}, or stop its run, "
                "then run `ccat-dt migrate` again (a location cannot leave the "
                "configuration, change its type or move to another root or host while a "
                "copy there is being deleted)")
            continue
        what = f"package {operation.package.name}" if operation.package else "a copy"
        moved = (" (then move what it wrote at the old root to the new one)"
                 if how.startswith("moved") else "")
        problems.append(
            f"location {row.label}: a {operation.operation_type.value} of {what} to it is under "
            f"way (operation {operation.id}, {holder(operation)}): let it end{moved}, or stop "
            "its run, then run `ccat-dt migrate` again (a location cannot leave the "
            "configuration, change its type or move to another root or host while it is "
            "written to)")
    return problems


def _lock_leaving(session: Session, config: Config) -> None:
    """Take the rows of the locations leaving, changing type or moving (_leaving) for this
    transaction, before its look for claims on them (a write: SQLite's database write lock,
    PostgreSQL's row locks). A deletion claims its copy under a shared lock on its
    location's row (reaper._claim): one claimed before is seen by that look; one claimed
    after waits for this transaction and reads the location as it leaves it (the new root).
    Before, a purge that claimed its copy between the look and the update unlinked at the
    old root after `migrate` had recorded the new one."""
    if ids := list(_leaving(session, config)):
        session.execute(update(DataLocation).where(DataLocation.id.in_(ids))
                        .values(root=DataLocation.root)
                        .execution_options(synchronize_session=False))


def _close_abandoned_claims(session: Session, config: Config) -> None:
    """Close (FAILED, saying why) the stale claims on locations leaving the configuration,
    changing type or moving: no later attempt there would ever find and close them (a move:
    they point at bytes at the old root). A deletion's copy stays DELETION_IN_PROGRESS: the
    next purge of its package looks at its path at the new root (reaper._resume_unfinished),
    records it deleted if gone, else decides it afresh."""
    for operation, row, how, why in _claims_on_leaving(session, config):
        if why is not None:
            operation.status, operation.finished_at = OperationStatus.FAILED, utcnow()
            operation.error = (f"abandoned: {why}; closed by `ccat-dt migrate` as location "
                               f"{row.label} {how}")


def moved_without_marker(session: Session, config: Config,
                         marked: Callable[[LocationConfig], str | None]) -> list[str]:
    """What `init`/`migrate` must not apply: a location OpsDB records copies at, moved in the
    configuration (another root or host) to a root that does not hold its marker (the path
    edited before the data was moved, or mistyped). Applied, its copies would be counted
    where they are not: `init` marked the empty new root, and OpsDB counted its copies as
    archive copies there while the audit found each lost (re-copied, nobody told why);
    `migrate` left it as an unmounted disk, every copy to it failing on "is the disk
    mounted?". Moved with its marker (the whole root), the data is there. `marked`: the
    location a root's marker names (read now, on the storage)."""
    recorded = _recorded(session)
    problems = []
    for site in config.settings.sites:
        for location in site.locations:
            label = f"{site.short_name}/{location.name}"
            row = recorded.get((site.short_name, location.name))
            if row is None or (where := _where(config, location)) == (row.root, row.host):
                continue
            if not (held := _held(session, row)) or marked(location) == label:
                continue
            unreached = " (or could not be reached)" if location.host else ""
            problems.append(
                f"location {label} holds {held} cop{'y' if held == 1 else 'ies'} in OpsDB at "
                f"{_shown(row.root, row.host)}; the configuration moves it to {_shown(*where)}, "
                f"which does not hold its marker ({MARKER} naming {label}){unreached}: move "
                f"its data there with the marker (the whole root, {MARKER} included), or put "
                "the old root back in the configuration; then run `ccat-dt migrate` (a "
                "location's copies are never counted at a root they are not on)")
    return problems


def topology_drift(session: Session, config: Config) -> list[str]:
    """Where the configuration and OpsDB disagree on the locations (the configuration edited,
    `ccat-dt migrate` not run, or refused): acting on either could look for data where it is
    not, or rely on copies at a location the configuration dropped."""
    recorded = _recorded(session)
    problems = unsafe_changes(session, config, recorded)
    for gone, packages in routed_to_removed_sites(session, config, recorded).items():
        names = ", ".join(p.name for p in packages[:3]) + (", ..." if len(packages) > 3 else "")
        problems.append(
            f"{len(packages)} package(s) in no archive yet are routed to archive site {gone}, "
            f"which is no longer in the configuration ({names}): run `ccat-dt migrate` to "
            "route them to the configured archive sites")
    for site in config.settings.sites:
        for location in site.locations:
            row = recorded.get((site.short_name, location.name))
            label = f"{site.short_name}/{location.name}"
            if row is None:
                problems.append(f"location {label} is in the configuration, not yet in OpsDB: "
                                "run `ccat-dt migrate`")
            elif _where(config, location) != (row.root, row.host):
                problems.append(
                    f"location {label} is at {_shown(*_where(config, location))} in the "
                    f"configuration, at {_shown(row.root, row.host)} in OpsDB: run `ccat-dt "
                    "migrate` once its data is at the new place")
    return problems


def _where(config: Config, location: LocationConfig) -> tuple[str, str | None]:
    return config.location_root(location), location.host


def _shown(root: str, host: str | None) -> str:
    return f"{host}:{root}" if host else root


def check_topology(opsdb: OpsDB, config: Config) -> None:
    """Raise TopologyDrift unless the configuration and OpsDB agree on the locations."""
    with opsdb.session() as session:
        problems = topology_drift(session, config)
    if problems:
        raise TopologyDrift(problems)


def sync_topology(session: Session, config: Config,
                  then: Callable[[Session], list[str]] | None = None) -> list[str]:
    """Insert or update sites, locations and modules so OpsDB matches the configuration;
    TopologyDrift, changing nothing, for a change that would misplace recorded copies.
    `then`: what else this transaction records once the locations are (`migrate`: the copies
    of a location moved, re-identified at its new root: reidentify.record); returns what it
    says."""
    _lock_leaving(session, config)
    problems = unsafe_changes(session, config) + transfers_under_way(session, config)
    if problems:
        raise TopologyDrift(problems)
    _close_abandoned_claims(session, config)
    for row, how in _leaving(session, config).values():
        if how == LEFT:  # not looked after any more: no longer listed as unhealthy either
            row.failing_since = row.unhealthy_until = row.unhealthy_reason = None
    settings = config.settings
    for site_cfg in settings.sites:
        site = session.scalar(select(Site).where(Site.short_name == site_cfg.short_name))
        if site is None:
            site = Site(short_name=site_cfg.short_name)
            session.add(site)
        site.name, site.description = site_cfg.name, site_cfg.description
        session.flush()
        for loc_cfg in site_cfg.locations:
            location = session.scalar(select(DataLocation).where(
                DataLocation.site_id == site.id, DataLocation.name == loc_cfg.name))
            if location is None:
                location = DataLocation(site=site, name=loc_cfg.name)
                session.add(location)
            location.location_type = loc_cfg.type
            location.storage_type = loc_cfg.storage
            location.priority = loc_cfg.priority
            location.root = config.location_root(loc_cfg)
            location.host = loc_cfg.host
    session.flush()
    said = then(session) if then is not None else []
    for rerouted in reroute_from_removed_sites(session, config):
        LOG.warning("re-routed %s (its archive site is no longer in the configuration)",
                    rerouted)
    for instrument in settings.instruments:
        for module_name in instrument.modules:
            exists = session.scalar(select(InstrumentModule).where(
                InstrumentModule.instrument == instrument.name,
                InstrumentModule.name == module_name))
            if exists is None:
                session.add(InstrumentModule(instrument=instrument.name, name=module_name))
    session.flush()
    return said


def get_location(session: Session, site: str, name: str) -> DataLocation:
    location = session.scalar(select(DataLocation).join(Site).where(
        Site.short_name == site, DataLocation.name == name))
    if location is None:
        raise UnknownLocation(f"unknown location '{site}/{name}'")
    return location


def primary_location(session: Session, site: str, kind: LocationType) -> DataLocation:
    """Where new work of a kind goes at a site: the highest-priority location that is not
    marked unhealthy (ccat_dt/health.py), else the highest-priority one."""
    locations = session.scalars(
        select(DataLocation).join(Site)
        .where(Site.short_name == site, DataLocation.location_type == kind)
        .order_by(DataLocation.priority.desc(), DataLocation.name)).all()
    if not locations:
        raise UnknownLocation(f"site '{site}' has no {kind.value} location")
    return choose(locations, utcnow())


def get_site(session: Session, short_name: str) -> Site:
    site = session.scalar(select(Site).where(Site.short_name == short_name))
    if site is None:
        raise UnknownLocation(f"unknown site '{short_name}'")
    return site


def prepare_opsdb(config: Config, *, mark_held: bool = True) -> list[str]:
    """Bring the OpsDB to the newest schema, mirror the configuration into it and mark the
    location roots (what `ccat-dt init` and `migrate` do; idempotent). Each marker names its
    location, so a root that holds another location's marker (disks swapped, a root mistyped)
    is refused before anything changes. `migrate` (mark_held=False) leaves unmarked the root
    of a location OpsDB records copies at: an empty mount point is not the disk. The storage
    modules are imported here: filing looks locations up through this module and needs none
    of them. A location moved to another root (its disk copied there) has the copies OpsDB
    records there re-identified at the new root (ccat_dt/reidentify.py); returns what that
    says, a line per location moved."""
    from ccat_dt.objectstore import Stores
    from ccat_dt.reidentify import look_at_new_roots, record
    from ccat_dt.storage import StorageUnavailable, mark_location_root, marked_label_at
    from ccat_dt.transports.factory import ssh_settings

    ssh = ssh_settings(config)
    stores = Stores.of(config)

    def marked(location: LocationConfig) -> str | None:
        """The location its root's marker names (on a disk, local or over ssh; or a bucket)."""
        root = config.location_root(location)
        if not location.is_object_store:
            return marked_label_at(root, location.host, ssh)
        try:
            return stores.at(root).marked_label()
        except StorageUnavailable:  # no marker yet (it is written below), or unreachable
            return None

    if swapped := _roots_of_other_locations(config, marked):
        raise TopologyDrift(swapped)
    migrate(config.opsdb_url)
    opsdb = OpsDB(config.opsdb_url)
    with opsdb.session() as session:
        if problems := (unsafe_changes(session, config) + transfers_under_way(session, config)
                        + moved_without_marker(session, config, marked)):
            raise TopologyDrift(problems)
        held = {f"{site}/{name}" for (site, name), row in _recorded(session).items()
                if _held(session, row)}
    labels = {f"{site.short_name}/{location.name}" for site in config.settings.sites
              for location in site.locations}
    shared = []
    for site in config.settings.sites:
        for location in site.locations:
            root = config.location_root(location)
            label = f"{site.short_name}/{location.name}"
            # Marked just now for another location: one directory under two names (a host
            # and its alias, a local path and the same one over ssh) would count one file
            # as two copies. That marker is kept; nothing is recorded.
            if (other := marked(location)) in labels and other != label:
                where = root + (f" on {location.host}" if location.host else "")
                shared.append(f"location {label}: its root {where} is the root of location "
                              f"{other} under another name (one machine under two host names, "
                              "a symlink or a bind mount?): one file would count as two "
                              "copies; give each location its own directory")
                continue
            held_disk = not mark_held and label in held and not location.is_object_store
            problem = (stores.at(root).mark() if location.is_object_store
                       else mark_location_root(root, location.host, ssh, label,
                                               create=not held_disk))
            if problem and held_disk:
                LOG.warning("%s: not marked: %s, but OpsDB records copies there (is the disk "
                            "mounted?); mount it, or run `ccat-dt init` once the right disk "
                            "is there", label, problem)
            elif problem:
                LOG.warning("%s: %s", label, problem)
    if shared:
        opsdb.dispose()
        raise TopologyDrift(shared)
    # Looked at before the transaction that records the moves (no lock held meanwhile).
    moves = look_at_new_roots(opsdb, config)
    said: list[str] = []
    for attempt in range(3):
        try:
            with opsdb.session() as session:
                said = sync_topology(session, config, lambda session: record(session, moves))
            break
        except IntegrityError:  # another `init`/`migrate` inserted the same rows meanwhile:
            if attempt == 2:  # they are there now, and are updated like any other
                raise
    opsdb.dispose()
    return said


def _roots_of_other_locations(config: Config,
                              marked: Callable[[LocationConfig], str | None]) -> list[str]:
    """Location roots (disks, local or remote, and buckets) whose marker names another
    configured location (a marker naming one no longer configured, a site renamed, is renamed
    with it). `marked`: the location a location's root marker names."""
    labels = {f"{site.short_name}/{location.name}" for site in config.settings.sites
              for location in site.locations}
    found = []
    for site in config.settings.sites:
        for location in site.locations:
            label = f"{site.short_name}/{location.name}"
            other = marked(location)
            if other in labels and other != label:
                where = config.location_root(location) + (
                    f" on {location.host}" if location.host else "")
                found.append(f"location {label}: its root {where} holds the marker of location "
                             f"{other}: another location's disk (or a root mistyped in the "
                             "configuration)")
    return found
