"""A manual run whose process died (an operator's `dagster asset materialize` killed -9, a UI
run under the DefaultRunLauncher when the machine stopped) blocked its partition for ever: it
stayed STARTED, so the sensors never asked for that work again and the purge kept the package.
Now every run records its process as it starts, and one whose process is gone is marked failed
with the reason (ccat_assets/inflight.py); `ccat-dt drive` then finishes the package without
`ccat-dt retry`. A run whose process lives is never touched, however long it takes, nor one on
a host the drive cannot check; a run queued with no daemon to dequeue it is executed by the
drive.

The manual runs are real: `dagster asset materialize` (or `dagster job launch`, which queues
like the UI) in a child process against the test's instance, the materialisation held at a
point of its step until the test kills it (this module, run as a program)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    BetaWarning,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    PreviewWarning,
    RunsFilter,
)
from dagster._core.execution.plan.resume_retry import ReexecutionStrategy
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.types import DaemonHeartbeat
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import (
    QUEUED_DAEMON,
    SENSOR_DAEMON,
    close_dead_runs,
    daemon_gone,
    drive,
    live_daemon,
)
from ccat_assets.inflight import (
    IN_FLIGHT,
    WORKER_ID_TAG,
    WORKER_TAG,
    Liveness,
    close_if_dead,
    in_flight,
    liveness,
    record_worker,
)
from ccat_assets.instance import write_instance_yaml
from ccat_assets.partitions import package_site_key
from ccat_assets.tags import AGAIN_TAG, DRIVE_TAG, LINK_TAG, QUEUE_TAG, RETRY_TAG
from ccat_dt.config import Config
from ccat_dt.marker import MARKER
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationStatus, RawDataPackage, Reattempt
from ccat_dt.queues import transfer_queue
from ccat_dt.stages import Stage
from sensors.reattempt import outcome as run_outcome
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import REPO, _environment, deployment, observe, plan, wait_for

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

HOLDS = {  # where a child waits to be killed, half of its step done
    "mid-tar": ("ccat_dt.tarball", "_TarWriter.add_file", "after"),  # one member written
    "mid-write": ("ccat_dt.transports.local", "os.fsync", "before"),  # bytes not yet synced
    "mid-purge": ("ccat_dt.reaper", "_unlink_local", "after"),  # one copy deleted
    "none": ("", "", ""),
}
START_S = 60.0  # a child's `dagster` loads the code location first: seconds on a loaded VM
DELAY_ENV = "CCAT_DT_TEST_RETRY_DELAY_S"  # a child's in-run retry delay (RETRY_DELAY_S)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The embedded default, automatic re-attempts a fraction of a second apart."""
    return deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.2})


@pytest.fixture
def opsdb(config: Config) -> Iterator[OpsDB]:
    db = OpsDB(config.opsdb_url)
    yield db
    db.dispose()


