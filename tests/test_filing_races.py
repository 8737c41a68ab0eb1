"""Two operators at once on one observation (`ccat-dt file` and `ccat-dt observation finish`,
each twice, `observation start` twice, the filing service beside them): each is idempotent and
safe, on SQLite and on PostgreSQL (READ COMMITTED).

Each race is made deterministic: the first party is held inside its transaction at the worst
moment (its checks done, nothing inserted: filing.py's `hook`), and the second runs meanwhile.
On PostgreSQL the second is a thread of its own, and the first goes on once the second has
returned or waits for the first's locks (pg_blocking_pids). On SQLite, which serialises
writers, the second is tried without waiting (busy timeout 0): it either gets through in the
window or is told the database is locked, meaning it would wait in its busy timeout, and then
runs once the first has committed."""

from __future__ import annotations

import logging
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.filing import (
    FileSpec,
    FilingError,
    Hook,
    Source,
    check_files,
    file_directory,
    file_raw_files,
    finish_observation,
    lock_observation,
    open_observation,
    record_checked,
    start_observation,
)
from ccat_dt.opsdb.database import LOCK_TIMEOUT_ENV, OpsDB
from ccat_dt.opsdb.models import (
    ApiRequest,
    ExecutedObsUnit,
    ObservationStatus,
    RawDataFile,
    RawDataFileCopy,
)
from ccat_dt.packages import build, plan_new_packages
from ccat_dt.service.core import FilingService
from ccat_dt.service.tokens import TokenInfo, create_token, list_tokens
from ccat_dt.tarball import MANIFEST_NAME
from tests.helpers import write

OBS = "obs-1"
MODULE = "primecam/f280"
GUARD_S = 120.0  # only ends a test that would otherwise hang: nothing waits for time


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> OpsDB:
    """The embedded SQLite OpsDB, or the same topology in PostgreSQL."""
    return request.getfixturevalue("opsdb" if request.param == "sqlite" else "pg_opsdb")


@pytest.fixture
def root(config: Config) -> Path:
    path = config.resolve_root("sites/ccat/instruments")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None


@dataclass
class Race:
    first: Outcome
    second: Outcome
    waited: bool  # the second had to wait for the first's transaction


def _run(action: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(value=action())
    except (FilingError, OperationalError) as exc:
        return Outcome(error=exc)


def race(db: OpsDB, first: Callable[[Hook], Any], second: Callable[[OpsDB], Any],
         monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], None] = lambda: None) -> Race:
    """`first` held by its hook, `second` run meanwhile (see the module's docstring), then
    `meanwhile` (another process's moment in the window, such as a package sensor tick)."""
    found: dict[str, Any] = {"waited": False}

    def on_postgres(session: Session) -> None:
        if "thread" in found:  # the first party's transaction tried again
            return
        holder = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        thread = threading.Thread(target=lambda: found.update(second=_run(lambda: second(db))),
                                  daemon=True)
        found["thread"] = thread
        thread.start()
        deadline = time.monotonic() + GUARD_S
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
            while thread.is_alive():
                if watcher.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted AND "
                                        ":holder = ANY(pg_blocking_pids(pid))"),
                                   {"holder": holder}).scalar():
                    found["waited"] = True
                    break
                assert time.monotonic() < deadline, "the second party neither ended nor waited"
                time.sleep(0.01)
        meanwhile()

    def on_sqlite(session: Session) -> None:
        if "second" in found or found["waited"]:  # the first party's transaction tried again
            return
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0")  # no busy wait: "database is locked" at once
        impatient = OpsDB(db.url)
        monkeypatch.delenv(LOCK_TIMEOUT_ENV)
        try:
            outcome = _run(lambda: second(impatient))
        finally:
            impatient.dispose()
        if isinstance(outcome.error, OperationalError):
            assert "database is locked" in str(outcome.error), outcome.error
            found["waited"] = True
        else:
            found["second"] = outcome
        meanwhile()

    postgres = db.engine.dialect.name == "postgresql"
    held = _run(lambda: first(on_postgres if postgres else on_sqlite))
    assert "thread" in found or "second" in found or found["waited"], \
        f"the first party never reached its hook: {held}"
    if postgres:
        found["thread"].join(GUARD_S)
        assert not found["thread"].is_alive()
    elif found["waited"]:  # it waited in its busy timeout until now
        found["second"] = _run(lambda: second(db))
    return Race(held, found["second"], found["waited"])


