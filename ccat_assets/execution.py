"""Where a run's steps execute: in-process (embedded default) or, with a Celery broker
configured, on the queue of the site whose data the run touches."""

from __future__ import annotations

import os
from typing import Any

from dagster import ExecutorDefinition

from ccat_dt.config import Config


def executor(config: Config) -> ExecutorDefinition:
    """Either executor tags a run launched without the sensors' tags with its link and site
    queue when it starts, and the Celery one sends its steps to that queue (see routing.py)."""
    from ccat_assets.routing import routed_celery_executor, routed_in_process_executor

    if config.celery_broker is None:
        return routed_in_process_executor(config)
    return routed_celery_executor(config)


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
