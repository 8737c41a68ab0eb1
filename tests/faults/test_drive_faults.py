"""`ccat-dt drive` as a stand-in for the daemon: its sensor cursors outlive it (more work
than one page of OpsDB rows, over two drives), two drives on one deployment never run the
same work twice, and a drive killed (SIGKILL) at any point is finished by a plain drive."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    RunsFilter,
    SensorEvaluationContext,
    sensor,
)
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import CURSOR_KEY, RUN_KEY, drive
from ccat_assets.inflight import IN_FLIGHT
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationStatus, PackageCopy, RawDataPackage
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    child,
    child_argv,
    deployment,
    finish,
    observe,
    run,
    spawn,
    wait_for,
)
from tests.helpers import observe as observe_files

PAGE = 1  # OpsDB rows a sensor reads per tick here (500 in production)


def wait_for_text(*processes: subprocess.Popen[str], text: str = "waiting",
                  timeout: float = 60) -> None:
    """Each process has printed a line containing `text`."""
    deadline = time.monotonic() + timeout
    for process in processes:
        assert process.stdout is not None
        while text not in (process.stdout.readline() or text):
            assert time.monotonic() < deadline, f"no {text!r} from {process.args!r}"
        assert process.poll() is None, process.args


def _no_duplicates(instance: DagsterInstance, opsdb: OpsDB) -> None:
    """Each run key launched once; one copy row per package and location."""
    keys = Counter(r.tags.get(RUN_KEY) for r in instance.get_runs() if r.tags.get(RUN_KEY))
    assert [k for k, n in keys.items() if n > 1] == []
    with opsdb.session() as session:
        copies = Counter((c.package_id, c.location_id)
                         for c in session.scalars(select(PackageCopy)))
        assert [k for k, n in copies.items() if n > 1] == []
        left = session.scalars(select(Operation).where(
            Operation.status == OperationStatus.IN_PROGRESS)).all()
        assert left == []


def test_more_packages_than_a_page_across_two_drives(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """Sensors read PAGE rows a tick: the first drive keeps ticking while a cursor moves, not
    only while runs launch; the second, a fresh process, starts where the first stopped (the
    cursors are in the instance) and sees the new work behind all the pages already read."""
    config = deployment(tmp_path / "deploy", policies={
        "sensor_page_rows": PAGE, "retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    try:
        for i in range(2 * PAGE + 1):  # three pages of packages
            observe(config, opsdb, name=f"obs-{i}", files=1, size=2000)
        first = child(config, "drive", home=instance.root_directory)
        assert first.returncode == 0, first.stderr[-3000:]
        assert len([k for k in first.result["result"]["launched"]
                    if k.startswith("package:")]) == 2 * PAGE + 1
        archived_everywhere(config, opsdb)
        stored = instance.run_storage.get_cursor_values({CURSOR_KEY + "package_sensor"})
        with opsdb.session() as session:
            last = max(session.scalars(select(RawDataPackage.id)))
        assert stored[CURSOR_KEY + "package_sensor"] == str(last)

        for i in range(2 * PAGE + 1, 3 * PAGE + 1):
            observe(config, opsdb, name=f"obs-{i}", files=1, size=2000)
        second = child(config, "drive", home=instance.root_directory)

        assert second.returncode == 0, second.stderr[-3000:]
        built = sorted(k for k in second.result["result"]["launched"] if k.startswith("package:"))
        assert built == [f"package:obs-{i}_primecam-f280_p00"
                         for i in range(2 * PAGE + 1, 3 * PAGE + 1)]
        archived_everywhere(config, opsdb)
        _no_duplicates(instance, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_501_packages_at_the_default_page_size_over_two_ticks(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The production page (500 OpsDB rows a tick) with one package more: the first tick asks
    for the first 500 and keeps its place, the next tick (as the next drive, from the cursor
    the instance keeps) asks for the 501st; none is asked for twice or lost."""
    from dagster import SensorResult, build_sensor_context

    from resources.deployment import Deployment
    from sensors.lifecycle import package_sensor

    config = deployment(tmp_path / "deploy")
    assert config.settings.policies.sensor_page_rows == 500  # the default, not a test's
    opsdb = OpsDB(config.opsdb_url)
    resources = {"deployment": Deployment(config_path=str(config.path))}
    try:
        for i in range(501):
            observe(config, opsdb, name=f"obs-{i}", files=1, size=100)
        asked: list[str] = []
        cursor = None
        for tick in range(2):  # each tick starts from the cursor the last one left
            with build_sensor_context(instance=instance, cursor=cursor,
                                      resources=resources) as context:
                result = package_sensor(context)
            assert isinstance(result, SensorResult) and result.run_requests is not None
            for request in result.run_requests:
                assert request.partition_key is not None
                asked.append(request.partition_key)
            cursor = result.cursor
            if tick == 0:
                assert len(result.run_requests) == 500
        assert sorted(asked) == sorted(f"obs-{i}_primecam-f280_p00" for i in range(501))
        with opsdb.session() as session:
            assert cursor == str(max(session.scalars(select(RawDataPackage.id))))
    finally:
        opsdb.dispose()


