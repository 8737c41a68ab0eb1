"""One partition per package (never per file); sites are a static dimension from the config."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    RunRequest,
    StaticPartitionsDefinition,
)

from ccat_dt.config import Config

PACKAGES = "packages"
package_partitions = DynamicPartitionsDefinition(name=PACKAGES)
staging_partitions = DynamicPartitionsDefinition(name="staging_requests")
by_package = MultiToSingleDimensionPartitionMapping(partition_dimension_name="package")


def package_site_partitions(config: Config) -> MultiPartitionsDefinition:
    sites = [site.short_name for site in config.settings.archive_sites]
    return MultiPartitionsDefinition({"package": package_partitions,
                                      "site": StaticPartitionsDefinition(sites)})


def package_site_key(package: str, site: str) -> MultiPartitionKey:
    return MultiPartitionKey({"package": package, "site": site})


def split_key(key: str) -> tuple[str, str]:
    """(package, site) of a package x site partition key ("package|site", dimensions sorted)."""
    if isinstance(key, MultiPartitionKey):
        dimensions = key.keys_by_dimension
        return dimensions["package"], dimensions["site"]
    package, site = key.split("|")
    return package, site


def revived(instance: DagsterInstance,
            requests: Sequence[RunRequest]) -> list[AddDynamicPartitionsRequest]:
    """The packages of these runs whose partitions were retired (sensors/retire.py) come back
    with them: a repair, a new archive site's copy or a re-attempt of a package archived
    long ago needs its partition (a run for a partition the instance does not know cannot be
    requested, and the sensor's whole tick would fail). A staging request's run is not a
    package's."""
    assert staging_partitions.name is not None
    names = {key.keys_by_dimension["package"] if isinstance(key, MultiPartitionKey)
             else key.split("|", 1)[0]  # "package" or "package|site"
             for key in (request.partition_key for request in requests) if key
             and not (isinstance(key, str)
                      and instance.has_dynamic_partition(staging_partitions.name, key))}
    retired = sorted(name for name in names
                     if not instance.has_dynamic_partition(PACKAGES, name))
    return [package_partitions.build_add_request(retired)] if retired else []
