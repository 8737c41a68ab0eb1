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

import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.filing import (
    FileSpec,
    FilingError,
    Hook,
    Source,
    check_files,
    file_directory,
    file_raw_files,
    finish_observation,
    record_checked,
    start_observation,
)
from ccat_dt.opsdb.database import LOCK_TIMEOUT_ENV, OpsDB
from ccat_dt.opsdb.models import ExecutedObsUnit, ObservationStatus, RawDataFile
from ccat_dt.packages import build, plan_new_packages
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


# `observation start` of one name twice at once: one observation, both told its uuid.
def test_two_starts_of_one_name_at_once_open_one_observation(
        db: OpsDB, monkeypatch: pytest.MonkeyPatch) -> None:
    result = race(db, lambda hook: start_observation(db, OBS, hook=hook),
                  lambda other: start_observation(other, OBS), monkeypatch)
    assert result.first.error is None and result.second.error is None, (result.first,
                                                                        result.second)
    assert result.first.value == result.second.value == observation(db).uuid
    assert result.waited