def dagster_child(config: Config, instance: DagsterInstance, hold: str, marker: Path,
                  *argv: str, retry_delay_s: float | None = None) -> subprocess.Popen[str]:
    """`dagster ARGV` in a child process against the test's instance (as an operator runs it,
    $DAGSTER_HOME and $CCAT_DT_CONFIG set), stopping at `hold` (HOLDS) until killed; its steps
    retried after `retry_delay_s` (default: the real RETRY_DELAY_S)."""
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "DAGSTER_HOME": instance.root_directory,
           "CCAT_DT_CONFIG": str(config.path),
           "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}
    if retry_delay_s is not None:
        env[DELAY_ENV] = str(retry_delay_s)
    return subprocess.Popen([sys.executable, "-m", "tests.test_stuck_runs", hold, str(marker),
                             *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def materialize(config: Config, instance: DagsterInstance, asset: str, partition: str,
                hold: str, marker: Path, retry_delay_s: float | None = None
                ) -> subprocess.Popen[str]:
    return dagster_child(config, instance, hold, marker, "asset", "materialize", "-m",
                         "ccat_assets.definitions", "--select", asset, "--partition", partition,
                         retry_delay_s=retry_delay_s)


@contextmanager
def held_packaging(config: Config, instance: DagsterInstance, package: str, tmp_path: Path
                   ) -> Iterator[tuple[subprocess.Popen[str], DagsterRun]]:
    """An operator's `dagster asset materialize` of the package, held half way through its
    tar: the child process and its run; killed on the way out if still alive."""
    marker = tmp_path / "held"
    child = materialize(config, instance, "packages", package, "mid-tar", marker)
    try:
        wait_for(marker, child, timeout=START_S)
        yield child, the_run(instance, child.pid)
    finally:
        if child.poll() is None:
            kill(child)


def kill(child: subprocess.Popen[str]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)


def the_run(instance: DagsterInstance, pid: int) -> DagsterRun:
    """The run the child process executes (by the process it recorded as it started)."""
    [run] = [r for r in instance.get_runs() if r.tags.get(WORKER_TAG, "").endswith(f":{pid}")]
    return run


def status(instance: DagsterInstance, run: DagsterRun) -> DagsterRunStatus:
    now = instance.get_run_by_id(run.run_id)
    assert now is not None
    return now.status


def failure_message(instance: DagsterInstance, run_id: str) -> str:
    [record] = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    assert record.dagster_event is not None
    return record.dagster_event.message or ""


def archived_from_the_storage(config: Config, raw: dict[str, bytes]) -> None:
    """Read from the disks, not OpsDB: each archive site's LTA holds one tar whose members are
    exactly the observed files with their bytes; no raw file is left at the source, and no
    package copy in a buffer."""
    for site in ("cologne", "us"):
        [tar] = list(config.resolve_root(f"sites/{site}/lta").rglob("*.tar"))
        with tarfile.open(tar) as archive:
            members = {Path(m.name).name: archive.extractfile(m).read()  # type: ignore[union-attr]
                       for m in archive.getmembers() if m.isfile()}
        assert {name: members.get(name) for name in raw} == raw, site
    for path in raw:
        assert not list(config.resolve_root("sites/ccat/instruments").rglob(path)), path
    for site in ("ccat", "cologne", "us"):
        assert not list(config.resolve_root(f"sites/{site}/buffer").rglob("*.tar")), site


def observed(config: Config, opsdb: OpsDB) -> dict[str, bytes]:
    """One observation filed and finished: its files' names and bytes."""
    return {p.name: p.read_bytes() for p in observe(config, opsdb, files=3, size=300_000)}


def primary_site(opsdb: OpsDB, package: str) -> str:
    with opsdb.session() as session:
        row = session.scalars(select(RawDataPackage).where(RawDataPackage.name == package)).one()
        return row.primary_site.short_name


@pytest.mark.parametrize(("asset", "hold"), [("packages", "mid-tar"),
                                             ("site_copies", "mid-write")])
def test_a_killed_manual_run_is_failed_and_drive_finishes_its_package(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path,
        asset: str, hold: str) -> None:
    """An operator's `dagster asset materialize` held half way (a tar half written, a copy's
    bytes in its temporary file). While its process lives, a drive leaves it alone: not
    failed, no second run of its work. Killed -9, the next drive marks it failed, saying why,
    and finishes the package without `ccat-dt retry`: the re-attempt sensor requests the work
    (the sensors' own request was dropped while the manual run was in flight), the recovery
    clears what the dead run left (its claim on the transfer, its temporary file)."""
    raw = observed(config, opsdb)
    package = plan(config, opsdb, instance)
    partition = package
    if asset == "site_copies":  # the package built first, by hand as well
        job = build_definitions(config).resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, partition_key=package,
                                      asset_selection=[AssetKey("packages")]).success
        partition = str(package_site_key(package, primary_site(opsdb, package)))
    marker = tmp_path / "held"
    child = materialize(config, instance, asset, partition, hold, marker)
    try:
        wait_for(marker, child, timeout=START_S)
        run = the_run(instance, child.pid)
        stage = Stage.PACKAGING if asset == "packages" else Stage.SITE_COPY

        alive = drive(build_definitions(config), instance, wait_s=0)

        assert status(instance, run) == DagsterRunStatus.STARTED
        assert alive.closed_runs == [] and alive.elsewhere == []
        assert not [key for key in alive.launched if key.startswith(
            f"{'package' if asset == 'packages' else 'site_copy'}:{package}")]
        site = partition.split("|")[1] if "|" in partition else None
        assert (stage, package, site) in in_flight(instance)
        kill(child)
    finally:
        if child.poll() is None:
            kill(child)

    report = drive(build_definitions(config), instance, wait_s=10)

    assert status(instance, run) == DagsterRunStatus.FAILURE
    assert f"its process {child.pid} on " in failure_message(instance, run.run_id)
    assert len(report.closed_runs) == 1 and report.failed == []
    assert report.housekeeping() == ["1 run(s) whose process was gone marked failed"]
    assert any(key.startswith("reattempt:") for key in report.launched), report.launched
    archived_from_the_storage(config, raw)
    assert_safe(config, opsdb)
    assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []


def test_a_drive_run_whose_drive_and_process_were_killed_is_closed_at_the_next_look(
        config: Config, opsdb: OpsDB, tmp_path: Path) -> None:
    """`ccat-dt drive` and the child process executing its packaging run, killed -9 together
    (a process group killed, the OOM killer), the run held half way through its tar: the
    run stays STARTED. A drive's runs recorded no process (ccat/worker: they executed as an
    in-process copy of their job, which bypasses the executors that record it), so only a
    next `ccat-dt drive` (its drive gone) could close it; under the Dagster daemon (`make
    ui`) it stayed in flight for ever: its work never asked for again, its package never
    purged. Now the child records itself as it starts, and the sensors' next look at the runs
    in flight (inflight.in_flight, first thing of every tick, the daemon's too) marks it
    failed, saying why, its work no longer in flight."""
    observed(config, opsdb)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    with DagsterInstance.from_config(str(home)) as instance:
        package = plan(config, opsdb, instance)
        marker = tmp_path / "held"
        child = dagster_child(config, instance, "mid-tar", marker,
                              "ccat-dt", "--config", str(config.path), "drive")
        try:
            wait_for(marker, child, timeout=START_S)
            held = int(marker.read_text())
            [run] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            assert held != child.pid and run.tags[DRIVE_TAG].endswith(f":{child.pid}")
            assert run.tags.get(WORKER_TAG, "").endswith(f":{held}"), run.tags
            os.kill(child.pid, signal.SIGKILL)  # the drive first: it would fail the run
            os.kill(held, signal.SIGKILL)
            child.communicate(timeout=30)  # (once both are gone: the held one kept its output)
        finally:
            if child.poll() is None:
                kill(child)
        deadline = time.monotonic() + 30
        while liveness(run).alive is not False:  # reaped by init, its parent gone
            assert time.monotonic() < deadline, liveness(run)
            time.sleep(0.05)
        assert status(instance, run) == DagsterRunStatus.STARTED

        assert (Stage.PACKAGING, package, None) not in in_flight(instance)

        assert status(instance, run) == DagsterRunStatus.FAILURE
        assert f"its process {held} on " in failure_message(instance, run.run_id)


def test_a_run_on_a_host_drive_cannot_check_is_left_alone_and_named(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """A run whose process is on another host (a Celery deployment's worker, a drive there)
    cannot be checked from here: however dead it looks, it is not failed; the drive names it
    and where it runs, and its partition waits for it."""
    observed(config, opsdb)
    package = plan(config, opsdb, instance)
    with held_packaging(config, instance, package, tmp_path) as (child, run):
        instance.add_run_tags(run.run_id, {WORKER_TAG: f"archive-host:{child.pid}"})
        kill(child)  # here it is gone, but it says it ran elsewhere
    lines: list[str] = []

    report = drive(build_definitions(config), instance, wait_s=0, log=lines.append)

    assert status(instance, run) == DagsterRunStatus.STARTED
    assert report.closed_runs == [] and len(report.elsewhere) == 1
    assert report.housekeeping() == [
        "1 run(s) in flight where this drive cannot check them left alone"]
    [line] = [line for line in lines if line.startswith("ELSEWHERE")]
    assert f"archive-host:{child.pid}" in line and run.run_id in line
    assert (Stage.PACKAGING, package, None) in in_flight(instance)


def test_a_run_queued_without_a_daemon_is_executed_by_drive(
        config: Config, opsdb: OpsDB, tmp_path: Path) -> None:
    """`dagster job launch` queues a run as the UI's "Materialize" does (the instance's run
    coordinator, `ccat-dt init`'s dagster.yaml). While the daemon runs (a fresh heartbeat) the
    drive leaves the queue to it; with no daemon the drive executes the queued run, in its
    pool within the run limits, and the package is finished."""
    raw = observed(config, opsdb)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    with DagsterInstance.from_config(str(home)) as instance:
        package = plan(config, opsdb, instance)
        launch = dagster_child(config, instance, "none", tmp_path / "unused", "job", "launch",
                               "-m", "ccat_assets.definitions", "-j", "package_job",
                               "--tags", f'{{"dagster/partition": "{package}"}}')
        _, stderr = launch.communicate(timeout=120)
        assert launch.returncode == 0, stderr[-3000:]
        [queued] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), QUEUED_DAEMON, "test", None))

        with_daemon = drive(build_definitions(config), instance, wait_s=0)

        assert status(instance, queued) == DagsterRunStatus.QUEUED
        assert with_daemon.adopted == [] and with_daemon.launched == []  # the daemon's work
        instance.wipe_daemon_heartbeats()  # the daemon stopped

        report = drive(build_definitions(config), instance, wait_s=10)

        assert status(instance, queued) == DagsterRunStatus.SUCCESS
        assert report.adopted == [f"package:{package}:*:run-{queued.run_id[:8]}"]
        assert report.housekeeping() == [
            "1 run(s) queued with no daemon to start them executed here"]
        assert report.failed == []
        archived_from_the_storage(config, raw)
        assert_safe(config, opsdb)