def filing(path: str, how: str = "files", root: Path | None = None) -> Callable[..., Any]:
    """Files `path` as `ccat-dt file` does (its paths, or `--directory`), or as the filing
    service records a request it checked earlier (its journal drained into OpsDB)."""
    def call(db: OpsDB, hook: Hook | None = None) -> Any:
        if how == "service":
            assert root is not None
            checked = check_files(Source("ccat/instruments", root, root.resolve()),
                                  [FileSpec(path)], OBS)
            with db.session() as session:
                return record_checked(session, observation=OBS, module=MODULE, files=checked,
                                      hook=hook)
        if how == "directory":
            return file_directory(db, observation=OBS, module=MODULE, directory=path, hook=hook)
        return file_raw_files(db, observation=OBS, module=MODULE, files=[FileSpec(path)],
                              hook=hook)
    return call


def finishing(db: OpsDB, hook: Hook | None = None) -> Any:
    return finish_observation(db, OBS, hook=hook)


def filed(db: OpsDB) -> list[tuple[str, str]]:
    with db.session() as session:
        return [(f.relative_path, f.checksum) for f in session.scalars(
            select(RawDataFile).order_by(RawDataFile.relative_path))]


def observation(db: OpsDB) -> ExecutedObsUnit:
    with db.session() as session:
        return session.scalars(select(ExecutedObsUnit).where(ExecutedObsUnit.name == OBS)).one()


# A finish committed between a filing's "is the observation open?" and its INSERT: before, the
# file was filed into the finished observation (filed after finished_at), after a package
# sensor tick in between had planned the observation's packages without it: its tar without
# the file, which went on its own into a second package. Now the two are serialised on the
# observation's row: the filing holding it files, and the finish waits and finishes with the
# file; the finish holding it finishes, and the filing waits and is refused, nothing filed.
# The filing service's recording of a request (record_checked) likewise.
@pytest.mark.parametrize("how", ["files", "directory", "service"])
@pytest.mark.parametrize("held", ["filing", "finish"])
def test_a_finish_while_files_are_filed_leaves_the_observation_with_what_its_package_holds(
        db: OpsDB, config: Config, root: Path, monkeypatch: pytest.MonkeyPatch,
        held: str, how: str) -> None:
    start_observation(db, OBS)
    write(root / "early" / "a.dat", b"filed before")
    file_raw_files(db, observation=OBS, module=MODULE, files=[FileSpec("early/a.dat")])
    write(root / "late" / "b.dat", b"filed at the moment it finishes")
    file_late = filing("late" if how == "directory" else "late/b.dat", how, root)
    planned: list[str] = []

    def tick() -> None:  # the package sensor, at that moment
        planned.extend(plan_new_packages(db, config))

    if held == "filing":
        result = race(db, lambda hook: file_late(db, hook), finishing, monkeypatch, tick)
        filing_outcome, finish_outcome = result.first, result.second
    else:
        result = race(db, lambda hook: finishing(db, hook), file_late, monkeypatch, tick)
        finish_outcome, filing_outcome = result.first, result.second
    assert finish_outcome.error is None, finish_outcome.error
    obs = observation(db)
    finished_at = obs.finished_at
    assert obs.status == ObservationStatus.FINISHED and finished_at is not None
    with db.session() as session:  # the observation's files: those filed before it finished
        files = session.scalars(select(RawDataFile).order_by(RawDataFile.relative_path)).all()
        assert all(f.filed_at <= finished_at for f in files), \
            [(f.relative_path, f.filed_at, finished_at) for f in files]
    names = [f.relative_path for f in files]
    planned.extend(plan_new_packages(db, config))
    assert len(planned) == 1, planned  # one package of the observation, holding all its files
    tar = Path(build(db, config, planned[0]).path)
    with tarfile.open(tar) as archive:
        assert sorted(m.name for m in archive.getmembers()
                      if m.isfile() and m.name != MANIFEST_NAME) == names
    assert plan_new_packages(db, config) == []

    if held == "filing":  # the finish waited, and finished with the file
        assert filing_outcome.error is None, filing_outcome.error
        assert filing_outcome.value.filed == 1
        assert names == ["early/a.dat", "late/b.dat"]
    else:  # the filing waited, and was refused
        assert isinstance(filing_outcome.error, FilingError), filing_outcome
        assert "finished" in str(filing_outcome.error)
        assert names == ["early/a.dat"]
    assert result.waited


