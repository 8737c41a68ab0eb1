"""The drive executes runs side by side (forked children) within the instance's limits: never
more runs on a link at once than its limit (read from the runs and from OpsDB's transfer
records), the same end state on the storage as a serial drive; a child killed with SIGKILL
leaves nothing in flight and is finished by the next drive, and SIGTERM to the drive stops
its children."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    BetaWarning,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    PreviewWarning,
    RunsFilter,
)
from sqlalchemy import select
from sqlalchemy.orm import aliased

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import _Runs, drive
from ccat_assets.inflight import IN_FLIGHT
from ccat_assets.instance import write_instance_yaml
from ccat_assets.runpool import run_limits
from ccat_assets.tags import LINK_TAG
from ccat_dt import tarball
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    DataLocation,
    Operation,
    OperationType,
    PackageState,
    RawDataPackage,
    Reattempt,
    Site,
)
from ccat_dt.storage import files_under
from ccat_dt.tarball import PackageMember
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    child_argv,
    deployment,
    finish,
    spawn,
    wait_for,
    wait_until_idle,
)

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

LIMITS = {"ccat->cologne": 1, "ccat->us": 2, "cologne->us": 1, "us->cologne": 2}
ROUTES = [{"origin": link.split("->")[0], "destination": link.split("->")[1],
           "transport": "local", "cost": 10 if link.startswith("ccat") else 2,
           "max_concurrent": limit} for link, limit in LIMITS.items()]
MODULES = ("primecam/f280", "chai/lfa")


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Config, OpsDB, DagsterInstance]]:
    """A deployment whose links carry 1 or 2 runs at once, with the instance `ccat-dt init`
    writes for it (its dagster.yaml has one tag concurrency limit per route)."""
    config = deployment(tmp_path / "deploy", routes=ROUTES)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    opsdb = OpsDB(config.opsdb_url)
    with DagsterInstance.from_config(str(home)) as instance:
        yield config, opsdb, instance
    opsdb.dispose()


def observe(config: Config, opsdb: OpsDB, observations: int, *,
            like: Path | None = None) -> None:
    """Observations of two modules, a few small random files each; with `like`, the files
    (bytes and modification times) under that directory, as a copy of a source root."""
    source = config.resolve_root("sites/ccat/instruments")
    for n in range(observations):
        name = f"obs-{n}"
        start_observation(opsdb, name)
        for module in MODULES:
            for i in range(2):
                path = source / name / module / f"scan-{i}.dat"
                path.parent.mkdir(parents=True, exist_ok=True)
                if like is None:
                    path.write_bytes(os.urandom(20_000 + 1000 * i))
                else:
                    shutil.copy2(like / path.relative_to(source), path)
            file_directory(opsdb, observation=name, module=module, directory=f"{name}/{module}")
        finish_observation(opsdb, name)


def most_at_once(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of the intervals that overlap (one ending as another starts does
    not count)."""
    events = sorted((t, step) for start, end in intervals for t, step in ((start, 1), (end, -1)))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_no_link_carries_more_runs_at_once_than_its_limit(
        limited: tuple[Config, OpsDB, DagsterInstance]) -> None:
    config, opsdb, instance = limited
    assert run_limits(instance)[0] > 1  # the default drive is parallel here
    observe(config, opsdb, observations=2)  # 4 packages, 2 per primary archive site

    report = drive(build_definitions(config), instance)

    assert report.failed == []
    archived_everywhere(config, opsdb)
    # Runs: their start and end as the instance recorded them, per link tag.
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    every = []
    for record in instance.get_run_records():
        assert record.start_time is not None and record.end_time is not None
        every.append((record.start_time, record.end_time))
        link = record.dagster_run.tags.get(LINK_TAG)
        if link is not None:
            runs[link].append((record.start_time, record.end_time))
    assert set(runs) == set(LIMITS)
    assert len(runs["ccat->cologne"]) >= 2  # the limit of 1 had something to hold back
    for link, intervals in runs.items():
        assert most_at_once(intervals) <= LIMITS[link], (link, sorted(intervals))
    assert most_at_once(every) > 1  # runs did execute side by side
    assert most_at_once(i for intervals in runs.values() for i in intervals) > 1

    # Transfers: OpsDB's records of each transfer between sites, per link.
    origin, destination = aliased(DataLocation), aliased(DataLocation)
    origin_site, destination_site = aliased(Site), aliased(Site)
    with opsdb.session() as session:
        rows = session.execute(
            select(origin_site.short_name, destination_site.short_name, Operation.started_at,
                   Operation.finished_at)
            .join(origin, Operation.source_location_id == origin.id)
            .join(origin_site, origin.site_id == origin_site.id)
            .join(destination, Operation.destination_location_id == destination.id)
            .join(destination_site, destination.site_id == destination_site.id)
            .where(Operation.operation_type == OperationType.TRANSFER)).all()
    transfers: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for source_site, target_site, started, finished in rows:
        assert finished is not None
        transfers[f"{source_site}->{target_site}"].append(
            (started.timestamp(), finished.timestamp()))
    assert sum(len(t) for t in transfers.values()) == 4 * 2  # each package to each archive
    for link, intervals in transfers.items():
        assert most_at_once(intervals) <= LIMITS[link], (link, sorted(intervals))