# A Dagster daemon's heartbeat, written as the daemon writes it (through the instance's run
# storage, in the process that beats); then the process waits to be killed.
HEARTBEAT = """
import sys, time
from dagster import DagsterInstance
from dagster._daemon.types import DaemonHeartbeat
with DagsterInstance.from_config(sys.argv[1]) as instance:
    for part in ("SENSOR", "QUEUED_RUN_COORDINATOR"):
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), part, sys.argv[2], None))
    print("beat", flush=True)
    time.sleep(600)
"""


def test_a_drive_does_not_wait_for_a_daemon_whose_process_is_gone(
        config: Config, instance: DagsterInstance) -> None:
    """`make ui` stopped, or its daemon killed: its last heartbeat stays fresh for
    DAEMON_FRESH_S (2 min), and a `ccat-dt drive` started meanwhile waited that long for a
    daemon that was gone, with the queued runs left to it. Now the process that writes a
    daemon's heartbeats is recorded (ccat_assets/sqlite_storage.py), and a daemon whose
    process is provably gone on this host does not count: the drive says so and ticks the
    sensors at once. A heartbeat of a daemon whose process is not recorded (one that started
    since, and has not yet been recorded) counts as before: never two runners at once."""
    daemon = subprocess.Popen([sys.executable, "-c", HEARTBEAT, instance.root_directory,
                               "daemon-1"], cwd=REPO, env=_environment(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == "beat\n"
        assert daemon_gone(instance) is None  # it runs
        assert live_daemon(instance, SENSOR_DAEMON) is not None
        assert live_daemon(instance, QUEUED_DAEMON) is not None
    finally:
        daemon.kill()
        daemon.wait()

    gone = f"its process {daemon.pid} on {socket.gethostname()} is gone"
    assert daemon_gone(instance) == gone
    assert live_daemon(instance, SENSOR_DAEMON) is None
    assert live_daemon(instance, QUEUED_DAEMON) is None
    lines: list[str] = []
    report = drive(build_definitions(config), instance, wait_s=0, log=lines.append)
    assert report.watched == [] and report.rounds >= 1
    assert not any("a Dagster daemon ticks the sensors" in line for line in lines), lines
    [said] = [line for line in lines if line.startswith("the Dagster daemon stopped")]
    assert said.endswith(f"but {gone}): this drive ticks the sensors itself"), said

    # Another daemon started meanwhile, its first heartbeat written before its process is
    # recorded (Dagster's own storage writes no record): it runs, as far as a drive knows.
    storage = instance.run_storage
    assert isinstance(storage, SqliteRunStorage)
    SqliteRunStorage.add_daemon_heartbeat(
        storage, DaemonHeartbeat(time.time(), SENSOR_DAEMON, "daemon-2", None))
    assert daemon_gone(instance) is None
    assert live_daemon(instance, SENSOR_DAEMON) is not None


def test_a_run_that_never_started_is_failed_after_the_start_timeout(
        config: Config, instance: DagsterInstance) -> None:
    """A run created and never started (the process that created it killed before it began)
    is failed once it is older than the instance's run start timeout, as Dagster's run
    monitoring does for a launched run; a drive's own run waiting for a free slot never."""
    defs = build_definitions(config)
    job = defs.resolve_job_def("package_job")
    orphan = instance.create_run_for_job(job_def=job)
    waiting = instance.create_run_for_job(job_def=job, tags={DRIVE_TAG: "vm:1"})
    later = timedelta(seconds=instance.run_monitoring_start_timeout_seconds + 1)
    for run in (orphan, waiting):
        [record] = instance.get_run_records(RunsFilter(run_ids=[run.run_id]))
        assert close_if_dead(instance, record) is None  # just created
        assert close_if_dead(instance, record, record.update_timestamp + later) == (
            None if run is waiting else
            "it was created 3 min ago and never started: the process that was to execute it "
            "is gone")
    assert status(instance, orphan) == DagsterRunStatus.FAILURE
    assert status(instance, waiting) == DagsterRunStatus.NOT_STARTED


def test_a_process_is_told_from_any_other_with_its_pid(
        config: Config, instance: DagsterInstance) -> None:
    """The process recorded for a run (here: this one, alive) is the run's only while the
    machine, its boot and the process's start are the same: a pid used again after a restart
    or by a later process is not the run's, and a process on another machine or in another
    container with the same host name is not judged at all."""
    run = instance.create_run_for_job(job_def=build_definitions(config).resolve_job_def(
        "package_job"))
    record_worker(instance, run)
    recorded = instance.get_run_by_id(run.run_id)
    assert recorded is not None and recorded.tags[WORKER_TAG].endswith(f":{os.getpid()}")
    identity = dict(part.split("=") for part in recorded.tags[WORKER_ID_TAG].split())

    def judged(**changed: str) -> Liveness:
        tag = " ".join(f"{k}={v}" for k, v in {**identity, **changed}.items())
        return liveness(recorded.with_tags({**recorded.tags, WORKER_ID_TAG: tag}))

    assert judged().alive is True
    assert judged(boot="another-boot") == Liveness(
        False, f"its process {os.getpid()} on {socket.gethostname()} is gone (the machine "
               "restarted since)")
    later = str(int(identity["start"]) + 1)
    assert judged(start=later).alive is False and "another process now" in judged(
        start=later).why
    assert judged(machine="another-machine").alive is None
    assert judged(namespace="pid:[1]").alive is None
    assert judged(machine="-", boot="another-boot").alive is None  # restart or other machine


STEPS = {"mid-tar": ("packages", "package"), "mid-purge": ("purge_status", "purge")}


@pytest.mark.parametrize(("hold", "force", "retry_delay_s"), [
    ("mid-tar", False, 0.2), ("mid-tar", True, 0.2), ("mid-tar", True, 0.05),
    ("mid-purge", False, 0.05), ("mid-purge", True, 0.05)])
def test_terminate_in_the_ui_stops_a_run_drive_executes_and_its_work_is_done_later(
        config: Config, opsdb: OpsDB, tmp_path: Path, hold: str, force: bool,
        retry_delay_s: float) -> None:
    """The UI's Terminate on a run `ccat-dt drive` executes: Dagster marks it CANCELING and
    has no process to tell (no launcher launched it), so the run went on. Now the drive
    interrupts it: the run ends CANCELED at once, its line says so, nothing half-made is left
    on the storage, and the work is re-attempted after the back-off without a person. With
    "Force termination" the run is marked CANCELED at once; its process is stopped too (it
    went on, its work no longer counted as in flight). The interrupted step (a packaging
    half way through its tar, a purge after its first deletion) is not started again within
    the run, whatever the in-run retry delay: before, Dagster's retry policy re-ran it after
    RETRY_DELAY_S unless the drive's next interrupt came first, and the run ended SUCCESS
    (a force-terminated packaging, its tar built all the same; a terminated purge)."""
    step, label = STEPS[hold]
    raw = observed(config, opsdb)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    with DagsterInstance.from_config(str(home)) as instance:
        plan(config, opsdb, instance)
        marker = tmp_path / "held"
        child = dagster_child(config, instance, hold, marker,
                              "ccat-dt", "--config", str(config.path), "drive", "--wait", "60",
                              retry_delay_s=retry_delay_s)
        try:
            wait_for(marker, child, timeout=START_S)
            [run] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            assert run.tags.get(DRIVE_TAG)  # executed by the drive, in its pool

            instance.run_coordinator.cancel_run(run.run_id)  # what the UI's Terminate calls
            if force:  # and then, with "Force termination" (dagster-graphql)
                instance.report_run_canceled(run, message="forcibly marked as canceled")

            deadline = time.monotonic() + 30
            while status(instance, run) != DagsterRunStatus.CANCELED:
                assert time.monotonic() < deadline, status(instance, run)
                time.sleep(0.2)
            stdout, stderr = child.communicate(timeout=180)
        finally:
            if child.poll() is None:
                kill(child)

        # what the operator asked for, said; no failure (before: a FAILED line and exit 1)
        assert child.returncode == 0, stderr[-3000:]
        assert f"FAILED {label}" not in stdout, stdout
        assert f"CANCELED {label}:obs-0_" in stdout and "canceled by an operator" in stdout, \
            stdout
        assert "0 failed, 1 canceled by an operator" in stdout, stdout
        assert status(instance, run) == DagsterRunStatus.CANCELED
        redone = [(r.step_key, r.dagster_event_type) for r in instance.all_logs(
            run.run_id, of_type={DagsterEventType.STEP_RESTARTED, DagsterEventType.STEP_SUCCESS})
            if r.step_key == step]  # (raw_files, an observation, succeeded before)
        assert redone == []
        assert f"ok     {label:<9} obs-0_" in stdout, stdout  # the re-attempt's run
        archived_from_the_storage(config, raw)
        for site in ("ccat", "cologne", "us"):  # nothing half-written left behind either
            root = config.resolve_root(f"sites/{site}/buffer")
            assert [p.name for p in root.rglob("*") if p.is_file()] == [MARKER], site
        assert_safe(config, opsdb)
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []


def test_terminate_in_the_ui_stops_a_dagster_cli_run_at_the_next_sensor_tick(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """The UI's Terminate on an operator's `dagster asset materialize` (no launcher started
    it: Dagster only marks it CANCELING): the next look of any sensor at the runs in flight
    interrupts its process on this host. The run ends CANCELED, its half-written tar is gone,
    and a drive does the work."""
    raw = observed(config, opsdb)
    package = plan(config, opsdb, instance)
    with held_packaging(config, instance, package, tmp_path) as (child, run):
        instance.run_coordinator.cancel_run(run.run_id)  # what the UI's Terminate calls
        assert status(instance, run) == DagsterRunStatus.CANCELING

        in_flight(instance)  # what every sensor's tick looks at

        child.communicate(timeout=60)
    assert status(instance, run) == DagsterRunStatus.CANCELED
    buffer = config.resolve_root("sites/ccat/buffer")
    assert [p.name for p in buffer.rglob("*") if p.is_file()] == [MARKER]
    assert drive(build_definitions(config), instance, wait_s=10).failed == []
    archived_from_the_storage(config, raw)
    assert_safe(config, opsdb)


TERMINATE = """mutation($id: String!, $policy: TerminateRunPolicy) {
  terminateRun(runId: $id, terminatePolicy: $policy) { __typename
  ... on TerminateRunFailure { message } ... on PythonError { message } } }"""


def terminate_in_the_ui(instance: DagsterInstance, run: DagsterRun, policy: str,
                        answer_is: str = "TerminateRunSuccess") -> None:
    """Runs -> a run -> Terminate ("SAFE_TERMINATE") or "Force termination"
    ("MARK_AS_CANCELED_IMMEDIATELY"), sent as the UI sends it (no code location needed);
    what the UI shows, `answer_is`."""
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    with WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as workspace:
        answer = execute_dagster_graphql(workspace.create_request_context(), TERMINATE,
                                         {"id": run.run_id, "policy": policy})
    assert answer.data["terminateRun"]["__typename"] == answer_is, answer.data


@pytest.mark.parametrize("retry_delay_s", [None, 0.05])
def test_force_termination_in_the_ui_stops_a_dagster_cli_transfer_at_the_next_sensor_tick(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path,
        retry_delay_s: float | None) -> None:
    """"Force termination" of an operator's `dagster asset materialize` mid-transfer: the UI
    marks the run CANCELED at once and tells no process (no launcher started it). Before, the
    process went on to the end (a transfer of hours) against the operator's request, its work
    no longer counted as in flight, its claim making the re-attempt wait for it. Now the next
    look of any sensor at the runs interrupts it, as a Terminate's: the run stays CANCELED,
    its temporary file is removed and its claim ended, and a drive does the work. The step is
    not started again in the run, with the real retry delay or a short one (before, a retry
    due sooner than the sensor's next interrupt copied it all and the run ended SUCCESS)."""
    raw = observed(config, opsdb)
    package = plan(config, opsdb, instance)
    job = build_definitions(config).resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, partition_key=package,
                                  asset_selection=[AssetKey("packages")]).success
    site = primary_site(opsdb, package)
    marker = tmp_path / "held"
    child = materialize(config, instance, "site_copies", str(package_site_key(package, site)),
                        "mid-write", marker, retry_delay_s)
    try:
        wait_for(marker, child, timeout=START_S)
        run = the_run(instance, child.pid)
        buffer = config.resolve_root(f"sites/{site}/buffer")
        assert [p for p in buffer.rglob("*.part")]  # the bytes half way, in the temporary file

        terminate_in_the_ui(instance, run, "MARK_AS_CANCELED_IMMEDIATELY")
        assert status(instance, run) == DagsterRunStatus.CANCELED

        in_flight(instance)  # what every sensor's tick looks at

        child.communicate(timeout=60)  # before: it went on, held here for 300 s
    finally:
        if child.poll() is None:
            kill(child)
    assert status(instance, run) == DagsterRunStatus.CANCELED
    assert not instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_RESTARTED)
    assert [p.name for p in buffer.rglob("*") if p.is_file()] == [MARKER]
    with opsdb.session() as session:  # its claim on the transfer ended with it
        assert session.scalars(select(Operation).where(
            Operation.status == OperationStatus.IN_PROGRESS)).all() == []
    assert drive(build_definitions(config), instance, wait_s=10).failed == []
    archived_from_the_storage(config, raw)
    assert_safe(config, opsdb)


def test_one_interrupt_of_a_terminated_run_stops_its_step_without_a_retry(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path) -> None:
    """Terminate on a run its launcher started (the daemon's): Dagster marks it CANCELING and
    interrupts its process once. Under the step's retry policy Dagster would start the step
    again two seconds later (the whole tar, or a transfer from zero, against the operator's
    request); the step fails once instead, and the run ends CANCELED with nothing of it left
    on the storage; a drive then does the work."""
    raw = observed(config, opsdb)
    package = plan(config, opsdb, instance)
    with held_packaging(config, instance, package, tmp_path) as (child, run):
        instance.run_coordinator.cancel_run(run.run_id)  # what the UI's Terminate calls
        child.send_signal(signal.SIGINT)  # the launcher's one interrupt of its run worker

        child.communicate(timeout=60)
    assert status(instance, run) == DagsterRunStatus.CANCELED
    retried = [e for e in instance.all_logs(run.run_id) if e.dagster_event is not None
               and e.dagster_event.event_type in (DagsterEventType.STEP_UP_FOR_RETRY,
                                                  DagsterEventType.STEP_RESTARTED)]
    assert retried == []
    buffer = config.resolve_root("sites/ccat/buffer")
    assert [p.name for p in buffer.rglob("*") if p.is_file()] == [MARKER]
    assert drive(build_definitions(config), instance, wait_s=10).failed == []
    archived_from_the_storage(config, raw)
    assert_safe(config, opsdb)


def test_ctrl_c_on_an_operators_dagster_asset_materialize_is_a_cancel_not_a_failed_attempt(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """An operator presses Ctrl-C in the terminal where `dagster asset materialize` packages
    a package (held half way through its tar): the run ends CANCELED, an operator's cancel,
    its half-written tar gone, and its work is not escalated (a horizon so short that one
    failed attempt would be: no automatic attempt any more, a person told). The next drive
    builds and archives it. Before, the run ended FAILURE, a failed attempt of its work, and
    the drive escalated it instead."""
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.2,
                                                       "retry_horizon_hours": 1e-6})
    opsdb = OpsDB(config.opsdb_url)
    raw = observed(config, opsdb)
    package = plan(config, opsdb, instance)
    with held_packaging(config, instance, package, tmp_path) as (child, run):
        child.send_signal(signal.SIGINT)  # the terminal's Ctrl-C

        child.communicate(timeout=60)
    assert status(instance, run) == DagsterRunStatus.CANCELED
    buffer = config.resolve_root("sites/ccat/buffer")
    assert [p.name for p in buffer.rglob("*") if p.is_file()] == [MARKER]

    report = drive(build_definitions(config), instance, wait_s=10)

    assert report.failed == [], report
    with opsdb.session() as session:
        assert session.scalars(select(Reattempt)).all() == []  # nothing escalated, nobody told
    archived_from_the_storage(config, raw)
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_a_re_executed_run_is_not_judged_by_its_parents_process(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI's Re-execute copies the parent run's tags to the new run, among them the ones
    naming the process that executed the parent (its drive, its worker). Judged by them, the
    new run, queued for the daemon, was failed by the next drive or `ccat-dt retry` ("the
    drive that ran it died") before it ever started. The run coordinator blanks them; the
    new run gets its own as it starts, and runs to the end. Re-executed here as the UI's
    GraphQL resolver does it, on a real code location server."""
    raw = observed(config, opsdb)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (
        str(REPO), os.environ.get("PYTHONPATH")))))
    with DagsterInstance.from_config(str(home)) as instance:
        package = plan(config, opsdb, instance)
        defs = build_definitions(config)
        assert defs.get_repository_def().get_job("package_job").execute_in_process(
            instance=instance, partition_key=package).success
        [parent] = instance.get_runs()
        gone = f"{socket.gethostname()}:{2**22 + 1}"  # the earlier drive that executed it
        instance.add_run_tags(parent.run_id, {DRIVE_TAG: gone, WORKER_TAG: gone})
        parent = parent.with_tags({**parent.tags, DRIVE_TAG: gone, WORKER_TAG: gone})
        target = ModuleTarget(module_name="ccat_assets.definitions", attribute="defs",
                              working_directory=str(REPO), location_name="ccat")
        with WorkspaceProcessContext(instance, target) as workspace:
            context = workspace.create_request_context()
            location = context.get_code_location("ccat")
            [repository] = location.get_repositories().values()
            child = instance.create_reexecuted_run(
                parent_run=parent, request_context=context, code_location=location,
                remote_job=repository.get_full_job("package_job"),
                strategy=ReexecutionStrategy.ALL_STEPS, use_parent_run_tags=True)
            assert child.tags.get(DRIVE_TAG) == gone  # as Dagster makes it

            instance.submit_run(child.run_id, workspace=context)

        assert close_dead_runs(instance) == []  # what a drive and `ccat-dt retry` do first
        queued = instance.get_run_by_id(child.run_id)
        assert queued is not None and queued.status == DagsterRunStatus.QUEUED
        assert not any(queued.tags.get(tag) for tag in (DRIVE_TAG, WORKER_TAG))
        report = drive(defs, instance, wait_s=10)
        assert report.dead_runs == [] and report.closed_runs == []
        assert status(instance, child) == DagsterRunStatus.SUCCESS
        assert report.adopted and report.failed == []
        archived_from_the_storage(config, raw)
        assert_safe(config, opsdb)


REEXECUTE = """mutation($p: ReexecutionParams!) { launchPipelineReexecution(
  reexecutionParams: $p) { __typename ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message } } }"""


def as_the_webserver(config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An instance directory, and the environment `make ui` gives the webserver (the
    configuration, the repository importable from workspace.yaml's directory)."""
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (
        str(REPO), os.environ.get("PYTHONPATH")))))
    monkeypatch.chdir(REPO)
    return write_instance_yaml(config, tmp_path / "dagster_home").parent


