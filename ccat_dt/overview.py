"""The operator's overview: per site, how many package copies are present, verified,
quarantined (CORRUPT, waiting for their repair) and lost (of packages with no good copy left),
the packages that are stuck, each with the reason (`ccat-dt why` in one line), and the
notification channels that refuse for good (nobody hears of a problem over them)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.loss import Health, packages_in_danger
from ccat_dt.notify import failing_channels, undeliverable
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    PackageCopy,
    PackageState,
    RawDataPackage,
    Site,
    _aware,
)

STUCK_LIMIT = 50  # the overview names this many stuck packages at most (worst first)


@dataclass(frozen=True)
class SiteFigures:
    site: str
    present: int
    verified: int
    quarantined: int
    lost: int


@dataclass(frozen=True)
class Stuck:
    package: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Overview:
    sites: list[SiteFigures]
    packages: dict[str, int]  # by state
    lost: int
    at_risk: int
    stuck: list[Stuck]
    stuck_total: int
    undeliverable: list[str]  # "channel: recipient or server: reply"
    failing: list[str]  # "channel: server: reply, since ..." (failing for now, for long)


def overview(session: Session, config: Config, now: datetime) -> Overview:
    rows = session.execute(
        select(Site.short_name, PackageCopy.status, PackageCopy.verified_at,
               PackageCopy.created_at, RawDataPackage.state)
        .select_from(PackageCopy).join(DataLocation, PackageCopy.location_id == DataLocation.id)
        .join(Site, DataLocation.site_id == Site.id)
        .join(RawDataPackage, PackageCopy.package_id == RawDataPackage.id)).all()
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for site, status, verified_at, created_at, state in rows:
        figures = counts[site]
        if state == PackageState.LOST and status != CopyStatus.DELETED:
            figures["lost"] += 1
        if status == CopyStatus.PRESENT:
            figures["present"] += 1
            if verified_at is not None and _aware(verified_at) >= _aware(created_at):
                figures["verified"] += 1
        elif status == CopyStatus.CORRUPT:
            figures["quarantined"] += 1
    sites = [SiteFigures(s.short_name, counts[s.short_name]["present"],
                         counts[s.short_name]["verified"], counts[s.short_name]["quarantined"],
                         counts[s.short_name]["lost"]) for s in config.settings.sites]
    states: dict[str, int] = defaultdict(int)
    for (state,) in session.execute(select(RawDataPackage.state)):
        states[state.value] += 1
    danger = packages_in_danger(session, config)
    stuck = [Stuck(name, "integrity", a.reason) for name, a in danger]
    seen = {name for name, _ in danger}
    # Packages not yet archived whose `why` shows a failed or quarantined stage.
    candidates = session.scalars(select(RawDataPackage.name).where(
        RawDataPackage.state.in_([PackageState.FAILED, PackageState.PLANNED,
                                  PackageState.WAITING, PackageState.TRANSFERRING]))
        .order_by(RawDataPackage.id)).all()
    for name in candidates:
        if name in seen:
            continue
        bad = [s for s in diagnose(session, config, name, now)
               if s.state in ("failed", "quarantined")]
        if bad:
            stuck.append(Stuck(name, bad[0].stage, f"{bad[0].state}: {bad[0].detail}"))
    lost = sum(1 for _, a in danger if a.health == Health.LOST)
    return Overview(sites, dict(states), lost, len(danger) - lost, stuck[:STUCK_LIMIT],
                    len(stuck), [f"{row.channel}: {row.reason}"
                                 for row in undeliverable(session, config)],
                    [f"{row.channel}: {row.error}, nothing delivered since "
                     f"{_aware(row.since):%Y-%m-%d %H:%M} UTC"
                     for row in failing_channels(session, config, now)])
