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
STAGING_JOB = "staging_job"  # its runs are of a staging request's partition
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
    """The partitions of these runs that the instance does not have, added with them: a
    package's that was retired (sensors/retire.py), for a repair, a new archive site's copy
    or a re-attempt of a package archived long ago; a staging request's that the staging
    sensor never added (its cursor set past the request: "Test sensor" and its evaluated
    cursor stored without its requests, an instance restored from an older backup than
    OpsDB), for the sweep's run of it. A run for a partition the instance does not know
    cannot be requested: the sensor's whole tick fails (before: every re-attempt sensor tick,
    once its sweep asked for such a staging run, named as a package partition)."""
    assert staging_partitions.name is not None
    packages, staging = set(), set()
    for request in requests:
        key = request.partition_key
        if not key:
            continue
        if request.job_name == STAGING_JOB:
            staging.add(str(key))
        elif isinstance(key, MultiPartitionKey):
            packages.add(key.keys_by_dimension["package"])
        elif not instance.has_dynamic_partition(staging_partitions.name, key):
            packages.add(key.split("|", 1)[0])  # "package" or "package|site"
    retired = sorted(name for name in packages
                     if not instance.has_dynamic_partition(PACKAGES, name))
    missing = sorted(name for name in staging
                     if not instance.has_dynamic_partition(staging_partitions.name, name))
    return ([package_partitions.build_add_request(retired)] if retired else []) + (
        [staging_partitions.build_add_request(missing)] if missing else [])