def transfers_by_link(opsdb: OpsDB) -> dict[str, list[tuple[str | None, float, float]]]:
    """OpsDB's transfers between sites per link: (the run that made it, started, finished)."""
    origin, destination = aliased(DataLocation), aliased(DataLocation)
    origin_site, destination_site = aliased(Site), aliased(Site)
    with opsdb.session() as session:
        rows = session.execute(
            select(origin_site.short_name, destination_site.short_name, Operation.run_id,
                   Operation.started_at, Operation.finished_at)
            .join(origin, Operation.source_location_id == origin.id)
            .join(origin_site, origin.site_id == origin_site.id)
            .join(destination, Operation.destination_location_id == destination.id)
            .join(destination_site, destination.site_id == destination_site.id)
            .where(Operation.operation_type == OperationType.TRANSFER)).all()
    found: dict[str, list[tuple[str | None, float, float]]] = defaultdict(list)
    for source_site, target_site, run_id, started, finished in rows:
        assert finished is not None
        found[f"{source_site}->{target_site}"].append(
            (run_id, started.timestamp(), finished.timestamp()))
    return found


def backfill_before_any_source(config: Config, opsdb: OpsDB, instance: DagsterInstance,
                               defs: Definitions) -> dict[str, str]:
    """4 packages built, and the UI's backfill of `site_copies` for each package's second
    archive submitted now, while no archive holds them: the run coordinator finds no copy to
    send from, hence no link. Returns each package's primary archive."""
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.run_coordinator import SubmitRunContext
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    from ccat_dt.packages import plan_packages
    from tests.browser import REPO
    from tests.test_operator_actions import by_hand
    from tests.test_routing import partition_tags

    observe(config, opsdb, observations=2)  # 4 packages, 2 per primary archive site
    with opsdb.session() as session:
        primary = {p.name: p.primary_site.short_name for p in plan_packages(session, config)}
    instance.add_dynamic_partitions("packages", list(primary))
    job = defs.resolve_implicit_global_asset_job_def()
    location = ManagedGrpcPythonEnvCodeLocationOrigin(LoadableTargetOrigin(  # workspace.yaml's
        module_name="ccat_assets.definitions", attribute="defs", working_directory=str(REPO)),
        location_name="ccat_assets.definitions:defs")
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job.name)
    for package, site in primary.items():
        assert by_hand(defs, instance, "packages", package)
        second = next(s.short_name for s in config.settings.archive_sites
                      if s.short_name != site)
        run = instance.create_run_for_job(
            job, tags={**partition_tags(package, second), "dagster/backfill": "b1"},
            asset_selection=frozenset({AssetKey("site_copies")}),
            remote_job_origin=origin)
        queued = instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))  # type: ignore[arg-type]
        assert queued.status == DagsterRunStatus.QUEUED and not queued.tags.get(LINK_TAG)
    return primary


def archive_at_primary(defs: Definitions, instance: DagsterInstance,
                       primary: dict[str, str]) -> None:
    from ccat_assets.partitions import package_site_key
    from tests.test_operator_actions import by_hand

    for package, site in primary.items():
        for asset in ("site_copies", "lta_copies"):
            assert by_hand(defs, instance, asset, str(package_site_key(package, site)))


def assert_archive_links_kept(opsdb: OpsDB, instance: DagsterInstance) -> None:
    """Each copy between archives was made by a run tagged with its link (what the run limits
    count), and no link carried more of those runs, or transfers, at once than its limit."""
    runs = {r.dagster_run.run_id: r for r in instance.get_run_records()}
    for link in ("cologne->us", "us->cologne"):
        made = transfers_by_link(opsdb)[link]
        assert len(made) == 2 and all(run_id for run_id, _, _ in made)
        by = [runs[run_id or ""] for run_id, _, _ in made]
        assert [r.dagster_run.tags.get(LINK_TAG) for r in by] == [link, link], link
        assert most_at_once((r.start_time or 0, r.end_time or 0) for r in by) <= LIMITS[link]
        assert most_at_once((s, e) for _, s, e in made) <= LIMITS[link]


