"""Celery queue names, derived from the configuration and never listed by hand:
`{site}_{location}_{operation}`, the location being the one whose data the step touches.
A worker at a site serves exactly its site's queues."""

from __future__ import annotations

from ccat_dt.config import Config, LocationConfig
from ccat_dt.opsdb.models import LocationType


def _name(site: str, location: LocationConfig, operation: str) -> str:
    return f"{site}_{location.name}_{operation}"


def _primary(config: Config, site: str, kind: LocationType) -> LocationConfig:
    return config.settings.site(site).locations_of(kind)[0]


def packaging_queue(config: Config) -> str:
    site = config.settings.observatory
    return _name(site, _primary(config, site, LocationType.BUFFER), "packaging")


def transfer_queue(config: Config, site: str) -> str:
    """Site copies run where they land (the destination pulls, as in the original system)."""
    return _name(site, _primary(config, site, LocationType.BUFFER), "transfer")


def archive_queue(config: Config, site: str) -> str:
    return _name(site, _primary(config, site, LocationType.LONG_TERM_ARCHIVE), "archive")


def verification_queue(config: Config, site: str) -> str:
    return _name(site, _primary(config, site, LocationType.LONG_TERM_ARCHIVE), "verification")


def deletion_queue(config: Config, site: str, location: str) -> str:
    return _name(site, config.location(site, location), "deletion")


def staging_queue(config: Config, site: str, location: str) -> str:
    return _name(site, config.location(site, location), "staging")


def site_queues(config: Config, site: str) -> list[str]:
    """Every queue a worker at `site` serves."""
    settings = config.settings
    cfg = settings.site(site)
    queues = []
    if site == settings.observatory:
        queues.append(packaging_queue(config))
    if cfg.is_archive:
        queues += [transfer_queue(config, site), archive_queue(config, site),
                   verification_queue(config, site)]
    for location in cfg.locations:
        if location.type == LocationType.PROCESSING:
            queues.append(staging_queue(config, site, location.name))
        if location.type != LocationType.LONG_TERM_ARCHIVE:
            queues.append(deletion_queue(config, site, location.name))
    return queues


def all_queues(config: Config) -> dict[str, list[str]]:
    return {site.short_name: site_queues(config, site.short_name)
            for site in config.settings.sites}


def queue_sites(config: Config) -> dict[str, str]:
    """The site whose worker serves each queue (what to start when none does)."""
    return {queue: site for site, queues in all_queues(config).items() for queue in queues}
