"""The fixity scrub as a job: re-read a batch of LTA copies and report each as the
`lta_copy_checksum` check of its partition, so scrub results sit beside the arrival checks."""

from dagster import Config, Failure, OpExecutionContext, job, op

from ccat_assets.integrity import copy_check
from ccat_assets.partitions import split_key
from ccat_dt.opsdb.models import LocationType
from ccat_dt.scrub import batch_problems, scrub
from resources.deployment import Deployment


class ScrubBatch(Config):
    """package|site partition keys of the LTA copies to re-read (set by the schedule)."""

    partitions: list[str]


@op
def reread_lta_copies(context: OpExecutionContext, config: ScrubBatch,
                      deployment: Deployment) -> int:
    """Each mismatch marks the copy CORRUPT; the repair sensor then restores it. A copy whose
    location cannot be looked at (not mounted, unreachable), or whose file cannot be read (its
    disk failed the read, or it is refused to ccat-dt's user), is left as it was, due again at
    the next scrub, and the run fails with the cause once the rest of the batch is done.
    A batch typed in by hand with a bad entry is refused whole, before anything is read."""
    if not config.partitions:
        context.log.info("scrub_job: no partitions given, nothing to re-read")
        return 0
    problems = batch_problems(deployment.opsdb, deployment.config, config.partitions)
    if problems:
        raise Failure(description=(
            f"scrub_job: {len(problems)} of {len(set(config.partitions))} partitions refused, "
            f"nothing re-read: {'; '.join(problems)}"), allow_retries=False)
    failed = reread = 0  # a copy OpsDB records no more is passed over (logged): not counted
    unreached: list[str] = []
    deployment.metrics.watch_progress()  # the bytes hashed so far, while it runs
    batch = [split_key(key) for key in config.partitions]
    for package, site, result in scrub(deployment.opsdb, deployment.config, batch):
        if not result.reached:
            unreached.append(result.description)
            context.log.warning(f"scrub: {result.description}")
            continue
        reread += 1
        failed += not result.passed
        # On the partition's latest materialization, so that the partition, the check list
        # and the lineage node show it (red until the repair's new copy passes its check).
        context.log_event(copy_check(  # type: ignore[arg-type]  # accepted at runtime
            context.instance, package, site, LocationType.LONG_TERM_ARCHIVE, False,
            passed=result.passed, description=f"scrub: {result.description}",
            metadata={"path": result.path or "", "copy_id": result.copy_id or 0}))
    context.log.info(f"scrubbed {reread} LTA copies, "
                     f"{failed} bad, {len(unreached)} not reached")
    if unreached:
        raise Failure(description=(
            f"{len(unreached)} of {len(config.partitions)} LTA copies could not be re-read "
            f"(none marked corrupt; re-read at the next scrub): {unreached[0]}"),
            allow_retries=False)
    return failed


@job
def scrub_job() -> None:
    reread_lta_copies()