def test_a_backfill_queued_before_its_source_existed_keeps_to_the_link_it_loads(
        limited: tuple[Config, OpsDB, DagsterInstance], monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI's backfill of copies to the second archives, submitted before any archive held
    the packages (no link); the drive takes the runs in while the run limit is taken, and by
    the time a slot is free the primary archive has the packages: they copy archive to
    archive. Before, they started as routed when submitted, untagged: both runs on
    cologne->us (limit 1) at once."""
    config, opsdb, instance = limited
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))  # the coordinator's configuration
    defs = build_definitions(config)
    primary = backfill_before_any_source(config, opsdb, instance, defs)
    adopt_queued = _Runs.adopt_queued

    def while_the_run_limit_is_taken(runs: _Runs) -> None:
        """The first round takes the queued runs in while no slot is free (other runs hold
        the run limit); meanwhile the primary archives receive the packages."""
        assert runs.pool is not None
        if not instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.QUEUED])):
            adopt_queued(runs)
            return
        workers, runs.pool.workers = runs.pool.workers, 0
        adopt_queued(runs)
        assert len(runs.pool.queue) == len(primary)
        archive_at_primary(defs, instance, primary)
        runs.pool.workers = workers

    monkeypatch.setattr(_Runs, "adopt_queued", while_the_run_limit_is_taken)
    report = drive(defs, instance)

    assert report.failed == [] and len(report.adopted) == len(primary)
    archived_everywhere(config, opsdb)
    assert_archive_links_kept(opsdb, instance)


def test_the_daemon_dequeues_a_backfill_by_the_link_it_loads_now(
        limited: tuple[Config, OpsDB, DagsterInstance], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The same backfill, dequeued by Dagster's daemon once the primary archives have the
    packages: the daemon's dequeue reads each run's link tag, routed again just before
    (routing.RoutedRunCoordinator.get_run_queue_config). Before, the runs kept the tags of
    their submission, no link: both runs on cologne->us started at once."""
    from tests.browser import dagster_daemon

    config, opsdb, instance = limited
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    defs = build_definitions(config)
    primary = backfill_before_any_source(config, opsdb, instance, defs)
    archive_at_primary(defs, instance, primary)
    backfill = RunsFilter(tags={"dagster/backfill": "b1"})

    home = Path(instance.root_directory)
    with dagster_daemon(home, config.path, tmp_path / "daemon.log"):
        deadline = time.monotonic() + 120
        while any(run.status in IN_FLIGHT for run in instance.get_runs(backfill)):
            assert time.monotonic() < deadline, "the daemon never finished the backfill"
            time.sleep(0.5)
    assert {run.status for run in instance.get_runs(backfill)} == {DagsterRunStatus.SUCCESS}
    assert_archive_links_kept(opsdb, instance)


def storage(config: Config) -> dict[str, set[tuple[str, int, str]]]:
    """Per location, (relative path, size, xxh3-128) of every file on its storage."""
    found = {}
    for site in config.settings.sites:
        for location in site.locations:
            root = config.resolve_root(location.root)
            found[f"{site.short_name}/{location.name}"] = {
                (str(path.relative_to(root)), path.stat().st_size, hash_file(path)[0])
                for path in (files_under(root) if root.exists() else [])}
    return found


def packages(opsdb: OpsDB) -> dict[str, tuple[str, str | None, set[tuple[str, str, str]]]]:
    """Per package: its state, checksum and copies (location, status, path)."""
    with opsdb.session() as session:
        return {p.name: (p.state.value, p.checksum,
                         {(c.location.label, c.status.value, c.relative_path) for c in p.copies})
                for p in session.scalars(select(RawDataPackage))}


def test_a_parallel_drive_ends_as_a_serial_one(tmp_path: Path) -> None:
    ends = []
    observed = tmp_path / "observed"  # the raw files both deployments are given
    for workers in (1, None):  # one run at a time; the instance's default
        config = deployment(tmp_path / f"deploy-{workers}")
        opsdb = OpsDB(config.opsdb_url)
        observe(config, opsdb, observations=1, like=observed if observed.exists() else None)
        if not observed.exists():
            shutil.copytree(config.resolve_root("sites/ccat/instruments"), observed)
        home = write_instance_yaml(config, tmp_path / f"home-{workers}").parent
        with DagsterInstance.from_config(str(home)) as instance:
            assert run_limits(instance)[0] > 1
            report = drive(build_definitions(config), instance, workers=workers)
            at_once = most_at_once((r.start_time or 0, r.end_time or 0)
                                   for r in instance.get_run_records())
        assert report.failed == []
        assert (at_once > 1) == (workers is None)  # the serial drive was serial
        archived_everywhere(config, opsdb)
        ends.append((storage(config), packages(opsdb)))
        opsdb.dispose()
    (serial_storage, serial_packages), (parallel_storage, parallel_packages) = ends
    assert serial_storage == parallel_storage
    assert sum(len(files) for files in serial_storage.values()) == 2 * 2  # 2 packages, 2 LTAs
    assert serial_packages == parallel_packages


@contextmanager
def grpc_in_use() -> Iterator[None]:
    """This process talking gRPC all along, as one beside the UI's code server does: a server
    in it, and a thread calling it over fresh channels (Dagster's client opens one a call)."""
    import grpc

    server = grpc.server(ThreadPoolExecutor(2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    done = threading.Event()

    def call() -> None:
        while not done.is_set():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, \
                    suppress(grpc.RpcError):  # no such method: an answer all the same
                channel.unary_unary("/ccat.Test/Ping")(b"", timeout=1)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        yield
    finally:
        done.set()
        caller.join()
        server.stop(None)


def test_a_drive_whose_process_talks_grpc_executes_every_run_it_forks(tmp_path: Path) -> None:
    """Before, a run's child forked while another thread was in gRPC (the test's UI, a channel
    to its code server) could die at once of a segmentation fault in gRPC's own fork
    handlers: its run failed, "killed by signal 11" (a test run beside the UI, 1 full test
    run in 3; this test, 6 times in 6)."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=4)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    with DagsterInstance.from_config(str(home)) as instance, grpc_in_use():
        report = drive(build_definitions(config), instance)
        assert report.failed == [] and report.dead_runs == []
        assert len(instance.get_runs()) >= 8  # each executed by a child forked meanwhile
        assert all(r.status == DagsterRunStatus.SUCCESS for r in instance.get_runs())
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    opsdb.dispose()


def test_a_child_killed_mid_run_is_failed_and_finished_by_the_next_drive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first copy run to record its landed copy is killed (SIGKILL) just before: the
    drive marks its run failed and goes on; the next drive re-attempts it."""
    import ccat_dt.replicas as replicas

    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1)
    marker = tmp_path / "killed"
    record = replicas._record

    def killed_once(*args: object, **kwargs: object) -> object:
        if os.getpid() != parent:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # the first caller only
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return record(*args, **kwargs)  # type: ignore[arg-type]

    parent = os.getpid()
    monkeypatch.setattr(replicas, "_record", killed_once)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    with DagsterInstance.from_config(str(home)) as instance:
        first = drive(build_definitions(config), instance)  # stops at the re-attempt back-off

        assert marker.exists() and len(first.failed) == 1, first
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        [dead] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
        assert dead.tags["dagster/run_key"] == first.failed[0]

        second = drive(build_definitions(config), instance, wait_s=10)

        assert second.failed == []
        assert second.dead_runs == []
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)  # every package's LTA copies hash to its checksum, ...
    opsdb.dispose()


def test_sigterm_to_the_drive_stops_its_runs_and_leaves_none_in_flight(tmp_path: Path) -> None:
    """SIGTERM to a drive whose packaging runs are in flight: the runs are stopped as an
    operator's cancel (CANCELED, no failed attempt), none left in flight, and the next drive
    does their work. With a re-attempt horizon so short that a single failed attempt
    escalates (no automatic attempt any more, a person told), a run counted as failed would
    leave its package unbuilt: before, each was marked failed and the next drive escalated
    them instead of packaging."""
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.2,
                                                       "retry_horizon_hours": 1e-6})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    marker = tmp_path / "holding"
    # started as cron or a script's `&` job starts it: SIGINT ignored (Dagster then points
    # SIGTERM at that too, unless the drive sees to it)
    process = spawn(child_argv(config, "drive", kill="hold-in-run", marker=str(marker),
                               home=str(home)), sigint_ignored=True)
    try:
        wait_for(marker, process, timeout=120)  # a packaging run's child waits, tar written
        run_child = int(marker.read_text())
        assert run_child != process.pid
        wait_until_idle(process)  # the drive waiting for its held runs
        process.send_signal(signal.SIGTERM)
        stopped = finish(process, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    # SIGTERM interrupts a drive as Ctrl-C does (KeyboardInterrupt; the CLI exits 130)
    assert stopped.returncode == -signal.SIGINT, stopped.stderr[-3000:]
    # the held runs, stopped and reported as canceled, though Dagster re-attempts an
    # interrupted step that has a retry policy (and the step would hold again)
    assert "CANCELED package:" in stopped.stdout, stopped.stdout[-3000:]
    assert "the drive was stopped" in stopped.stdout, stopped.stdout[-3000:]
    assert "FAILED package:" not in stopped.stdout, stopped.stdout[-3000:]
    with pytest.raises(ProcessLookupError):  # the drive reaped it before it exited
        os.kill(run_child, 0)
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        assert instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE])) == []
        canceled = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.CANCELED]))
        assert canceled
        # interrupted (the step stopped, not retried), not SIGKILLed at the end of the grace
        # period (which would leave a step's rsync or bbcp running, in its own process group)
        started = [run for run in canceled
                   if instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_START)]
        assert started
        assert all(any("interrupted" in str(record.dagster_event.step_failure_data.error)
                       for record in instance.all_logs(
                           run.run_id, of_type=DagsterEventType.STEP_FAILURE)
                       if record.dagster_event is not None)
                   for run in started), [run.run_id for run in started]

        report = drive(build_definitions(config), instance, wait_s=10)

        assert report.failed == [] and report.dead_runs == [], report
    with opsdb.session() as session:
        assert session.scalars(select(Reattempt)).all() == []  # nobody told, nothing left
    archived_everywhere(config, opsdb)  # each package's tar in every archive, on the disk
    assert_safe(config, opsdb)
    assert [p for p in (tmp_path / "deploy").rglob("*") if p.name.endswith(".part")] == []
    opsdb.dispose()


