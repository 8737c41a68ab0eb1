"""What an operator sees while runs execute: one line per run, Dagster's event log elsewhere.

Dagster's default console logger prints every event of every run (~15 DEBUG lines per step),
which drowns the one line that matters. The CLI therefore runs in *quiet* mode:

- Dagster's run events go to the instance (as always: the UI and `ccat-dt why` read them from
  there) and to a log file (`log_dir/ccat-dt.log`), not to the terminal;
- Python log records (sensors, `ccat_dt` operation records) go to the same file; those
  meant for the operator (logged with `extra={"notice": True}`, e.g. a file bigger than the
  package cap) also to stderr, one line each;
- each finished run is reported as one line by `RunReporter` (stage, package, site, outcome,
  bytes, MB/s, seconds; for a failure, its cause and the next step), then one summary line;
- what sensors and schedules log on their ticks (`context.log`) goes to the file as well
  (`log_ticks_in_tree`), not to the terminal.

On a terminal, transfers show a live progress bar meanwhile (ccat_dt/progress.py).
With `-v` the events are shown on stderr as Dagster prints them. Outside the CLI (the daemon,
`dagster dev`, Celery workers) nothing changes: the `console` logger below behaves as Dagster's.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coloredlogs
from dagster import (
    AssetCheckEvaluation,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Field,
    RunsFilter,
    logger,
)
from dagster._core.definitions.instigation_logger import InstigationLogger
from dagster._core.events import JobFailureData
from dagster._core.execution.context.logger import InitLoggerContext
from dagster._core.utils import coerce_valid_log_level
from dagster._utils.log import default_date_format_string, default_format_string

from ccat_assets.stages import ASSET_STAGE, stages_of_job
from ccat_dt.logfiles import LogFile, prepare_directory
from ccat_dt.progress import terminal_bars
from ccat_dt.stages import Stage

CONSOLE_ENV = "CCAT_DT_RUN_CONSOLE"  # "off": run events are not printed to the terminal
FILE_ENV = "CCAT_DT_RUN_LOG_FILE"  # every run event (DEBUG) is appended to this file
RUN_KEY = "dagster/run_key"
LOG_NAME = "ccat-dt.log"
TICKS = "ccat_assets.ticks"  # + the sensor's or schedule's name


@logger(
    Field({"log_level": Field(str, is_required=False, default_value="DEBUG"),
           "name": Field(str, is_required=False, default_value="dagster")}),
    description="Dagster's colored console logger, unless $CCAT_DT_RUN_CONSOLE is 'off'; "
                "with $CCAT_DT_RUN_LOG_FILE also every event into that file.")
def console(init_context: InitLoggerContext) -> logging.Logger:
    level = coerce_valid_log_level(init_context.logger_config["log_level"])
    run_logger = logging.getLoggerClass()(init_context.logger_config["name"], level=level)
    if os.environ.get(CONSOLE_ENV, "").strip().lower() != "off":
        coloredlogs.install(
            logger=run_logger, level=level, fmt=default_format_string(),
            datefmt=default_date_format_string(),
            field_styles={"levelname": {"color": "blue"}, "asctime": {"color": "green"}},
            level_styles={"debug": {}, "error": {"color": "red"}})
    path = os.environ.get(FILE_ENV, "").strip()
    if path:
        handler = LogFile(path)  # a full or read-only log disk never fails the run
        handler.setFormatter(logging.Formatter(default_format_string(),
                                               default_date_format_string()))
        run_logger.addHandler(handler)
        run_logger.setLevel(logging.DEBUG)
    return run_logger


def with_run_loggers(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run config plus the `console` logger's entry: Dagster instantiates a job's loggers
    only when the run config names them (otherwise it uses its own console logger)."""
    merged: dict[str, Any] = dict(run_config or {})
    loggers = dict(merged.get("loggers") or {})
    loggers.setdefault("console", {"config": {}})
    merged["loggers"] = loggers
    return merged


def log_ticks_in_tree(context: Any, name: str) -> None:
    """Give a sensor or schedule context (from build_*_context) a `log` in the logging tree.

    Dagster's tick logger prints to stderr through a console logger of its own, outside the
    logging tree, so quiet mode could not keep it off the terminal: a line per tick. Here the
    tick logs to "ccat_assets.ticks.NAME" instead: the file in quiet mode, stderr with -v, as
    every other record. `drive` records no ticks in the instance, so the tick's captured log
    (which only a recorded tick shows in the UI) is not lost."""
    context._logger = InstigationLogger(instigator_name=name,
                                        console_logger=logging.getLogger(f"{TICKS}.{name}"))