# Two `observation finish` at once: one finishes, the other waits and answers that it was
# already finished at that moment, which stays the observation's finished_at.
def test_two_finishes_at_once_finish_once(db: OpsDB, monkeypatch: pytest.MonkeyPatch) -> None:
    start_observation(db, OBS)
    result = race(db, lambda hook: finishing(db, hook), finishing, monkeypatch)
    assert result.first.error is None and result.first.value is None  # finished it
    finished_at = observation(db).finished_at
    assert result.second.error is None and result.second.value == finished_at  # found it done
    assert observation(db).status == ObservationStatus.FINISHED
    assert result.waited


# `ccat-dt file` of one path into one observation twice at once (an instrument's retry while
# its first call is still recording): before, both read "not filed yet", and the second's
# INSERT failed on the unique path ("filed concurrently by another process ... retry").
# Now the second waits for the first and finds the file filed with the same checksum.
@pytest.mark.parametrize("how", ["files", "directory"])
def test_the_same_file_filed_twice_at_once_is_filed_once_and_both_succeed(
        db: OpsDB, root: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    start_observation(db, OBS)
    write(root / "d" / "a.dat", b"one file")
    file_it = filing("d/a.dat" if how == "files" else "d", how)
    result = race(db, lambda hook: file_it(db, hook), file_it, monkeypatch)
    assert result.first.error is None and result.second.error is None, (result.first,
                                                                        result.second)
    assert (result.first.value.filed, result.second.value.filed) == (1, 0)
    assert result.second.value.unchanged == 1
    assert result.first.value.uuids == result.second.value.uuids
    [(path, checksum)] = filed(db)
    assert path == "d/a.dat"
    assert checksum == hash_file(root / "d" / "a.dat")[0]
    assert result.waited


# One path filed into two observations at once (a mistyped `--observation`): one has it, the
# other is refused, saying under which observation it is filed. Before, on PostgreSQL (where
# the two observations' locks do not serialise them, as SQLite's write lock does), the one
# whose INSERT came second was told "filed concurrently by another process ... retry".
def test_one_path_filed_into_two_observations_at_once_is_refused_for_one_saying_why(
        db: OpsDB, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start_observation(db, OBS)
    start_observation(db, "obs-2")
    write(root / "a.dat", b"one file")

    def into(name: str) -> Callable[..., Any]:
        return lambda other, hook=None: file_raw_files(
            other, observation=name, module=MODULE, files=[FileSpec("a.dat")], hook=hook)
    result = race(db, lambda hook: into(OBS)(db, hook), into("obs-2"), monkeypatch)
    outcomes = {OBS: result.first, "obs-2": result.second}
    [winner] = [name for name, o in outcomes.items() if o.error is None]
    [loser] = [o for o in outcomes.values() if o.error is not None]
    assert isinstance(loser.error, FilingError)
    assert (f"'a.dat' is already filed under observation '{winner}', module {MODULE}; nothing "
            "was filed") in str(loser.error), loser.error
    with db.session() as session:
        [row] = session.scalars(select(RawDataFile)).all()
        assert (row.relative_path, row.observation.name) == ("a.dat", winner)


# `observation start` of one name twice at once: one observation, both told its uuid, and the
# second that it was already started (`ccat-dt observation start` prints "already open"; before,
# both printed "started": each had looked for the name before starting it, and found none).
def test_two_starts_of_one_name_at_once_open_one_observation(
        db: OpsDB, monkeypatch: pytest.MonkeyPatch) -> None:
    result = race(db, lambda hook: open_observation(db, OBS, hook=hook),
                  lambda other: open_observation(other, OBS), monkeypatch)
    assert result.first.error is None and result.second.error is None, (result.first,
                                                                        result.second)
    assert result.first.value.uuid == result.second.value.uuid == observation(db).uuid
    assert (result.first.value.created, result.second.value.created) == (True, False)
    assert result.waited


# --- two filing services (or a service and another writer) on one PostgreSQL OpsDB -------------

SERVICE_LOG = "ccat_dt.service"


@dataclass
class Service:
    """A filing service of its own (its own journal) filing into the test's PostgreSQL OpsDB,
    as a second host does, and the token its instrument sends."""

    service: FilingService
    token: TokenInfo
    secret: str  # the token an instrument sends over HTTP

    def journal(self, observation: str, paths: list[str]) -> None:
        """A request taken into the journal: the service has not reached OpsDB yet (as one
        started while OpsDB is out of reach); its drainer applies it."""
        ack = self.service.file(self.token, observation=observation, module=MODULE,
                                files=[FileSpec(path) for path in paths])
        assert ack.status == 202, ack

    def health(self) -> dict[str, Any]:
        return self.service.health()


@pytest.fixture
def services(config: Config, pg_opsdb: OpsDB, postgres_url: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Service]]:
    monkeypatch.setenv("CCAT_DT_OPSDB_URL", postgres_url)
    on_postgres = load_config(config.path)
    secret = create_token(pg_opsdb, on_postgres, name="primecam-daq", site="ccat",
                          instruments=["primecam"])
    [token] = list_tokens(pg_opsdb)
    made: list[FilingService] = []

    def make(name: str) -> Service:
        made.append(FilingService(on_postgres, journal_path=str(tmp_path / f"{name}.sqlite")))
        return Service(made[-1], token, secret)
    yield make
    for service in made:
        service.stop()


def at_observation_lock(number: int, action: Callable[[], Any],
                        hook: Callable[[Session, int], None]) -> Any:
    """`action` (run in this thread), held just before its transaction takes its `number`th
    observation row lock (filing's lock UPDATE): `hook` gets a session on that transaction's
    connection and its backend's pid, once (a transaction run again takes its locks again,
    passed over). Other threads' statements pass."""
    here = threading.current_thread()
    seen = [0]

    def before(conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if (threading.current_thread() is not here
                or not statement.lstrip().upper().startswith("UPDATE EXECUTED_OBS_UNITS")):
            return
        seen[0] += 1
        if seen[0] == number:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            assert isinstance(pid, int)
            hook(Session(bind=conn), pid)

    event.listen(Engine, "before_cursor_execute", before)
    try:
        return action()
    finally:
        event.remove(Engine, "before_cursor_execute", before)


def wait_blocked_by(db: OpsDB, holder: int, done: Callable[[], bool]) -> None:
    """Until a session waits for a lock `holder`'s transaction holds (or `done`)."""
    deadline = time.monotonic() + GUARD_S
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
        while not done():
            if watcher.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted AND "
                                    ":holder = ANY(pg_blocking_pids(pid))"),
                               {"holder": holder}).scalar():
                return
            assert time.monotonic() < deadline, "nothing waited for the held transaction"
            time.sleep(0.01)


