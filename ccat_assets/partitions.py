"""One partition per package (never per file); sites are a static dimension from the config."""

from __future__ import annotations

from dagster import (
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    StaticPartitionsDefinition,
)

from ccat_dt.config import Config

package_partitions = DynamicPartitionsDefinition(name="packages")
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
