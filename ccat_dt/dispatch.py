"""Where a run of a stage goes, whoever launched it: the link it loads (for the per-link run
limits, `routes[].max_concurrent`) and the Celery queue of the site whose data it touches.
The sensors know both from the work they found; a run launched by hand (the UI's
"Materialize", a backfill, `dagster asset materialize`) gets the same from here, computed
from OpsDB for its partition as the step itself will plan it."""

from __future__ import annotations

from dataclasses import dataclass

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import get_package
from ccat_dt.queues import (
    archive_queue,
    deletion_queue,
    packaging_queue,
    staging_queue,
    transfer_queue,
)
from ccat_dt.replicas import archived_at, source_for, verified_copy
from ccat_dt.stages import Stage


@dataclass(frozen=True)
class Dispatch:
    link: str | None  # "ORIGIN->DESTINATION" of the bytes it moves, None when it moves none
    queue: str


def dispatch_for(opsdb: OpsDB, config: Config, stage: Stage, partition: str,
                 site: str | None = None) -> Dispatch:
    """`partition` is the package (or staging request); `site` the archive site of a
    package x site partition."""
    settings = config.settings
    if stage == Stage.PACKAGING:
        return Dispatch(None, packaging_queue(config))
    if stage == Stage.PURGE:
        instruments = settings.site(settings.observatory).locations_of(LocationType.SOURCE)[0]
        return Dispatch(None, deletion_queue(config, settings.observatory, instruments.name))
    if stage == Stage.STAGING:
        from ccat_dt.staging import get_request

        with opsdb.session() as session:
            location = get_request(session, partition).location
            return Dispatch(None, staging_queue(config, location.site.short_name,
                                                location.name))
    if stage not in (Stage.SITE_COPY, Stage.LTA_COPY) or site is None:
        raise ValueError(f"no dispatch for stage {stage!r} partition {partition!r}")
    kind = LocationType.LONG_TERM_ARCHIVE if stage == Stage.LTA_COPY else LocationType.BUFFER
    queue = (archive_queue if stage == Stage.LTA_COPY else transfer_queue)(config, site)
    with opsdb.session() as session:
        package = get_package(session, partition)
        there = verified_copy(session, package, site, kind) or (
            archived_at(session, package, site) if kind == LocationType.BUFFER else None)
        source = None if there is not None else source_for(session, config, package, site,
                                                            kind)
        origin = source.location.site.short_name if source is not None else None
    return Dispatch(f"{origin}->{site}" if origin else None, queue)