@contextmanager
def quiet_runs(log_file: Path, *, verbose: bool) -> Iterator[Path]:
    """Within: run events and Python log records go to `log_file` (and to stderr only when
    `verbose`). Restores the environment and the root logger afterwards."""
    prepare_directory(log_file)
    saved = {name: os.environ.get(name) for name in (CONSOLE_ENV, FILE_ENV)}
    os.environ[FILE_ENV] = str(log_file)
    if not verbose:
        os.environ[CONSOLE_ENV] = "off"
    root = logging.getLogger()
    file_handler = LogFile(log_file)  # its disk full or read-only: one warning, runs go on
    file_handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - "
                                                "%(message)s"))
    handlers: list[logging.Handler] = [file_handler]
    terminal = logging.StreamHandler()
    if verbose:
        terminal.setFormatter(file_handler.formatter)
    else:  # only what is meant for the operator (records logged with extra={"notice": True})
        terminal.addFilter(lambda record: bool(getattr(record, "notice", False)))
        terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handlers.append(terminal)
    saved_level = root.level
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(min(saved_level or logging.WARNING, logging.INFO))
    try:
        with terminal_bars():  # live progress bars for transfers, on a terminal only
            yield log_file
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class RunLine:
    """One finished run, as the operator reads it."""

    key: str
    stage: str
    package: str
    site: str
    ok: bool
    bytes: int
    seconds: float
    cause: str = ""

    def text(self) -> str:
        rate = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        line = (f"{'ok' if self.ok else 'FAILED':<6} {self.stage:<9} {self.package:<30} "
                f"{self.site:<8} {self.bytes / 1e6:>8.1f} MB {rate:>7.1f} MB/s "
                f"{self.seconds:>6.1f} s")
        if not self.ok:
            step = (f"`ccat-dt why {self.package}` says whether it is re-attempted by itself "
                    "or waits for you (then fix the cause and `ccat-dt retry`)"
                    if self.package else "the run's events in the log file or the Dagster UI")
            # A staging run's partition is a request, which `why` knows, not a package: the
            # staging sensor's key is stage:REQUEST; a re-attempt's or a retry's says staging.
            if self.stage == "stage" and self.package:
                step = (f"`ccat-dt why {self.package}` shows the staging request and whether it "
                        "is re-attempted by itself or waits for you (then fix the cause and "
                        f"`ccat-dt retry`); `ccat-dt stage --release {self.package}` if it is "
                        "no longer wanted")
            line += (f"\n       cause: {self.cause or 'see the run in the Dagster UI'}; "
                     f"next: {step}")
        return line


# A stage as its run lines name it, whoever requested the run (the sensors' run keys say
# package and stage; the re-attempt's and retry's name the Stage: packaging, staging).
LABELS = {Stage.PACKAGING.value: "package", Stage.STAGING.value: "stage"}


def _key_parts(key: str) -> tuple[str, str, str]:
    """(stage, package, site) of a run key: stage:package[:site:...], reattempt:stage:
    package[|site]:episode:n, purge:package:site-or-*:digest, purge-unfinished:package:copy,
    rebuild:package:..., scrub:site:hour, stage:request; repair, failover and seed (a new
    archive site's copy) as a site copy: why:package:site:copy."""
    parts = key.split(":")
    if parts[0] == "reattempt" and len(parts) > 2:  # the stage it re-attempts, its partition
        package, _, site = parts[2].partition("|")
        return LABELS.get(parts[1], parts[1]), package, site
    stage = LABELS.get(parts[0], parts[0])
    package = parts[1] if len(parts) > 1 else ""
    site = parts[2] if len(parts) > 2 and stage in ("package", "site_copy", "lta_copy",
                                                     "purge", "repair", "failover",
                                                     "seed") else ""
    if stage == "scrub":
        return stage, "", package
    return stage, package, "" if site == "*" else site


CANCELED = ("canceled by an operator (the Dagster UI's Terminate): no failed attempt (it "
            "never escalates the work); its work is asked for again after the back-off; stop "
            "its sensor in the UI to hold it")


