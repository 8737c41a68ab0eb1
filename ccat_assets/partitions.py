"""One partition per package (never per file); sites are a static dimension from the config."""

from __future__ import annotations

from collections.abc import Sequence

from dagster import (
    AddDynamicPartitionsRequest,
    AssetCheckExecutionContext,
    AssetExecutionContext,
    DagsterInstance,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    OutputContext,
    PartitionsDefinition,
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


def keep_partition(
        context: AssetExecutionContext | AssetCheckExecutionContext | OutputContext) -> None:
    """The step's partition added back if it was deleted while its run worked on it ("Delete
    partition" in the UI), as the body of a step (asset or check) or its IO manager's output
    ends. Dagster refuses a partition it does not have, both to record an output (that step
    failed: "Partition range X to X is not a valid range", its work done or about to be) and
    to start a step reading an asset of it (the run's next step failed), though OpsDB still
    holds the package. The retire sensor removes the partition again once it is finished."""
    partitions_def: PartitionsDefinition | None
    if isinstance(context, OutputContext):
        if context.step_context is None or not context.has_asset_partitions:
            return
        instance, partitions_def = context.step_context.instance, context.asset_partitions_def
        key = context.asset_partition_key
    else:
        op = context.op_execution_context
        instance, partitions_def, key = op.instance, op.assets_def.partitions_def, op.partition_key
    if isinstance(partitions_def, MultiPartitionsDefinition):
        keys = partitions_def.get_partition_key_from_str(str(key)).keys_by_dimension
        dimensions: list[tuple[PartitionsDefinition | None, str]] = [
            (d.partitions_def, keys[d.name]) for d in partitions_def.partitions_defs]
    else:
        dimensions = [(partitions_def, key)]
    for definition, name in dimensions:
        if not isinstance(definition, DynamicPartitionsDefinition) or definition.name is None:
            continue
        if not instance.has_dynamic_partition(definition.name, name):
            instance.add_dynamic_partitions(definition.name, [name])
            context.log.warning(f"partition {name} of {definition.name} was deleted while this "
                                "run worked on it (the UI's Delete partition?): added back, "
                                "OpsDB still holds it")
