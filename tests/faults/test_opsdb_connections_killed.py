"""The PostgreSQL OpsDB drops its connections mid-lifecycle (a server restart, a failover, an
admin or pgbouncer terminating backends), at the worst moments: a package's build about to be
recorded, a transfer's landed copy, a deletion between its unlink and its record, a sensor's
query in the drive itself, the drive's last ticks; and the database refusing new connections
for seconds after. Each run executes in a process forked from the drive, which inherited the
drive's engine (and its pooled connections, killed too).

The fault is real: every backend of the test's own OpsDB database is terminated by the
server, in the middle of that transaction (the trigger is the statement about to be sent).
"""

from __future__ import annotations

import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, Operation, OperationStatus, OperationType
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, observe, run
from tests.helpers import run_cli
from tests.services import POSTGRES_URL, own_database

REFUSE_S = 4.0  # how long the restarted server refuses new connections


@pytest.fixture
def opsdb_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own (its backends are terminated; nobody else's)."""
    yield from own_database("ccat_opsdb")


def _server(database: str, *, refuse: bool | None) -> None:
    """As the server's administrator: `refuse` new connections to `database` (or allow them
    again); with refuse not False, every backend of `database` is terminated (and waited for)."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            if refuse is not None:
                connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS '
                                        f'{"false" if refuse else "true"}'))
            if refuse is not False:
                connection.execute(text(
                    "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": database})
    finally:
        admin.dispose()


@dataclass
class Kill:
    """Every backend of the OpsDB terminated once, when a statement matching `statement` (and
    `when`, given its parameters) is about to be sent by any process of the test (the forked
    runs inherit the hook); the server then refuses connections for `refuse_s`."""

    database: str
    marker: Path  # claimed by the one process that kills (once across forked processes)
    statement: str
    when: Callable[[dict[str, Any]], bool] = lambda _: True
    refuse_s: float = 0.0

    @property
    def done(self) -> bool:
        """The backends are gone (and the database refuses connections, if it is to)."""
        return self.marker.with_suffix(".done").exists()

    def hook(self, connection: Any, _cursor: Any, statement: str, parameters: Any,
             _context: Any, _many: bool) -> None:
        if (connection.engine.url.database != self.database or self.marker.exists()
                or not re.search(self.statement, statement)
                or not self.when(parameters if isinstance(parameters, dict) else {})):
            return
        try:  # the first process to get here kills; any other goes on
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()}\n{''.join(traceback.format_stack())}".encode())
        os.close(fd)
        _server(self.database, refuse=True if self.refuse_s else None)
        self.marker.with_suffix(".done").touch()

    def reopen_later(self, stop: threading.Event) -> threading.Thread:
        """In the test's own process: the server accepts connections again `refuse_s` after
        the kill (a forked run may not live that long)."""
        def reopen() -> None:
            while not self.done:
                if stop.wait(0.01):
                    return
            time.sleep(self.refuse_s)
            _server(self.database, refuse=False)
        thread = threading.Thread(target=reopen, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def pg_deployment(tmp_path: Path, opsdb_database: str
                  ) -> Iterator[tuple[Config, OpsDB, list[Path]]]:
    """The faults' embedded default with its OpsDB in `opsdb_database`, one observation
    filed (its source files)."""
    config = deployment(tmp_path / "deploy", opsdb_url=opsdb_database,
                        policies={"max_attempts": 3, "retry_backoff_first_s": 0.2})
    opsdb = OpsDB(config.opsdb_url)
    sources = observe(config, opsdb)
    yield config, opsdb, sources
    opsdb.dispose()


def _location_id(opsdb: OpsDB, label: str) -> int:
    with opsdb.session() as session:
        return next(loc.id for loc in session.scalars(select(DataLocation))
                    if loc.label == label)


@dataclass(frozen=True)
class Scene:
    """What a moment's trigger looks at: location ids, the observation's source files, the
    observatory buffer."""

    ids: dict[str, int]
    sources: list[Path]
    buffer: Path


def _in_sensor(module: str = "") -> bool:
    return any(f"/sensors/{module}" in frame.filename for frame in traceback.extract_stack())


# (statement about to be sent, which one) per moment
MOMENTS: dict[str, tuple[str, Callable[[dict[str, Any], Scene], bool]]] = {
    # the tar is built and read back; its record (package checksum, manifest) is being written
    "packaging recorded": (r"^UPDATE raw_data_packages SET state=.*checksum", lambda p, s: True),
    # Cologne's buffer copy landed, verified and renamed; its copy row is being inserted
    "transfer recorded": (r"^INSERT INTO physical_copies",
                          lambda p, s: p.get("location_id") == s.ids["cologne/buffer"]),
    # a file unlinked under its certificate; the deletion is being recorded
    "deletion recorded": (r"^UPDATE physical_copies SET status=.*deleted_at",
                          lambda p, s: True),
    # a sensor's query in the drive's own process, once the package is built (its cursor set)
    "sensor tick": (r"^SELECT", lambda p, s: _in_sensor()
                    and any(s.buffer.rglob("*.tar"))),
    # the overview sensor's query once the sources are purged: the drive's last tick
    # (the periodic sensors are ticked once per their interval, and again as it ends)
    "last tick": (r"^SELECT", lambda p, s: not any(path.exists() for path in s.sources)
                  and _in_sensor("overview.py")),
}


@pytest.mark.parametrize(("moment", "refuse_s"), [
    ("packaging recorded", 0.0),
    ("transfer recorded", REFUSE_S),  # refused past the step's first retry (2 s)
    ("deletion recorded", 0.0),
    ("sensor tick", 0.0),
    ("last tick", REFUSE_S),  # the other periodic sensors' last ticks refused too
])
def test_opsdb_connections_killed_converge_with_nobody_s_retry(
        moment: str, refuse_s: float, pg_deployment: tuple[Config, OpsDB, list[Path]],
        instance: DagsterInstance, tmp_path: Path) -> None:
    """One drive converges: every package archived everywhere, nothing deleted without its
    verified copies (read on the storage), no copy made twice, no run left in flight, and no
    run or sensor failed: `drive` exit 0. Before, a blip in the drive's last ticks ended it
    with the sensor "still failing" (1), and a cut deletion failed its purge run (not retried
    within its run; a new run finished it)."""
    config, opsdb, sources = pg_deployment
    scene = Scene({"cologne/buffer": _location_id(opsdb, "cologne/buffer")}, sources,
                  config.resolve_root("sites/ccat/buffer"))
    statement, which = MOMENTS[moment]
    kill = Kill(make_url(config.opsdb_url).database or "", tmp_path / "killed", statement,
                lambda parameters: which(parameters, scene), refuse_s)
    stop = threading.Event()
    reopened = kill.reopen_later(stop)
    event.listen(Engine, "before_cursor_execute", kill.hook)
    try:
        report = run(config, instance, wait_s=30)
    finally:
        event.remove(Engine, "before_cursor_execute", kill.hook)
        stop.set()
        reopened.join(timeout=30)
    assert kill.done, "the fault was never injected"
    killer = int(kill.marker.read_text().split()[0])
    # a run's step in a process forked from the drive; a sensor in the drive itself
    assert (killer == os.getpid()) == moment.endswith("tick"), (moment, killer)

    if refuse_s:  # healed within the run's retries (2 s, then 6 s), or, refused longer on
        # a loaded machine, by the run's automatic re-attempt
        assert not report.failed or any(k.startswith("reattempt:") for k in report.launched)
    else:  # healed within the runs: no failed run to explain
        assert report.failed == [], report
    assert report.sensor_failures == {}, report.sensor_failures
    assert not instance.get_runs(RunsFilter(statuses=[
        DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.QUEUED]))
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    with opsdb.session() as session:  # each copy made once: no second transfer of a package
        done = session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.TRANSFER,
            Operation.status == OperationStatus.COMPLETED)).all()
        targets = [(op.package_id, op.destination_location_id) for op in done]
        assert len(targets) == len(set(targets)), targets
        errors = [op.error or "" for op in session.scalars(select(Operation))]
    assert not [e for e in errors if "read-only" in e or "read only" in e], errors


def test_an_opsdb_that_takes_only_reads_is_named_a_standby_not_a_read_only_file(
        tmp_path: Path, opsdb_database: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """After a failover the URL can lead to a server that takes only reads (the old primary
    back as a standby, a pgbouncer pointing at a replica): the command's one line says so and
    sends the operator to opsdb_url, not to a file's permissions and mount. Here the
    database's sessions are read-only (default_transaction_read_only), as on a standby."""
    config = deployment(tmp_path / "deploy", opsdb_url=opsdb_database)
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'ALTER DATABASE "{make_url(opsdb_database).database}" '
                                "SET default_transaction_read_only = on"))
    admin.dispose()
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    capsys.readouterr()

    status = run_cli("observation", "start", "obs-9")

    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2, line
    assert "read-only transaction" in line and "standby" in line and "opsdb_url" in line, line
    assert "mount" not in line and "file" not in line, line