def assert_opsdb_matches_the_files(db: OpsDB, root: Path, contents: dict[str, bytes],
                                   requests: int) -> None:
    """Every file written is filed once, into its observation, as the bytes on disk are (read
    back and hashed), with one source copy; every request applied once."""
    with db.session() as session:
        rows = session.execute(
            select(RawDataFile.relative_path, RawDataFile.size, RawDataFile.checksum,
                   ExecutedObsUnit.name).join(ExecutedObsUnit)).all()
        copies = session.scalar(select(func.count(RawDataFileCopy.id)))
        applied = session.scalars(select(ApiRequest.request_id)).all()
    assert sorted(path for path, *_ in rows) == sorted(contents)  # each exactly once
    for path, size, checksum, name in rows:
        data = (root / path).read_bytes()
        assert data == contents[path], path
        assert (size, checksum) == (len(data), hash_file(root / path)[0]), path
        assert name == path.split("/")[0], (path, name)
    assert copies == len(contents)
    assert len(applied) == len(set(applied)) == requests


def raw_files(root: Path, *paths: str) -> dict[str, bytes]:
    contents = {path: f"{path}: bytes of its own\n".encode() * 64 for path in paths}
    for path, data in contents.items():
        write(root / path, data)
    return contents


# Two filing services (two hosts filing into one OpsDB) drain journals that file into the same
# two observations in opposite orders (one a then b, the other b then a; a file sent to both).
# The first is held in its batch's transaction holding one observation's lock, about to take
# the other's, while the second drains. Before, each transaction locked the observations in
# its requests' order: the first held obs-a and wanted obs-b, the second held obs-b and
# wanted obs-a, and PostgreSQL aborted one ("deadlock detected"), which its service took for a
# lost link: "OpsDB unreachable, journaling requests" on its log and /health, its entries
# left for after the unreachable back-off. Now every batch locks its observations first, by
# name: the second waits for the first, and both apply everything in one step, no conflict.
def test_two_services_filing_overlapping_observations_in_opposite_orders_never_deadlock(
        pg_opsdb: OpsDB, root: Path, services: Callable[[str], Service],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("obs-a", "obs-b"):
        start_observation(pg_opsdb, name)
    contents = raw_files(root, "obs-a/one.dat", "obs-a/both.dat", "obs-b/one.dat",
                         "obs-b/two.dat")
    first, second = services("first"), services("second")
    first.journal("obs-a", ["obs-a/one.dat", "obs-a/both.dat"])
    first.journal("obs-b", ["obs-b/one.dat"])
    second.journal("obs-b", ["obs-b/two.dat"])
    second.journal("obs-a", ["obs-a/both.dat"])  # an instrument's retry at the other host

    with caplog.at_level(logging.INFO, SERVICE_LOG):
        result = race(pg_opsdb, lambda hook: at_observation_lock(
            2, first.service.drain_step, lambda session, _pid: hook(session)),
            lambda _db: second.service.drain_step(), monkeypatch)
    assert result.first.error is None and result.second.error is None, result
    assert result.waited  # the second waited for the first's locks
    told = [r.getMessage() for r in caplog.records]
    assert not [m for m in told if "unreachable" in m.lower()], told
    assert not [m for m in told if "conflict" in m], told  # no deadlock at all
    for service in (first, second):  # each applied its journal in that one step
        health = service.health()
        assert (health["journal"]["pending"], health["journal"]["dead"]) == (0, 0), health
        assert health["opsdb"]["reachable"] and health["opsdb"]["error"] is None, health
        assert health["opsdb"]["conflicts"] == 0, health
    assert_opsdb_matches_the_files(pg_opsdb, root, contents, requests=4)


# A transaction that locks the same observations in the other order (a service still running
# an older ccat-dt during an upgrade, or any other writer) deadlocks with a service's batch, and
# PostgreSQL aborts the service's transaction. Before, the service took it for a lost link
# ("OpsDB unreachable, journaling requests: deadlock detected" on its log, /health unreachable)
# and left its entries for after the unreachable back-off. Now it is a conflict: the
# transaction is run again at once (at most CONFLICT_ATTEMPTS times), the log says so, and the
# batch is applied in the same step.
def test_a_deadlock_with_another_writer_is_retried_at_once_not_taken_for_a_lost_link(
        pg_opsdb: OpsDB, root: Path, services: Callable[[str], Service],
        caplog: pytest.LogCaptureFixture) -> None:
    for name in ("obs-a", "obs-b"):
        start_observation(pg_opsdb, name)
    contents = raw_files(root, "obs-a/one.dat", "obs-b/one.dat")
    only = services("only")
    only.journal("obs-a", ["obs-a/one.dat"])
    only.journal("obs-b", ["obs-b/one.dat"])
    holding, go = threading.Event(), threading.Event()
    other: dict[str, Any] = {}

    def older_writer() -> None:  # obs-b, then obs-a
        try:
            with pg_opsdb.session() as session:
                # PostgreSQL's deadlock check runs in the session that has waited
                # deadlock_timeout: never this one's first, so the service's is aborted
                session.execute(text("SET LOCAL deadlock_timeout = '10min'"))
                lock_observation(session, ExecutedObsUnit.name == "obs-b")
                holding.set()
                assert go.wait(GUARD_S)
                lock_observation(session, ExecutedObsUnit.name == "obs-a")
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            other["error"] = exc
            holding.set()

    thread = threading.Thread(target=older_writer, daemon=True)
    thread.start()
    assert holding.wait(GUARD_S) and "error" not in other, other

    def meanwhile(_session: Session, pid: int) -> None:  # the service holds obs-a
        go.set()
        wait_blocked_by(pg_opsdb, pid, lambda: not thread.is_alive())

    with caplog.at_level(logging.INFO, SERVICE_LOG):
        at_observation_lock(2, only.service.drain_step, meanwhile)
    thread.join(GUARD_S)
    assert not thread.is_alive() and "error" not in other, other
    told = [r.getMessage() for r in caplog.records]
    assert not [m for m in told if "unreachable" in m.lower()], told
    [retried] = [m for m in told if "conflict" in m]
    assert "deadlock detected" in retried and "running it again at once" in retried, retried
    health = only.health()
    assert (health["journal"]["pending"], health["journal"]["dead"]) == (0, 0), health
    assert health["opsdb"]["reachable"] and health["opsdb"]["error"] is None, health
    assert health["opsdb"]["conflicts"] == 1, health
    assert_opsdb_matches_the_files(pg_opsdb, root, contents, requests=2)


# A lock another session holds past lock_timeout (SQLSTATE 55P03) while an instrument files: an
# operator's psql left `idle in transaction` after touching the observation's row, a command
# stopped mid-transaction; a VACUUM FULL or a migration holding a table. Before, the service
# took it for a lost link: "OpsDB unreachable, journaling requests" on its log, /health
# unreachable, the pool thrown away and the journal left to the unreachable back-off; a read
# answered 404 "no observation" (OpsDB unreachable). Now it is contention with a live server:
# the request is journaled (202, saying why), the drainer tries again at each step, OpsDB
# stays reachable, /health counts the lock timeouts and says what holds the requests up while
# it lasts; once the lock is let go the next step files it; a read held up answers 503.
def test_a_lock_held_past_lock_timeout_is_contention_and_the_filing_goes_through_once_let_go(
        pg_opsdb: OpsDB, root: Path, services: Callable[[str], Service],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from ccat_dt.service.app import create_app

    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.2")  # the service's; the holder waits for nothing
    start_observation(pg_opsdb, "obs-a")
    contents = raw_files(root, "obs-a/one.dat")
    only = services("only")
    only.service.drain_step()  # contacts OpsDB: reachable, requests applied at once
    assert only.health()["opsdb"]["reachable"], only.health()
    # the app without its lifespan: no drainer thread, its steps are the test's
    http = TestClient(create_app(only.service),
                      headers={"Authorization": f"Bearer {only.secret}"})
    filing = {"observation": "obs-a", "module": MODULE, "path": "obs-a/one.dat"}

    with caplog.at_level(logging.INFO, SERVICE_LOG):
        with pg_opsdb.session() as holder:  # an idle-in-transaction session on obs-a's row
            lock_observation(holder, ExecutedObsUnit.name == "obs-a")
            answer = http.post("/raw_data_files", json=filing)
            assert answer.status_code == 202, answer.text
            assert answer.json()["status"] == "buffered", answer.json()
            assert answer.json()["reason"].startswith("OpsDB busy: waited 0.2 s for a lock "
                                                      "another session holds"), answer.json()
            only.service.drain_step()  # still held: tried again, not applied
            health = http.get("/health").json()
            assert health["opsdb"]["reachable"] and health["opsdb"]["error"] is None, health
            assert health["opsdb"]["lock_timeouts"] == 2, health
            assert "lock another session holds" in health["opsdb"]["contention"], health
            assert health["journal"]["pending"] == 1, health
        only.service.drain_step()  # let go: applied at this step, no back-off
        health = http.get("/health").json()
        with pg_opsdb.engine.connect() as table_holder:  # a VACUUM FULL, a migration
            table_holder.execute(text("LOCK TABLE raw_data_files IN ACCESS EXCLUSIVE MODE"))
            held_up = http.get("/executed_obs_units/obs-a")
            busy = http.get("/health").json()["opsdb"]
            table_holder.rollback()
        only.service.drain_step()  # nothing to apply: it looks at OpsDB again
        after = http.get("/health").json()["opsdb"]
        read = http.get("/executed_obs_units/obs-a")
    assert (health["journal"]["pending"], health["journal"]["dead"]) == (0, 0), health
    assert health["opsdb"]["reachable"] and health["opsdb"]["contention"] is None, health
    assert (health["opsdb"]["lock_timeouts"], health["opsdb"]["conflicts"]) == (2, 0), health
    assert held_up.status_code == 503 and "OpsDB busy" in held_up.json()["detail"], held_up.text
    assert held_up.headers["Retry-After"]
    assert "lock another session holds" in busy["contention"], busy
    assert after["reachable"] and after["contention"] is None, after
    assert read.status_code == 200 and read.json()["files"] == 1, read.text
    told = [r.getMessage() for r in caplog.records]
    assert not [m for m in told if "unreachable" in m.lower()], told
    assert len([m for m in told if m.startswith("OpsDB busy,")]) == 2, told  # filing, read
    assert_opsdb_matches_the_files(pg_opsdb, root, contents, requests=1)


# A lock another session holds for long (an operator's psql `idle in transaction` on the
# observation's row, a VACUUM FULL) while an instrument files request after request, the
# service's drainer running as under `ccat-dt serve`. Before, the first request waited the whole
# lock_timeout (30 s by default) before it was journaled, and every later one waited behind the
# drainer, which held the service's write lock while it waited lock_timeout again at each
# step: one acknowledgement per lock_timeout while the lock lasted (an instrument's client with
# a shorter timeout got none, its data not acknowledged). Now a request waits for a lock at most
# DIRECT_LOCK_WAIT_S before it is journaled, and the drainer waits for the lock without holding
# up the requests; once the lock is let go it files them all.
def test_requests_are_acknowledged_while_the_drainer_waits_for_a_lock_another_session_holds(
        pg_opsdb: OpsDB, root: Path, services: Callable[[str], Service],
        monkeypatch: pytest.MonkeyPatch) -> None:
    lock_timeout = 20.0
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, str(lock_timeout))  # how long the drainer waits
    start_observation(pg_opsdb, "obs-a")
    names = [f"obs-a/scan-{n}.dat" for n in range(4)]
    contents = raw_files(root, *names)
    only = services("only")
    only.service.drain_step()  # contacts OpsDB: reachable, requests applied at once
    only.service.start()  # its drainer thread, as the app's lifespan starts it
    acknowledged: list[tuple[int, str, float]] = []
    with pg_opsdb.session() as holder:  # an idle-in-transaction session on obs-a's row
        lock_observation(holder, ExecutedObsUnit.name == "obs-a")
        pid = holder.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        assert isinstance(pid, int)
        for number, name in enumerate(names):
            started = time.monotonic()
            ack = only.service.file(only.token, observation="obs-a", module=MODULE,
                                    files=[FileSpec(name)])
            acknowledged.append((ack.status, ack.body["status"], time.monotonic() - started))
            if number == 0:  # the drainer now tries it, waiting for the lock
                wait_blocked_by(pg_opsdb, pid, lambda: False)
        pending = only.health()["journal"]["pending"]
    deadline = time.monotonic() + GUARD_S  # let go: the waiting drainer goes on
    while only.health()["journal"]["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(status, said) for status, said, _ in acknowledged] == [(202, "buffered")] * 4
    # none waited the lock out: the drainer waited for it meanwhile (never a timed race: the
    # bound is the lock_timeout a request used to wait, ten times what it waits now)
    assert max(took for *_, took in acknowledged) < lock_timeout / 2, acknowledged
    assert pending == 4
    health = only.health()
    assert (health["journal"]["pending"], health["journal"]["dead"]) == (0, 0), health
    assert health["opsdb"]["reachable"] and health["opsdb"]["contention"] is None, health
    assert_opsdb_matches_the_files(pg_opsdb, root, contents, requests=4)


# The server cancels the service's statement (SQLSTATE 57014): a statement_timeout an
# administrator set for the role or the database (here on the service's pooled connection) ran
# out while the statement waited for a lock; pg_cancel_backend does the same. The server is
# live: the request is journaled (202) with the cancel as its reason, /health says OpsDB is
# reachable and busy, and the drainer files it at its next step once the statement goes
# through. Before, it was "OpsDB unreachable": the pool thrown away, the entry left to the
# unreachable back-off, /health saying the server could not be reached.
def test_a_statement_the_server_cancels_is_journaled_as_busy_not_unreachable(
        pg_opsdb: OpsDB, root: Path, services: Callable[[str], Service]) -> None:
    start_observation(pg_opsdb, "obs-a")
    contents = raw_files(root, "obs-a/one.dat")
    only = services("only")
    only.service.drain_step()  # contacts OpsDB: reachable, one pooled connection
    opsdb = only.service._opsdb
    assert opsdb is not None
    with opsdb.engine.connect() as pooled:  # a statement_timeout shorter than the lock wait
        pooled.exec_driver_sql("SET statement_timeout = '200ms'")
        pooled.commit()
    with pg_opsdb.session() as holder:  # an idle-in-transaction session on obs-a's row
        lock_observation(holder, ExecutedObsUnit.name == "obs-a")
        ack = only.service.file(only.token, observation="obs-a", module=MODULE,
                                files=[FileSpec("obs-a/one.dat")])
        health = only.health()
    assert (ack.status, ack.body["status"]) == (202, "buffered"), ack
    assert "statement timeout" in ack.body["reason"] and "busy" in ack.body["reason"], ack
    assert health["opsdb"]["reachable"], health
    assert "statement timeout" in health["opsdb"]["contention"], health
    for _ in range(100):  # the lock let go: filed at the next step (a loaded machine's
        only.service.drain_step()  # statement over 0.2 s is cancelled too: the one after)
        if only.health()["journal"]["pending"] == 0:
            break
    health = only.health()
    assert (health["journal"]["pending"], health["journal"]["dead"]) == (0, 0), health
    assert health["opsdb"]["contention"] is None, health
    assert_opsdb_matches_the_files(pg_opsdb, root, contents, requests=1)


# The server under the service's pooled connection accepts only reads (SQLSTATE 25006): a
# primary demoted by a failover while a new primary took over its address, a database set
# `default_transaction_read_only` while its disk is full. OpsDB cannot take writes: the request
# is journaled (202) as while it is out of reach, the pool's connections are thrown away, and the
# drainer files it through a new connection once one takes writes. Before, the request failed
# (500 over HTTP, nothing stored: the instrument's data not acknowledged), /health said OpsDB
# was fine, and the drainer's pooled connections stayed on the read-only server until a person
# restarted the service.
def test_a_server_taking_only_reads_journals_the_request_and_the_drainer_files_it_after(
        pg_opsdb: OpsDB, root: Path, services: Callable[[str], Service],
        caplog: pytest.LogCaptureFixture) -> None:
    start_observation(pg_opsdb, "obs-a")
    contents = raw_files(root, "obs-a/one.dat", "obs-a/two.dat")
    only = services("only")
    only.service.drain_step()  # contacts OpsDB: reachable, one pooled connection
    opsdb = only.service._opsdb
    assert opsdb is not None
    with opsdb.engine.connect() as pooled:  # its server now takes only reads
        pooled.exec_driver_sql("SET default_transaction_read_only = on")
        pooled.commit()

    with caplog.at_level(logging.INFO, SERVICE_LOG):
        ack = only.service.file(only.token, observation="obs-a", module=MODULE,
                                files=[FileSpec("obs-a/one.dat")])
        assert (ack.status, ack.body["status"]) == (202, "buffered"), ack
        assert "read-only transaction" in ack.body["reason"], ack
        health = only.health()
        assert not health["opsdb"]["reachable"], health
        assert "read-only transaction" in health["opsdb"]["error"], health
        for _ in range(100):  # the drainer's steps, each after the back-off it asks for
            if only.health()["journal"]["pending"] == 0:
                break
            time.sleep(only.service.drain_step())
        again = only.service.file(only.token, observation="obs-a", module=MODULE,
                                  files=[FileSpec("obs-a/two.dat")])
    assert (again.status, again.body["status"]) == (201, "filed"), again
    health = only.health()
    assert (health["journal"]["pending"], health["journal"]["dead"]) == (0, 0), health
    assert health["opsdb"]["reachable"] and health["opsdb"]["error"] is None, health
    told = [r.getMessage() for r in caplog.records]
    [down] = [m for m in told if "unreachable" in m.lower()]
    assert "read-only transaction" in down, told
    assert_opsdb_matches_the_files(pg_opsdb, root, contents, requests=2)
