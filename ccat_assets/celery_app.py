"""The Celery app a site worker runs (`ccat-dt worker --site S`): dagster-celery's tasks, with
the broker taken from the deployment's configuration ($CCAT_DT_CONFIG)."""

from celery.signals import worker_process_init
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from ccat_assets.celery_watch import stoppable_steps
from ccat_dt.config import load_config

_config = load_config()
app = make_app({"broker": _config.celery_broker, "backend": _config.celery_backend})
app.conf.task_track_started = True  # a step's worker and pid, for its run to ask after
# No message taken ahead of a free pool process: one that a worker killed -9 had reserved
# would come back only after the broker's visibility timeout (an hour), its run waiting.
app.conf.worker_disable_prefetch = True
# A step that ends while Redis is unreachable (restarted, failed over, a network blip) stores its
# state once it is back, retried with a jittered back-off of up to 10 s (some 4 min in all,
# beyond the run's wait, celery_watch.BROKER_OUTAGE_S): not a failure of work that was done.
app.conf.result_backend_always_retry = True
app.conf.result_backend_max_retries = 60
execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
# A run's Terminate stops its step in the pool process executing it (celery_watch.py).
worker_process_init.connect(lambda **_: stoppable_steps(), weak=False)
