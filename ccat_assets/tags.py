"""The run tags and cursor keys the Dagster layer and the sensors agree on."""

from dagster import DagsterRunStatus

RETRY_TAG = "ccat/retry"  # a run an operator's `ccat-dt retry` launched
WORK_TAG = "ccat/work"  # the work a run does, the same for every attempt at it
DRIVE_TAG = "ccat/drive"  # host:pid of the drive process that executed the run
LINK_TAG = "ccat/link"  # "ORIGIN->DESTINATION": run limits per link (routes[].max_concurrent)
QUEUE_TAG = "ccat/queue"  # the Celery queue of the site whose data the run touches
UNROUTED_TAG = "ccat/unrouted"  # why a run could not be routed
NEXT_AT = "next_at"  # a sensor's JSON cursor may say when its next work falls due (epoch s)
IN_FLIGHT = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
