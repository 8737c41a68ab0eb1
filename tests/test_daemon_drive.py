"""`ccat-dt drive` on a deployment whose Dagster daemon runs (`make ui` in one terminal, drive in
another): the daemon ticks the sensors and executes their runs; the drive starts none and
waits for the daemon to finish, reporting its runs. Before, both ticked the sensors with their
own cursors: the same work was launched twice (a package built by the drive's run and found
"already built" by the daemon's), or the drive left the daemon's queued runs to it and exited
0 at once, with nothing archived."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    BetaWarning,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    PreviewWarning,
)
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import SENSOR_DAEMON, drive, live_daemon
from ccat_assets.instance import write_instance_yaml
from ccat_assets.runpool import RunPool
from ccat_assets.tags import DRIVE_TAG
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationType,
    PackageState,
    RawDataPackage,
    Site,
)
from ccat_dt.reaper import certificate_problems
from ccat_dt.report import disagreements
from ccat_dt.storage import files_under
from tests.browser import START_TIMEOUT_S, dagster_daemon
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere
from tests.helpers import observe
from tests.test_exit_codes import CCAT_DT, clean_env
from tests.test_lifecycle import packages
from tests.test_operator_actions import check_status
from tests.test_ui_browser import LIFECYCLE
from tests.test_ui_run_actions import four_packages_one_run_per_link, on_disk

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)


def test_drive_beside_a_running_daemon_leaves_the_work_to_it_and_ends_when_it_is_done(
        config: Config, opsdb: OpsDB, tmp_path: Path) -> None:
    source = observe(config, opsdb, observations=1, files=1)
    home = config.directory / "dagster_home"
    write_instance_yaml(config, home)
    env = clean_env(CCAT_DT_CONFIG=str(config.path), DAGSTER_HOME=str(home))
    with dagster_daemon(home, config.path, tmp_path / "daemon.log"), \
            DagsterInstance.from_config(str(home)) as instance:
        deadline = time.monotonic() + START_TIMEOUT_S
        while SENSOR_DAEMON not in instance.get_daemon_heartbeats():  # its sensor part is up
            assert time.monotonic() < deadline, "the daemon's sensor part never reported"
            time.sleep(0.2)

        drive = subprocess.run([CCAT_DT, "drive", "--wait", "0"], capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, env=env, timeout=600,
                               check=False)

        assert drive.returncode == 0, drive.stdout + drive.stderr
        # Every run the daemon's, each run key once, all succeeded, none left in flight.
        runs = instance.get_runs()
        assert [r.run_id for r in runs if r.tags.get(DRIVE_TAG)] == []
        keys = collections.Counter(r.tags.get("dagster/run_key") for r in runs)
        assert [key for key, n in keys.items() if n > 1] == []
        assert {r.status for r in runs} == {DagsterRunStatus.SUCCESS}

        # When the drive ended, everything was done: OpsDB and the storage.
        found = packages(opsdb)
        assert len(found) == 2 and {p.state for p in found} == {PackageState.ARCHIVED}
        for package in found:
            lta = [c for c in package.copies
                   if c.location.location_type == LocationType.LONG_TERM_ARCHIVE]
            assert sorted(c.location.site.short_name for c in lta) == ["cologne", "us"]
            for copy in lta:
                path = Path(copy.location.root) / copy.relative_path
                assert hash_file(path)[0] == package.checksum
            assert all(c.status == CopyStatus.DELETED for c in package.copies
                       if c.location.location_type == LocationType.BUFFER)
            assert certificate_problems(opsdb, config, package.name) == []
        assert files_under(source) == []
        assert disagreements(opsdb) == []
        assert transfers_out_of_the_observatory(opsdb) == sorted(
            (p.name, p.primary_site.short_name) for p in found)

        # ... and the Dagster instance shows the same: every partition, every check green.
        names = {p.name for p in found}
        assert instance.get_materialized_partitions(AssetKey("purge_status")) == names
        for asset, check in LIFECYCLE.items():
            statuses = check_status(instance, asset, check)
            assert statuses and set(statuses.values()) == {"passed"}, (asset, statuses)

        # What the drive says: it left the work to the daemon, and names the daemon's runs.
        assert "a Dagster daemon ticks the sensors of this deployment" in drive.stdout
        # The runs that ended while it waited: a run the daemon ended before the drive began
        # to wait (its packaging, on a quick daemon) is not among them.
        waited = re.search(r"(\d+) run\(s\) of the Dagster daemon waited for", drive.stdout)
        assert waited is not None, drive.stdout
        assert 0 < int(waited[1]) <= len(runs), drive.stdout
        assert sum(line.startswith("ok ") for line in drive.stdout.splitlines()) == int(waited[1])


def test_drive_right_after_the_daemon_was_killed_does_the_work_at_once(
        config: Config, opsdb: OpsDB, tmp_path: Path) -> None:
    """`make ui` killed (kill -9 of the daemon and its code server, as an OOM kill or a closed
    terminal does), then new data filed and `ccat-dt drive` run: the daemon's last heartbeat
    is seconds old. Before, the drive waited for that daemon until its heartbeat was 2 min
    old, then ticked the sensors itself. Now it sees that the daemon's process is gone
    (recorded with its heartbeats, ccat_assets/sqlite_storage.py), says so and does the work
    at once; nothing is done twice."""
    home = config.directory / "dagster_home"
    write_instance_yaml(config, home)
    env = clean_env(CCAT_DT_CONFIG=str(config.path), DAGSTER_HOME=str(home))
    with dagster_daemon(home, config.path, tmp_path / "daemon.log") as daemon, \
            DagsterInstance.from_config(str(home)) as instance:
        deadline = time.monotonic() + START_TIMEOUT_S
        while SENSOR_DAEMON not in instance.get_daemon_heartbeats():  # its sensor part is up
            assert time.monotonic() < deadline, "the daemon's sensor part never reported"
            time.sleep(0.2)
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon and its code server
        daemon.wait()
        source = observe(config, opsdb, observations=1, files=1)

        drive = subprocess.run([CCAT_DT, "drive", "--wait", "0"], capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, env=env, timeout=600,
                               check=False)

        assert drive.returncode == 0, drive.stdout + drive.stderr
        assert "a Dagster daemon ticks the sensors" not in drive.stdout, drive.stdout
        assert (f"but its process {daemon.pid} on {socket.gethostname()} is gone): this drive "
                "ticks the sensors itself") in drive.stdout, drive.stdout
        runs = instance.get_runs()
        assert runs and all(r.tags.get(DRIVE_TAG) for r in runs)  # the drive's, every one
        keys = collections.Counter(r.tags.get("dagster/run_key") for r in runs)
        assert [key for key, n in keys.items() if n > 1] == []
        assert {r.status for r in runs} == {DagsterRunStatus.SUCCESS}
    found = packages(opsdb)
    assert len(found) == 2 and {p.state for p in found} == {PackageState.ARCHIVED}
    assert files_under(source) == []
    assert transfers_out_of_the_observatory(opsdb) == sorted(
        (p.name, p.primary_site.short_name) for p in found)
    assert_safe(config, opsdb)


def transfers_out_of_the_observatory(opsdb: OpsDB) -> list[tuple[str, str]]:
    """(package, destination site) of every transfer from the observatory buffer."""
    with opsdb.session() as session:
        buffer = session.scalar(select(DataLocation.id).join(Site).where(
            Site.short_name == "ccat", DataLocation.location_type == LocationType.BUFFER))
        return sorted((name, site) for name, site in session.execute(
            select(RawDataPackage.name, Site.short_name)
            .join(Operation, Operation.package_id == RawDataPackage.id)
            .join(DataLocation, Operation.destination_location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id)
            .where(Operation.operation_type == OperationType.TRANSFER,
                   Operation.source_location_id == buffer)))


def test_a_daemon_started_while_the_drive_holds_its_runs_queued_executes_each_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make ui` started while a drive's own copies wait in its pool for their link (one run
    per link at once). They wait QUEUED (so that the UI's Terminate stops them), and the
    daemon's run queue dequeues every queued run: the drive leaves them to it (claim) and
    starts none of them itself, says so (TAKEN), then waits for the daemon to finish the
    work. Each run is executed once, by one of them: no run started twice, each package
    transferred once from the observatory, archived once at each site."""
    config, home, opsdb, raw = four_packages_one_run_per_link(tmp_path)
    try:
        with DagsterInstance.from_config(str(home)) as instance, ExitStack() as daemon:
            left: list[str] = []  # the drive's own runs waiting as the daemon started
            wait = RunPool.wait

            def make_ui(pool: RunPool, timeout: float | None = None) -> Any:
                """Once runs of the drive's wait for their link: the daemon starts."""
                if not left and pool.children and any(not q.adopted for q in pool.queue):
                    left.extend(q.run.run_id for q in pool.queue if not q.adopted)
                    daemon.enter_context(dagster_daemon(home, config.path,
                                                        tmp_path / "daemon.log"))
                    deadline = time.monotonic() + START_TIMEOUT_S
                    while live_daemon(instance) is None:  # its run queue is up
                        assert time.monotonic() < deadline, "the daemon's queue never reported"
                        time.sleep(0.2)
                return wait(pool, timeout)

            monkeypatch.setattr(RunPool, "wait", make_ui)
            monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
            lines: list[str] = []
            report = drive(build_definitions(config), instance, wait_s=0, log=lines.append)

            assert left, "\n".join(lines)
            assert report.failed == [], "\n".join(lines)
            for run_id in left:  # left to the daemon, which executed them
                run = instance.get_run_by_id(run_id)
                assert run is not None and run.status == DagsterRunStatus.SUCCESS, run_id
                assert not run.tags.get(DRIVE_TAG), run.tags
                assert any(line.startswith("TAKEN ") and run_id in line for line in lines), \
                    "\n".join(lines)
            runs = instance.get_runs()
            assert {r.status for r in runs} == {DagsterRunStatus.SUCCESS}
            for run in runs:  # none started twice (by the drive and by the daemon)
                assert len(instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
                           ) == 1, run.run_id
            keys = collections.Counter(r.tags.get("dagster/run_key") for r in runs)
            assert [key for key, n in keys.items() if n > 1] == []
        found = packages(opsdb)
        assert len(found) == 4 and {p.state for p in found} == {PackageState.ARCHIVED}
        assert transfers_out_of_the_observatory(opsdb) == sorted(
            (p.name, p.primary_site.short_name) for p in found)
        on_disk(config, raw)  # read from the disks: each file once in each archive
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()