@pytest.mark.parametrize("workers", [1, 2])
def test_re_execute_in_the_ui_of_a_run_ccat_dt_drive_made(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        workers: int) -> None:
    """`make demo` or a cron `ccat-dt drive`, then `make ui`: Runs -> a run -> Re-execute
    answered "CheckError: Expected non-None value: None" (found by a helper clicking it):
    the drive created its runs without the origin the webserver looks the job up by. Sent
    here as the UI sends it, to the code location workspace.yaml names."""
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    raw = observed(config, opsdb)
    home = as_the_webserver(config, tmp_path, monkeypatch)
    with DagsterInstance.from_config(str(home)) as instance:
        defs = build_definitions(config)
        assert drive(defs, instance, workers=workers).failed == []
        [parent] = instance.get_runs(RunsFilter(job_name="package_job"), limit=1)
        target = WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])
        with WorkspaceProcessContext(instance, target) as workspace:
            answer = execute_dagster_graphql(
                workspace.create_request_context(), REEXECUTE,
                {"p": {"parentRunId": parent.run_id, "strategy": "ALL_STEPS"}},
            ).data["launchPipelineReexecution"]
        assert answer["__typename"] == "LaunchRunSuccess", answer.get("message")
        child = instance.get_run_by_id(answer["run"]["runId"])
        assert child is not None
        report = drive(defs, instance, wait_s=10)  # no daemon here: the drive runs it
        assert report.failed == [] and status(instance, child) == DagsterRunStatus.SUCCESS
        archived_from_the_storage(config, raw)
        assert_safe(config, opsdb)


