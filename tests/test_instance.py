"""The Dagster instance `ccat-dt init` writes: valid, and one run limit per link."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance, RunsFilter, job, op
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from ccat_assets.cli import main
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.launcher import DriveRunLauncher
from ccat_assets.sqlite_storage import SqliteEventLog, SqliteRuns, SqliteSchedules
from ccat_assets.stages import copy_job
from ccat_dt.config import load_config
from ccat_dt.opsdb.database import OpsDB
from tests.helpers import observe


def test_init_writes_a_loadable_instance_with_a_limit_per_link(tmp_path: Path) -> None:
    main(["init", str(tmp_path / "deploy")])
    config = load_config(tmp_path / "deploy" / "ccat-dt.yaml")
    home = tmp_path / "deploy" / "dagster_home"
    settings = yaml.safe_load((home / "dagster.yaml").read_text())
    limits = {(limit["value"], limit["limit"])
              for limit in settings["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert limits == {(route.link, route.max_concurrent) for route in config.settings.routes}
    assert ("ccat->cologne", 2) in limits

    with DagsterInstance.from_config(str(home)) as instance:  # Dagster accepts the file
        opsdb = OpsDB(config.opsdb_url)
        observe(config, opsdb, observations=1, files=1)
        assert drive(build_definitions(config), instance).failed == []
        links = {run.tags.get("ccat/link") for run in instance.get_runs(
            RunsFilter(job_name=copy_job(config).name))}  # with its archiving
        assert links == {"ccat->cologne", "ccat->us", "cologne->us", "us->cologne"}
        assert isinstance(instance.event_log_storage, SqliteEventLog)
        assert isinstance(instance.run_storage, SqliteRuns)
        run_ids = [run.run_id for run in instance.get_runs()]

    # Another process's view (the webserver's): every run's events, written by forked
    # children through connections kept open, are all there, in intact files at Dagster's
    # schema revision.
    with DagsterInstance.from_config(str(home)) as reader:
        for run_id in run_ids:
            events = [e.dagster_event_type for e in reader.all_logs(run_id) if e.dagster_event_type]
            assert events[-1] == DagsterEventType.RUN_SUCCESS, (run_id, events)
            assert DagsterEventType.ASSET_MATERIALIZATION in events
            with sqlite3.connect(home / "history" / "runs" / f"{run_id}.db") as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                [revision] = db.execute("SELECT version_num FROM alembic_version").fetchone()
            head = reader.event_log_storage.alembic_version()
            assert head is not None and revision == head[1]  # the head



def test_instance_yaml_renders_the_production_template_with_link_limits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", str(tmp_path / "deploy")])
    capsys.readouterr()
    template = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"
    main(["--config", str(tmp_path / "deploy" / "ccat-dt.yaml"), "instance-yaml",
          "--template", str(template)])
    rendered = yaml.safe_load(capsys.readouterr().out)
    assert rendered["storage"]["postgres"]["postgres_db"]["password"] == {
        "env": "DAGSTER_PG_PASSWORD"}  # secrets stay references to the environment
    limits = rendered["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "ccat/link", "value": "ccat->cologne", "limit": 2} in limits
    # failed work is re-attempted by the reattempt sensor alone (its back-off, its escalation)
    assert not rendered.get("run_retries", {}).get("enabled", False)


@pytest.mark.parametrize("storage", [
    {"storage": {"postgres": {"postgres_url": "postgresql://dagster@db/dagster"}}},
    {"run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage",
                     "config": {"postgres_url": "postgresql://dagster@db/dagster"}}},
])
def test_init_again_keeps_a_storage_the_operator_set(
        tmp_path: Path, storage: dict[str, object]) -> None:
    """`migrate` tells the operator to run `init` again after a route changed; on an
    instance moved to dagster-postgres that rewrote its storage to the embedded SQLite
    files (found by a helper): the daemon and the UI would have started on an empty run
    history beside the real one."""
    deploy = tmp_path / "deploy"
    main(["init", str(deploy)])
    instance_file = deploy / "dagster_home" / "dagster.yaml"
    edited = {key: value for key, value in yaml.safe_load(instance_file.read_text()).items()
              if not key.endswith("storage")}
    instance_file.write_text(yaml.safe_dump({**edited, **storage}))

    main(["init", str(deploy)])

    written = yaml.safe_load(instance_file.read_text())
    assert {key: value for key, value in written.items() if key.endswith("storage")} == storage


def test_init_again_after_a_new_route_keeps_what_the_operator_set_in_the_instance(
        tmp_path: Path) -> None:
    """`init` runs again after every change of routes: the run limits follow the routes, and
    what an operator set in dagster.yaml (fewer runs at once, say) stays. An instance written
    before the template named its run launcher (ccat_assets/launcher.py) gets it."""
    deploy = tmp_path / "deploy"
    main(["init", str(deploy)])
    instance_file = deploy / "dagster_home" / "dagster.yaml"
    edited = yaml.safe_load(instance_file.read_text())
    edited["concurrency"]["runs"]["max_concurrent_runs"] = 3
    edited["run_monitoring"]["start_timeout_seconds"] = 600
    del edited["run_launcher"]  # as written before it was in the template
    instance_file.write_text(yaml.safe_dump(edited))
    settings = yaml.safe_load((deploy / "ccat-dt.yaml").read_text())
    next(r for r in settings["routes"] if r["origin"] == "ccat"
         and r["destination"] == "us")["max_concurrent"] = 1
    (deploy / "ccat-dt.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))

    main(["init", str(deploy)])

    written = yaml.safe_load(instance_file.read_text())
    assert written["concurrency"]["runs"]["max_concurrent_runs"] == 3
    assert written["run_monitoring"]["start_timeout_seconds"] == 600
    limits = {limit["value"]: limit["limit"]
              for limit in written["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert limits["ccat->us"] == 1 and limits["ccat->cologne"] == 2
    assert written["run_coordinator"]["class"] == "RoutedRunCoordinator"
    with DagsterInstance.from_config(str(deploy / "dagster_home")) as instance:
        assert isinstance(instance.run_storage, SqliteRuns)
        assert isinstance(instance.run_launcher, DriveRunLauncher)  # the UI's Terminate


def test_a_process_opening_the_instance_while_init_rewrites_it_gets_the_whole_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt init` again on a running deployment (after a change of routes) while another
    process opens the instance: the daemon's run worker, a cron `drive`, the UI, another
    `init`. The rewrite is stopped half-way here, and the instance opened at that moment.
    Before, dagster.yaml was rewritten in place: the other process read half a file (a YAML
    error, an invalid config) or an empty one (Dagster's defaults: another run storage, no
    run limits), and a second `init` reading it kept nothing of the operator's settings."""
    deploy = tmp_path / "deploy"
    main(["init", str(deploy)])
    home = deploy / "dagster_home"
    instance_file = home / "dagster.yaml"
    edited = yaml.safe_load(instance_file.read_text())
    edited["concurrency"]["runs"]["max_concurrent_runs"] = 3  # an operator's setting
    instance_file.write_text(yaml.safe_dump(edited))
    real = Path.write_text
    seen: list[dict[str, object]] = []

    def half_then_whole(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if self.parent != home or seen:
            return real(self, data, *args, **kwargs)  # type: ignore[arg-type]
        real(self, data[:len(data) // 2], *args, **kwargs)  # type: ignore[arg-type]
        try:  # what another `init` reads
            seen.append(yaml.safe_load(instance_file.read_text()) or {})
        except yaml.YAMLError as exc:
            seen.append({"error": str(exc)})
        try:  # what another process opens
            with DagsterInstance.from_config(str(home)) as instance:
                seen.append({"run_storage": type(instance.run_storage).__name__})
        except Exception as exc:  # noqa: BLE001 - shown by the assertion below
            seen.append({"error": str(exc)})
        return real(self, data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", half_then_whole)
    main(["init", str(deploy)])
    monkeypatch.undo()

    kept, opened = seen
    assert kept == edited
    assert opened == {"run_storage": SqliteRuns.__name__}
    written = yaml.safe_load(instance_file.read_text())
    assert written["concurrency"]["runs"]["max_concurrent_runs"] == 3
    assert [p.name for p in home.iterdir() if p.name.startswith(".")] == []


def test_a_dagster_yaml_dagster_refuses_is_named_with_what_to_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An operator adds PostgreSQL `storage:` to the instance and leaves the embedded
    sections `init` wrote: every command says which file and what to change (exit 2), not
    "internal error ... (a bug)"."""
    deploy = tmp_path / "deploy"
    main(["init", str(deploy)])
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    instance_file = deploy / "dagster_home" / "dagster.yaml"
    settings = yaml.safe_load(instance_file.read_text())
    settings["storage"] = {"postgres": {"postgres_url": "postgresql://dagster@db/dagster"}}
    instance_file.write_text(yaml.safe_dump(settings))
    capsys.readouterr()

    with pytest.raises(SystemExit) as exited:
        main(["--config", str(deploy / "ccat-dt.yaml"), "drive"])

    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(instance_file) in line and "keep one or the other" in line


def test_the_embedded_storage_looks_at_its_schema_once_not_at_every_call(
        instance: DagsterInstance) -> None:
    """Dagster's SQL storages reflected their tables' columns (PRAGMA table_info), listed the
    tables or queried the migration marks before nearly every run lookup, run created, event
    stored and sensor state read: ~3 % of a drive's CPU. What they find stays, in this process;
    what is written and read back is the same."""
    @op
    def noop() -> None:
        pass

    @job
    def tiny() -> None:
        noop()

    looks: list[str] = []

    def seen(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        text = " ".join(statement.split()).lower()
        if "table_info" in text or "sqlite_master" in text or "secondary_indexes" in text:
            looks.append(text)

    made = [instance.create_run_for_job(tiny) for _ in range(2)]  # the storages' first looks
    instance.report_engine_event("first", made[0])
    instance.all_instigator_state()
    event.listen(Engine, "before_cursor_execute", seen)
    try:
        made += [instance.create_run_for_job(tiny) for _ in range(5)]
        for run in made:
            instance.report_engine_event(f"hello {run.run_id}", run)
            assert instance.get_run_by_id(run.run_id) is not None
            instance.all_instigator_state()
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert looks == []
    for run in made:  # each run and its event stored, in the instance's files
        assert [log.message for log in instance.all_logs(run.run_id)
                if log.message.startswith("hello")] == [f"hello {run.run_id}"]
    assert len(instance.get_runs()) == 7


def test_the_instance_commits_without_an_fsync_each_while_opsdb_keeps_one_per_commit(
        tmp_path: Path) -> None:
    """The Dagster instance's SQLite files (runs, each run's events, the index, the sensors'
    states) commit in WAL mode with synchronous=NORMAL: ~1000 fsyncs of a 4-package drive
    were theirs, each a flush of the disk the copies stream to (bench section 12). OpsDB, which
    every deletion rests on, still fsyncs each commit (FULL); and a run's forked process,
    gone without closing anything, left every event it wrote (the reader's view below)."""
    main(["init", str(tmp_path / "deploy")])
    config = load_config(tmp_path / "deploy" / "ccat-dt.yaml")
    home = tmp_path / "deploy" / "dagster_home"
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    with DagsterInstance.from_config(str(home)) as instance:
        assert drive(build_definitions(config), instance).failed == []
        run_id = instance.get_runs()[0].run_id
        events = instance.event_log_storage
        runs, schedules = instance.run_storage, instance.schedule_storage
        assert isinstance(events, SqliteEventLog) and isinstance(runs, SqliteRuns)
        assert isinstance(schedules, SqliteSchedules)
        # one at a time: the event log's connections share one lock
        for connect in (runs.connect, lambda: events._connect(run_id),
                        lambda: events._connect("index"), schedules.connect):
            with connect() as connection:
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with opsdb.session() as session:
        assert session.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with DagsterInstance.from_config(str(home)) as reader:  # another process's view
        for run in reader.get_runs():
            kinds = [e.dagster_event_type for e in reader.all_logs(run.run_id)
                     if e.dagster_event_type]
            assert kinds[-1] == DagsterEventType.RUN_SUCCESS, (run.run_id, kinds)


def test_a_drive_killed_mid_run_leaves_nothing_in_the_temporary_directory(
        tmp_path: Path) -> None:
    """The empty event file a new run's file is copied from lives in the instance: made per
    process in a temporary directory, every process that ended without its atexit (a forked
    run's os._exit, SIGKILL, the daemon or a code server stopped by SIGTERM) left its own
    behind, 120 KB each, for as long as the service ran."""
    main(["init", str(tmp_path / "deploy")])
    config_file = tmp_path / "deploy" / "ccat-dt.yaml"
    config = load_config(config_file)
    observe(config, OpsDB(config.opsdb_url), observations=1, files=1)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    events = tmp_path / "deploy" / "dagster_home" / "history" / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_DT_", "DAGSTER_HOME"))}
    drive_process = subprocess.Popen(
        [str(Path(sys.executable).parent / "ccat-dt"), "--config", str(config_file), "drive"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**env, "TMPDIR": str(scratch)})
    try:
        deadline = time.monotonic() + 300
        while not [p for p in events.glob("*.db") if p.name != "index.db"]:
            assert drive_process.poll() is None, "the drive ended before its first run"
            assert time.monotonic() < deadline, "no run's event file after 300 s"
            time.sleep(0.02)
    finally:
        drive_process.kill()
        drive_process.wait()
    assert sorted(p.name for p in scratch.iterdir()) == []
    with DagsterInstance.from_config(str(tmp_path / "deploy" / "dagster_home")) as instance:
        assert drive(build_definitions(config), instance).failed == []  # the copy is sound


def _orm_complete_once_open(home: Path, env: dict[str, str]) -> list[str]:
    """In a fresh process: whether SQLAlchemy's ORM is completely imported once the instance
    in `home` is open and a run read (as dagster-webserver does before serving), whether our
    run coordinator was loaded for it, and which run storage the instance has."""
    probe = ("import sys; from dagster import DagsterInstance; "
             f"instance = DagsterInstance.from_config({str(home)!r}); "
             "instance.get_runs(limit=1); "
             "orm = sys.modules.get('sqlalchemy.orm.exc'); "
             "print(orm is not None and hasattr(orm, 'UnmappedClassError'), "
             "'ccat_assets.routing' in sys.modules, type(instance.run_storage).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "DAGSTER_HOME": str(home), **env}, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_the_orm_is_complete_once_the_embedded_instance_is_open(tmp_path: Path) -> None:
    """dagster-webserver builds the instance in its main thread, and its run coordinator
    (ccat_assets.routing, whose OpsDB models import SQLAlchemy's ORM) only when a GraphQL
    thread first asks for it, while other threads run queries. The ORM, imported first there,
    is half initialized for a moment in which another thread's query binding a value fails
    ("partially initialized module 'sqlalchemy.orm.exc' has no attribute
    'UnmappedClassError'"): real clicks met it as the UI's "Unexpected GraphQL error" on the
    asset page. Now the instance's class is loaded through a module that imports the ORM
    (ccat_assets/dagster_instance.py): in a fresh process, opening the instance leaves the
    ORM complete before the coordinator is asked for."""
    main(["init", str(tmp_path)])
    assert _orm_complete_once_open(
        tmp_path / "dagster_home", {"CCAT_DT_CONFIG": str(tmp_path / "ccat-dt.yaml")},
    ) == ["True", "False", "SqliteRuns"]


def test_the_orm_is_complete_once_the_production_instance_is_open(
        tmp_path: Path, dagster_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The same for the instance `instance-yaml --template deploy/dagster.yaml` writes, whose
    storage is dagster-postgres' (which imports no ORM): before, 5 of 6 starts of
    dagster-webserver on it, asked for the coordinator while other requests read runs' stats,
    answered some of them "partially initialized module 'sqlalchemy.orm.exc'"."""
    main(["init", str(tmp_path)])
    capsys.readouterr()
    main(["--config", str(tmp_path / "ccat-dt.yaml"), "instance-yaml", "--template",
          str(Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml")])
    home = tmp_path / "dagster_home"
    (home / "dagster.yaml").write_text(capsys.readouterr().out)
    url = make_url(dagster_database)
    env = {"CCAT_DT_CONFIG": str(tmp_path / "ccat-dt.yaml"),
           "DAGSTER_PG_HOST": str(url.host), "DAGSTER_PG_PORT": str(url.port or 5432),
           "DAGSTER_PG_DB": str(url.database), "DAGSTER_PG_USER": str(url.username),
           "DAGSTER_PG_PASSWORD": url.password or "unused"}  # trust: any password does
    assert _orm_complete_once_open(home, env) == ["True", "False", "PostgresRunStorage"]