def test_the_overview_in_the_ui_shows_the_state_the_drive_ended_in(
        limited: tuple[Config, OpsDB, DagsterInstance]) -> None:
    """The reporting sensors tick once per their interval during a drive, as under the
    daemon, and once more as it ends: the operator overview the UI shows after a drive is
    its end state, not the state of its first round."""
    config, opsdb, instance = limited
    observe(config, opsdb, observations=1)

    report = drive(build_definitions(config), instance)

    assert report.failed == [] and report.rounds > 2
    archived_everywhere(config, opsdb)
    records = instance.fetch_materializations(AssetKey("operator_overview"), limit=100).records
    assert 1 <= len(records) <= 2  # the first round's and the end's, not one per round
    shown = records[0].asset_materialization
    assert shown is not None
    with opsdb.session() as session:
        archived = len(session.scalars(select(RawDataPackage).where(
            RawDataPackage.state == PackageState.ARCHIVED)).all())
    assert archived == 2
    assert shown.metadata["packages archived"].value == archived


class Collected:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # handled here, in __del__: lost


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("taken_by", ["a garbage collector callback",
                                      "Dagster, executing a run in the drive's process"])
def test_a_ctrl_c_taken_by_another_handler_still_stops_the_drive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_by: str) -> None:
    """Ctrl-C lands while Python runs a `__del__` or a weakref callback (garbage collection,
    at any moment), where the KeyboardInterrupt is lost (Python prints "Exception ignored"
    and a traceback), or while Dagster executes a run in the drive's own process
    (`in_process`: a profiler's drive, a test's), which fails the run and returns: the drive
    stops all the same, as interrupted (the CLI's 130; it went on and exited 1), with no
    traceback and nothing left in flight; a plain drive then finishes the work."""
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1)
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    instance = DagsterInstance.from_config(str(home))
    rounds: list[int] = []
    if taken_by.startswith("Dagster"):
        stat_source = tarball._stat_source

        def interrupted_once(member: PackageMember) -> os.stat_result:
            if not rounds:
                rounds.append(0)
                os.kill(os.getpid(), signal.SIGINT)
            return stat_source(member)

        monkeypatch.setattr(tarball, "_stat_source", interrupted_once)
    else:
        adopt_queued = _Runs.adopt_queued

        def round_with_a_collection(runs: _Runs) -> None:
            rounds.append(len(rounds))
            if len(rounds) == 2:  # runs launched in the first are executing
                Collected()
            adopt_queued(runs)

        monkeypatch.setattr(_Runs, "adopt_queued", round_with_a_collection)
    with pytest.raises(KeyboardInterrupt):
        drive(build_definitions(config), instance,
              in_process=taken_by.startswith("Dagster"))

    assert len(rounds) <= 2  # it stopped at once, not rounds or back-offs later
    assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
    monkeypatch.undo()
    report = drive(build_definitions(config), instance, wait_s=10)
    assert report.failed == [] and report.dead_runs == []
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    instance.dispose()
    opsdb.dispose()
