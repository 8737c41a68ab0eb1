"""The run tags and cursor keys the Dagster layer and the sensors agree on (plain strings:
the commands that only read OpsDB import this without loading Dagster)."""

RETRY_TAG = "ccat/retry"  # a run an operator's `ccat-dt retry` launched
WORK_TAG = "ccat/work"  # the work a run does, the same for every attempt at it
AGAIN_TAG = "ccat/again"  # asked for again although a run of the work had succeeded
DRIVE_TAG = "ccat/drive"  # host:pid of the drive process that executed the run
WORKER_TAG = "ccat/worker"  # host:pid of the process executing the run, from its start
WORKER_ID_TAG = "ccat/worker_id"  # "machine=… namespace=… boot=… start=…" of that process:
# what tells it from any other process with its pid (another machine of the same name, a
# container, after a restart of the machine, the pid used again): inflight._identity
# The tags that say which process executes a run. The UI's Re-execute copies a run's tags to
# the new run; these are blanked there (routing.RoutedRunCoordinator): they name the parent's
# process, and a new run judged by them would be closed as dead while it runs.
PROCESS_TAGS = (DRIVE_TAG, WORKER_TAG, WORKER_ID_TAG)
# How a run came to be asked for: blanked on a re-execution too (an operator's UI action,
# neither), lest its runs count toward "asked again and left work due" (sensors.reattempt).
PROVENANCE_TAGS = (AGAIN_TAG, RETRY_TAG)
# A run stopped with no person's doing: its drive stopped ("drive": a timeout, a service
# manager, a shutdown, Ctrl-C) or its own process told to stop ("signal"); it ends CANCELED,
# no failed attempt, but the same work stopped so again and again past the re-attempt horizon
# is told to a person (ccat_dt/reattempt.py). Absent on a run an operator terminated (the
# UI's Terminate). Blanked on a re-execution too: it says how the parent ended.
STOPPED_TAG = "ccat/stopped"
LINK_TAG = "ccat/link"  # "ORIGIN->DESTINATION": run limits per link (routes[].max_concurrent)
QUEUE_TAG = "ccat/queue"  # the Celery queue of the site whose data the run touches
UNROUTED_TAG = "ccat/unrouted"  # why a run could not be routed
# Dagster cannot delete a run tag: a blanked tag's value is "", which every reader takes as
# absent (`run.tags.get(TAG)`, never `TAG in run.tags`).
NEXT_AT = "next_at"  # a sensor's JSON cursor may say when its next work falls due (epoch s)
# The process that writes the Dagster daemon's heartbeats (run storage's key-value store; JSON:
# daemon_id, worker "host:pid", identity as WORKER_ID_TAG): written by the embedded storage
# (sqlite_storage.SqliteRuns), read by driver.daemon_gone.
DAEMON_PROCESS_KEY = "ccat/daemon_process"
