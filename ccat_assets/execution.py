"""Where a run's steps execute: in-process (embedded default) or, with a Celery broker
configured, on the queue of the site whose data the run touches."""

from __future__ import annotations

import os
from typing import Any

from dagster import ExecutorDefinition, in_process_executor

from ccat_dt.config import Config


def executor(config: Config) -> ExecutorDefinition:
    if config.celery_broker is None:
        return in_process_executor
    from dagster_celery import celery_executor

    return celery_executor


def _source(env: str, value: str | None) -> Any:
    # Secrets stay out of run config (which the UI shows): point at the environment variable.
    return {"env": env} if os.environ.get(env) else value


def on_queue(config: Config, queue: str, run_config: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Run config sending every step of the run to `queue` (nothing extra when embedded)."""
    run_config = dict(run_config or {})
    if config.celery_broker is not None:
        run_config["execution"] = {"config": {
            "broker": _source("CCAT_DT_CELERY_BROKER", config.celery_broker),
            "backend": _source("CCAT_DT_CELERY_BACKEND", config.celery_backend),
            "config_source": {"task_default_queue": queue}}}
    return run_config