def run_failure(instance: DagsterInstance, run_id: str) -> str:
    """The first failed step's error of a run, in one line ("" when there is none); that it
    was canceled, for a run an operator terminated."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.status == DagsterRunStatus.CANCELED:
        return CANCELED
    for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE,
                                                     DagsterEventType.RUN_FAILURE}):
        event = record.dagster_event
        error = None
        if event is not None and event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            if error is not None and error.cause is not None and error.cls_name in (
                    "DagsterExecutionStepExecutionError", "RetryRequestedFromPolicy"):
                error = error.cause
        elif event is not None and isinstance(event.event_specific_data, JobFailureData):
            # raised before any step (a run refused as it starts: routing.check_launch),
            # not "Execution of run ... failed. An exception was thrown during execution."
            error = event.event_specific_data.error
        # a blocking check that failed: what it found, not "1 blocking asset check failed"
        if (error is not None and error.cls_name == "DagsterAssetCheckFailedError"
                and (found := _failed_checks(instance, run_id))):
            return found
        if error is not None and "DagsterExecutionInterruptedError" in (
                error.cls_name, error.cause.cls_name if error.cause else None):
            return "interrupted: the drive or the run was stopped (Ctrl-C, a signal)"
        if error is not None:
            # "dagster._core.definitions.events.Failure: why": the why is what matters
            text = re.sub(r"^[\w.]*\.(\w+): ", "", error.message.strip())
            return " ".join(text.split()) or error.cls_name or "failed"
        if event is not None and event.message:
            return " ".join(event.message.split())
    return ""


def _failed_checks(instance: DagsterInstance, run_id: str) -> str:
    """The failed asset checks of a run, each with what it found (its description)."""
    found = []
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        event = record.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if isinstance(evaluation, AssetCheckEvaluation) and not evaluation.passed:
            what = " ".join((evaluation.description or "failed").split())
            found.append(f"check {evaluation.check_name} failed: {what}")
    return "; ".join(found)


def failed_stage(instance: DagsterInstance, run_id: str) -> str | None:
    """The stage of a run's first failed step (None for a step of no stage's asset)."""
    for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE):
        if (stage := ASSET_STAGE.get(record.step_key or "")) is not None:
            return stage.value
    return None


@dataclass
class RunReporter:
    """The driver's `log` callback: turns each finished run into one `RunLine`, written with
    `write`. The driver reports "ok     KEY" or "FAILED KEY" for each run it executed."""

    instance: DagsterInstance
    write: Callable[[str], None] = print
    lines: list[RunLine] = field(default_factory=list)
    canceled: int = 0  # runs an operator terminated ("CANCELED KEY ..."): no failures

    def __call__(self, message: str) -> None:
        outcome, _, key = message.strip().partition(" ")
        key = key.strip()
        self.canceled += outcome == "CANCELED"
        if outcome not in ("ok", "FAILED") or not key:
            self.write(message)  # not a run outcome: pass it on as it is
            return
        line = self.describe(key, ok=outcome == "ok")
        self.lines.append(line)
        self.write(line.text())

    def describe(self, key: str, *, ok: bool) -> RunLine:
        stage, package, site = _key_parts(key)
        runs = self.instance.get_runs(RunsFilter(tags={RUN_KEY: key}), limit=1)
        if not runs:
            return RunLine(key, stage, package, site, ok, 0, 0.0)
        run = runs[0]
        stats = self.instance.get_run_stats(run.run_id)
        seconds = ((stats.end_time or 0.0) - (stats.start_time or 0.0)
                   if stats.start_time else 0.0)
        size = 0
        for record in self.instance.all_logs(run.run_id,
                                             of_type=DagsterEventType.ASSET_MATERIALIZATION):
            event = record.dagster_event
            materialization = event.step_materialization_data.materialization if event else None
            for name in ("size", "bytes", "deleted_bytes"):
                value = materialization.metadata.get(name) if materialization else None
                if value is not None and isinstance(value.value, int | float):
                    size = max(size, int(value.value))
        if not ok and len(stages_of_job(run.job_name)) > 1:  # a copy-and-archive run: the
            stage = failed_stage(self.instance, run.run_id) or stage  # stage that failed
        return RunLine(key, stage, package, site, ok, size, max(seconds, 0.0),
                       "" if ok else self.cause(run.run_id))

    def cause(self, run_id: str) -> str:
        return run_failure(self.instance, run_id)

    def summary(self) -> str:
        failed = [line for line in self.lines if not line.ok]
        moved = sum(line.bytes for line in self.lines)
        seconds = sum(line.seconds for line in self.lines)
        canceled = f", {self.canceled} canceled by an operator" if self.canceled else ""
        return (f"{len(self.lines)} run(s), {len(failed)} failed{canceled}, "
                f"{moved / 1e6:.1f} MB in {seconds:.1f} s of runs")