def test_re_execute_in_the_ui_of_old_runs_after_the_purge_changes_nothing_and_says_so(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hours later, Re-execute (all steps, as the UI sends it) of every successful run of an
    archived package: its packaging run (the sources purged since), each copy-and-archive run
    (the buffer copy purged since) and its purge run (with the purge sensor's run config, its
    copies long deleted). Each succeeds without moving or deleting a byte: nothing is rebuilt
    or sent again, the LTA tars are untouched, and the UI says why (a site copy "not needed",
    its buffer copy purged, not a fresh copy present; nothing deleted by the purge)."""
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    raw = observed(config, opsdb)
    home = as_the_webserver(config, tmp_path, monkeypatch)
    with DagsterInstance.from_config(str(home)) as instance:
        defs = build_definitions(config)
        assert drive(defs, instance).failed == []
        archived_from_the_storage(config, raw)
        tars = {p: (p.stat().st_ino, p.stat().st_mtime_ns)
                for site in ("cologne", "us")
                for p in config.resolve_root(f"sites/{site}/lta").rglob("*.tar")}
        parents = [r for r in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
                   if r.job_name in ("package_job", "site_copy_archive_job", "purge_job")]
        assert sorted(r.job_name for r in parents) == [
            "package_job", "purge_job", "site_copy_archive_job", "site_copy_archive_job"]
        [purge] = [r for r in parents if r.job_name == "purge_job"]
        assert "'copy_ids': [" in str(purge.run_config)  # the purge sensor's plan, re-executed
        stale = {QUEUE_TAG: "elsewhere", LINK_TAG: "cologne->us", AGAIN_TAG: "1",
                 RETRY_TAG: "lost at us"}  # routed, and asked again or retried, back then
        for parent in parents:
            instance.add_run_tags(parent.run_id, stale)
        target = WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")])
        children = []
        with WorkspaceProcessContext(instance, target) as workspace:
            for parent in parents:
                answer = execute_dagster_graphql(
                    workspace.create_request_context(), REEXECUTE,
                    {"p": {"parentRunId": parent.run_id, "strategy": "ALL_STEPS"}},
                ).data["launchPipelineReexecution"]
                assert answer["__typename"] == "LaunchRunSuccess", answer.get("message")
                children.append(answer["run"]["runId"])

        report = drive(defs, instance, wait_s=10)  # no daemon here: the drive runs them

        assert report.failed == [] and len(report.adopted) == 4, report.adopted
        for run_id in children:
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == DagsterRunStatus.SUCCESS, run_id
            # Routed for where the data is now (nothing left to transfer: no link), and an
            # operator's UI action: neither asked again nor retried (sensors.reattempt).
            assert run.tags[QUEUE_TAG] not in ("", "elsewhere") and not run.tags.get(LINK_TAG)
            if run.job_name == "site_copy_archive_job":
                site = run.tags["dagster/partition/site"]
                assert run.tags[QUEUE_TAG] == transfer_queue(config, site), run.tags
            [record] = instance.get_run_records(RunsFilter(run_ids=[run_id]))
            assert not run_outcome(record).again and not run_outcome(record).operator, run.tags
        archived_from_the_storage(config, raw)  # nothing sent to a buffer again
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tars} == tars
        materialized = {}
        for run_id in children:
            for event in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
                m = event.asset_materialization
                assert m is not None
                materialized[(m.asset_key.path[-1], str(m.partition))] = m.metadata
        package = next(iter(k for a, k in materialized if a == "packages"))
        assert "not rebuilt" in str(materialized[("packages", package)]["outcome"].value)
        assert materialized[("purge_status", package)]["deleted"].value == 0
        for site in ("cologne", "us"):
            key = str(package_site_key(package, site))
            outcome = str(materialized[("site_copies", key)]["outcome"].value)
            assert outcome.startswith("not needed: archived at") and "purged" in outcome, outcome
            lta = str(materialized[("lta_copies", key)]["outcome"].value)
            assert lta == "already there, verified now", lta
        checks = [c for run_id in children for e in
                  instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
                  if e.dagster_event is not None and isinstance(
                      c := e.dagster_event.event_specific_data, AssetCheckEvaluation)]
        assert checks and all(c.passed for c in checks), checks
        assert any("purged after archiving" in (c.description or "") for c in checks
                   if c.asset_check_key.name == "site_copy_checksum"), checks
        assert_safe(config, opsdb)


def _hold_and_run_dagster(argv: list[str]) -> int:
    """In the child: install the hold, then `dagster` (or `ccat-dt`) with the rest of the
    arguments."""
    from dagster._cli import main as dagster

    from tests.faults.child import wait_to_be_killed, wrap

    hold, marker, *rest = argv
    if DELAY_ENV in os.environ:  # as conftest.short_retry_delay, in this process and its forks
        from ccat_assets.stages import common

        common.RETRY_DELAY_S = float(os.environ[DELAY_ENV])
    module_name, attribute, when = HOLDS[hold]
    if module_name:
        owner = __import__(module_name, fromlist=["_"])
        path, _, name = attribute.rpartition(".")
        for part in filter(None, path.split(".")):
            owner = getattr(owner, part)
        held = wait_to_be_killed(Path(marker))
        if when == "before":
            wrap(owner, name, before=held)
        else:
            wrap(owner, name, after=held)
    if rest[:1] == ["ccat-dt"]:  # the drive, its runs held in its forked children
        from ccat_assets.cli import main as ccat_dt

        sys.argv = rest
        ccat_dt()
        return 0
    sys.argv = ["dagster", *rest]
    dagster()
    return 0


if __name__ == "__main__":
    sys.exit(_hold_and_run_dagster(sys.argv[1:]))