def test_two_concurrent_drives_run_nothing_twice(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    for i in range(2):
        observe(config, opsdb, name=f"obs-{i}", files=2, size=5000)
    marker = tmp_path / "holding"
    holder = spawn(child_argv(config, "drive", kill="hold", marker=str(marker),
                              home=instance.root_directory))
    wait_for(marker, holder)  # the first drive holds the lock (and would run everything)
    second = spawn(child_argv(config, "drive", home=instance.root_directory))
    third = spawn(child_argv(config, "drive", home=instance.root_directory))
    try:
        wait_for_text(second, third)  # both wait for the lock
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies: the kernel frees the lock
        assert finish(holder).killed
        outcomes = [finish(second, timeout=600), finish(third, timeout=600)]  # slow when loaded
    finally:
        for process in (holder, second, third):
            if process.poll() is None:
                process.kill()
    assert [o.returncode for o in outcomes] == [0, 0], [o.stderr[-3000:] for o in outcomes]
    launched = [o.result["result"]["launched"] for o in outcomes]
    assert sorted(len(x) == 0 for x in launched) == [False, True]  # one did it all
    archived_everywhere(config, opsdb)
    _no_duplicates(instance, opsdb)
    assert_safe(config, opsdb)
    assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []


@pytest.mark.parametrize(("kill", "nth"), [
    ("package-before-record", 2),  # the second packaging run, tar in place, not recorded
    ("copy-before-record", 2),  # a transfer or archive landed and renamed, not recorded
    ("after-run", 4),  # a run done, others in flight or not yet created
])
def test_a_killed_drive_is_finished_by_a_plain_drive(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, kill: str, nth: int) -> None:
    for i in range(2):
        observe(config, opsdb, name=f"obs-{i}", files=2, size=5000)

    dead = child(config, "drive", kill=kill, nth=nth, home=instance.root_directory)
    assert dead.killed, dead.stderr[-3000:]
    assert_safe(config, opsdb, settled=False, allow_partial=True,
                expected_findings=[("dark", ".tar")] if kill != "after-run" else [])

    report = run(config, instance)

    if kill != "after-run":  # a run died with the drive: marked failed, then re-attempted
        # (its archiving step: the buffer copy without its LTA copy is the lta_copy sensor's)
        # (and a run the drive had created but not yet started: it died with the drive too)
        assert 1 <= len(report.dead_runs) <= 2
        assert any(k.startswith(("reattempt:", "lta_copy:")) for k in report.launched)
    assert report.failed == []
    archived_everywhere(config, opsdb)
    _no_duplicates(instance, opsdb)
    assert_safe(config, opsdb)
    assert [r for r in instance.get_runs(RunsFilter(statuses=IN_FLIGHT))] == []
    assert all(r.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)
               for r in instance.get_runs())


def test_a_sensor_that_keeps_failing_ends_the_drive_and_is_reported(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """A sensor failing at every tick (a bug, a partition Dagster does not know) is ticked
    again after 1, 2, 4 ... s, not every second for hours; the drive ends once the next tick
    is further away than its wait, says which sensor fails and why, and the other sensors'
    work is done meanwhile."""
    @sensor(minimum_interval_seconds=1)
    def broken(context: SensorEvaluationContext) -> None:
        raise RuntimeError("no such column: raw_data_packages.lineage")

    observe_files(config, opsdb, observations=1, files=1)
    lines: list[str] = []
    started = time.monotonic()
    report = drive(Definitions.merge(build_definitions(config), Definitions(sensors=[broken])),
                   instance, wait_s=3, log=lines.append)

    assert time.monotonic() - started < 60
    assert report.failed == []
    assert report.sensor_failures == {
        "broken": "RuntimeError: no such column: raw_data_packages.lineage"}
    ticks = [line for line in lines if line.startswith("sensor broken failed")]
    # 1, 2, 4 s ... (more while the other work lasts on a slow machine), until the next tick
    # is further away than the 3 s the drive waits
    delays = [line.rsplit("again in ", 1)[1] for line in ticks]
    assert len(delays) >= 3 and delays == [f"{2 ** i} s" for i in range(len(delays))]
    for site in ("cologne", "us"):
        assert len(list(config.resolve_root(f"sites/{site}/lta").rglob("*.tar"))) == 2
