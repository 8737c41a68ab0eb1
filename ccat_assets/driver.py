"""Evaluate the real sensors and execute the runs they request, in this process, until idle.

This is what the Dagster daemon does (tick sensors, skip run keys already launched, launch
runs) minus the scheduling loop, so that the embedded default and the tests need no daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from dagster import (
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    JobExecutionResult,
    RepositoryDefinition,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    build_schedule_context,
    build_sensor_context,
    execute_job,
)
from dagster._core.definitions.dynamic_partitions_request import AddDynamicPartitionsRequest
from dagster._core.definitions.reconstruct import ReconstructableRepository

RUN_KEY = "dagster/run_key"
SENSOR = "dagster/sensor_name"


@dataclass
class DriveReport:
    launched: list[str] = field(default_factory=list)  # run keys, in launch order
    failed: list[str] = field(default_factory=list)  # run keys whose run failed
    rounds: int = 0


def drive(defs: Definitions, instance: DagsterInstance, *, max_rounds: int = 50,
          schedules: bool = False, log: Callable[[str], None] = lambda _: None) -> DriveReport:
    """Tick every sensor, run what it asks for; repeat until a round launches nothing.
    With `schedules`, every schedule is ticked once first, as if its time had come."""
    repository = defs.get_repository_def()
    cursors: dict[str, str | None] = {}
    report = DriveReport()
    if schedules:
        for schedule_def in repository.schedule_defs:
            with build_schedule_context(instance=instance, resources=defs.resources,
                                        repository_def=repository,
                                        scheduled_execution_time=datetime.now(UTC)) as context:
                data = schedule_def.evaluate_tick(context)
            for run in data.run_requests or []:
                _launch(repository, instance, run, schedule_def.name,
                        schedule_def.job_name, report, log)
    # Sensors that create partitions tick first, so placement requests never name a package
    # the instance has not registered yet (an OpsDB ahead of a fresh or restored instance).
    sensors = sorted(repository.sensor_defs,
                     key=lambda s: s.name not in ("package_sensor", "staging_sensor"))
    for _ in range(max_rounds):
        report.rounds += 1
        launched_before = len(report.launched)
        for sensor_def in sensors:
            name = sensor_def.name
            # The driver's own instance, not a new one built from the ref at every tick (that
            # cost ~0.1 s a tick: storage set-up and schema checks); with the ref as well,
            # the partitions a tick adds count when its run requests are checked.
            with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                      cursor=cursors.get(name), repository_def=repository,
                                      resources=defs.resources, sensor_name=name) as context:
                tick = sensor_def.evaluate_tick(context)
            for request in tick.dynamic_partitions_requests or []:
                if isinstance(request, AddDynamicPartitionsRequest):
                    instance.add_dynamic_partitions(request.partitions_def_name,
                                                    list(request.partition_keys))
                else:
                    for key in request.partition_keys:
                        instance.delete_dynamic_partition(request.partitions_def_name, key)
            for event in tick.asset_events or []:  # the operator overview (sensors/overview.py)
                instance.report_runless_asset_event(event)
            if tick.cursor is not None:
                cursors[name] = tick.cursor
            for run in tick.run_requests or []:
                _launch(repository, instance, run, name, _default_job(sensor_def), report, log)
        if len(report.launched) == launched_before:
            break
    return report


def launch(defs: Definitions, instance: DagsterInstance, run: RunRequest, *, origin: str,
           report: DriveReport, log: Callable[[str], None] = lambda _: None) -> None:
    """Execute one run request the way the sensors' runs are executed."""
    _launch(defs.get_repository_def(), instance, run, origin, None, report, log)


def _default_job(sensor_def: SensorDefinition) -> str | None:
    """The sensor's only job; None for a multi-job sensor (its requests name their job)."""
    return sensor_def.job_name if len(sensor_def.targets) == 1 else None


def _launch(repository: RepositoryDefinition, instance: DagsterInstance, run: RunRequest,
            origin: str, default_job: str | None, report: DriveReport,
            log: Callable[[str], None]) -> None:
    if run.run_key and instance.get_runs(
            RunsFilter(tags={RUN_KEY: run.run_key, SENSOR: origin}), limit=1):
        return  # a replayed tick: this run was launched before
    job = repository.get_job(run.job_name or default_job or "")
    tags = {**run.tags, RUN_KEY: run.run_key or "", SENSOR: origin}
    result: ExecuteInProcessResult | JobExecutionResult
    if job.executor_def.name == "in_process":
        result = job.execute_in_process(
            instance=instance, partition_key=run.partition_key, raise_on_error=False,
            run_config=run.run_config or None, tags=tags)
    else:  # steps go to site workers, which rebuild the job from its module
        recon = ReconstructableRepository.for_module(
            "ccat_assets.definitions", "defs").get_reconstructable_job(job.name)
        result = execute_job(recon, instance, run_config=run.run_config or None, tags=tags)
    key = run.run_key or job.name
    report.launched.append(key)
    log(f"{'ok    ' if result.success else 'FAILED'} {key}")
    if not result.success:
        report.failed.append(key)
