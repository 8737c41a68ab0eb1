"""What the stage modules share: how a step fails (retried, or once with its cause as the
headline) and how a copy stage plans its placement and reports its copy's verification."""

from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    Backoff,
    Failure,
    RetryPolicy,
)

from ccat_assets.interrupts import NOT_RETRIED
from ccat_assets.partitions import keep_partition, split_key
from ccat_dt.config import Config
from ccat_dt.opsdb.models import LocationType
from ccat_dt.references import Placement
from ccat_dt.replicas import NotReady, check_stage, plan_placement
from resources.deployment import Deployment

GROUP = "lifecycle"
# A failed step is retried in its run after this, doubling (2 s, 4 s): a link that drops for
# seconds is ridden out (tests shorten it in-process).
RETRY_DELAY_S = 2.0


def transient_retries(config: Config) -> dict[str, Any]:
    """The @asset arguments of a step retried in its run: its retry policy, and, where its
    steps execute in the run's process (the embedded default), no retry once the run was
    interrupted or terminated (interrupts.NOT_RETRIED)."""
    return {"retry_policy": RetryPolicy(max_retries=config.settings.policies.max_attempts - 1,
                                        delay=RETRY_DELAY_S, backoff=Backoff.EXPONENTIAL),
            "hooks": {NOT_RETRIED} if config.celery_broker is None else set()}


def permanent(exc: BaseException) -> Failure:
    """A failure no retry can fix (a missing source copy, an unknown package): fails the step
    once, with the cause as its headline (not "Exceeded max_retries")."""
    return Failure(description=str(exc), allow_retries=False)


def planned(context: AssetExecutionContext, deployment: Deployment,
            kind: LocationType) -> Placement:
    """Where the copy of the step's package x site partition goes and where it comes from;
    the IO manager moves and verifies it."""
    package, site = split_key(context.partition_key)
    try:
        placement = plan_placement(deployment.opsdb, deployment.config, package, site, kind)
    except (NotReady, LookupError) as exc:
        raise permanent(exc) from exc
    keep_partition(context)
    return placement


def verified(context: AssetCheckExecutionContext, deployment: Deployment, package: str,
             site: str, kind: LocationType) -> AssetCheckResult:
    """The copy's verification: the read this check's run did of it (the transport's
    landed-bytes hash), else a re-read now; the evidence (checksum, when, by what, operation)
    as metadata."""
    verification = check_stage(deployment.opsdb, deployment.config, package, site, kind,
                               run_id=context.run.run_id)
    keep_partition(context)
    # A copy whose storage could not be looked at is not known bad: a warning, not an error.
    severity = AssetCheckSeverity.ERROR if verification.reached else AssetCheckSeverity.WARN
    return AssetCheckResult(passed=verification.passed, description=verification.description,
                            severity=severity,
                            metadata={"path": verification.path or "",
                                      "copy_id": verification.copy_id or 0,
                                      **verification.evidence})
