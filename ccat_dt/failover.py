"""Primary archive site failover: packages not yet sent out of the observatory whose primary
site has been down past `policies.site_failover_hours` (ccat_dt/health.sites_down) get another
archive site as primary. The observatory link is still used once per package: a package that
has left the observatory (any copy outside it, even a deleted one) is never re-routed, and a
transfer out of the observatory checks, under the package's row lock, that its site is still
the primary (ccat_dt/replicas.py), so a late transfer to the old site and the new one cannot
both happen. The old site gets the package later by archive-to-archive replication."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.health import sites_down
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    RawDataPackage,
    Site,
    _aware,
)
from ccat_dt.packages import built_copy, get_package, lock_package
from ccat_dt.routing import has_left_observatory, next_primary_site


@dataclass(frozen=True)
class Rerouted:
    package: str
    old_site: str
    new_site: str
    copy_id: int | None  # its verified tar at the observatory, when built: send it now


def fail_over(opsdb: OpsDB, config: Config, now: datetime, *,
              dry_run: bool = False) -> list[Rerouted]:
    """Re-route every package not yet sent whose primary site is down past the horizon to
    the next archive site that is not; one short transaction per package. `dry_run`: the
    re-routes that would be made, none made."""
    with opsdb.session() as session:
        down = sites_down(session, config, now)
        if not down or len(down) == len(config.settings.archive_sites):
            return []  # nothing down, or nowhere better to go
        names = list(session.scalars(
            select(RawDataPackage.name).join(Site, RawDataPackage.primary_site_id == Site.id)
            .where(Site.short_name.in_(list(down)),
                   RawDataPackage.state.in_([PackageState.PLANNED, PackageState.WAITING]))
            .order_by(RawDataPackage.id)))
    out = []
    for name in names:
        with opsdb.session(undo=dry_run) as session:
            lock_package(session, name)
            package = get_package(session, name)
            old = package.primary_site.short_name
            if old not in down or has_left_observatory(session, config, package):
                continue
            if transfer_under_way(session, package, now, config):
                continue  # a transfer out is under way: it may yet succeed
            new = next_primary_site(session, config, avoid=down)
            broken = down[old]
            since = _aware(broken.failing_since or now)
            package.primary_site = new
            package.primary_site_note = (
                f"re-routed from {old} to {new.short_name} at {_aware(now):%Y-%m-%d %H:%M} UTC: "
                f"{old} unreachable since {since:%Y-%m-%d %H:%M} UTC (past the "
                f"{config.settings.policies.site_failover_hours:g} h failover horizon; "
                f"{broken.unhealthy_reason or 'its buffer failed'}); {old} gets it later "
                "from an archive")
            buffered = built_copy(session, config, package)
            out.append(Rerouted(name, old, new.short_name,
                                buffered.id if buffered is not None else None))
    return out


def transfer_under_way(session: Session, package: RawDataPackage, now: datetime,
                       config: Config) -> bool:
    """A transfer of the package that started within the failover horizon and has not ended
    (older ones belong to a process that died)."""
    horizon = timedelta(hours=config.settings.policies.site_failover_hours)
    started = session.scalars(select(Operation.started_at).where(
        Operation.package_id == package.id, Operation.operation_type == OperationType.TRANSFER,
        Operation.status == OperationStatus.IN_PROGRESS)).all()
    return any(_aware(now) - _aware(when) < horizon for when in started)


def unsent(session: Session, config: Config) -> list[Rerouted]:
    """Packages re-routed (now or at any earlier look), built, that have not left the
    observatory: their send to the new primary site is due. fail_over commits a re-route as
    it makes it, before any run is asked for; asking from this, not from what fail_over just
    changed, sends a package whose re-route was made by a look whose runs were never launched
    (the UI's "Test sensor", a daemon stopped in between): before, its send waited for the
    sweep for unattended work (`policies.unattended_after_s`)."""
    out = []
    for package in session.scalars(
            select(RawDataPackage).where(RawDataPackage.primary_site_note.is_not(None),
                                         RawDataPackage.state == PackageState.WAITING)
            .order_by(RawDataPackage.id)):
        buffered = built_copy(session, config, package)
        if buffered is None or has_left_observatory(session, config, package):
            continue
        out.append(Rerouted(package.name, "", package.primary_site.short_name, buffered.id))
    return out
