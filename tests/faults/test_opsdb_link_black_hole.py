"""The network path to a PostgreSQL OpsDB black-holes its packets (no RST, no FIN: a firewall
or NAT forgetting the connection, a VPN or link down, the server's host gone) while a statement
waits for its answer, or while a pooled connection is idle.

The fault is real: the kernel drops every packet of the path's connections, both ways
(tests/faults/blackhole.py; skipped without root and iptables, a failure under
CCAT_REQUIRE_SERVICES=1). Before, the OpsDB engine set no TCP keepalives and no
tcp_user_timeout: a `ccat-dt` command, a drive, a sensor tick or a run waited for ever on a read
that never returned (15 min of retransmissions for a statement not acknowledged; for ever for
an answer), nobody told, and the server kept the cut session's transaction and its row locks
for its own keepalive's 2 h. Now both ends give the path up after PG_LINK_TIMEOUT_S (here
$CCAT_DT_OPSDB_LINK_TIMEOUT_S = 3 s, to keep the test short): the command ends with its one
"OpsDB unavailable" line, the server rolls the session back, and once the path is back the next
operation works, with nobody's help. Each wait here is bounded, so that without the fix the test
fails instead of hanging.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

import ccat_dt.opsdb.database as database
from ccat_dt.config import Config
from ccat_dt.opsdb.database import LINK_TIMEOUT_ENV, OpsDB
from ccat_dt.opsdb.models import CopyStatus, Operation, OperationStatus, PhysicalCopy
from tests.faults.blackhole import BlackHole
from tests.faults.invariants import assert_safe
from tests.faults.moments import outcome_within
from tests.faults.pipeline import REPO, _environment, deployment, observe, package_names, run
from tests.faults.test_deletion_faults import KEEP, _sites, retention
from tests.helpers import run_cli
from tests.services import own_database

LINK_TIMEOUT_S = 3  # the commands' and this process's engines give a silent path up after it
ENDED_WITHIN_S = 40.0  # a cut command must have ended by then (3 s, a reconnection's 10 s
# connect_timeout if one is tried, a loaded machine); without the fix it waits for ever
# The `ccat-dt` command, paused once a deletion's record has been sent (the copy's UPDATE
# executed: its row locked in the server), right before its COMMIT, the server's answers
# acknowledged (TCP_QUICKACK: no delayed ACK left for the cut to catch, which would have the
# server retransmit and learn of the cut once the path is back): the test cuts the path there,
# then lets the COMMIT go into the black hole.
PAUSED_BEFORE_COMMIT = """
import os, re, socket, sys, time
from pathlib import Path
from sqlalchemy import Engine, event
paused, go = Path(sys.argv[1]), Path(sys.argv[2])
recorded = []

def sent(connection, cursor, statement, *args):
    if re.match(r"UPDATE physical_copies SET status=.*deleted_at", statement):
        recorded.append(statement)

def commit(connection):
    if recorded and not paused.exists():
        fd = connection.connection.dbapi_connection.fileno()
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        paused.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

event.listen(Engine, "after_cursor_execute", sent)
event.listen(Engine, "commit", commit)
from ccat_assets.cli import main
main(sys.argv[3:])
"""


@pytest.fixture
def opsdb_database() -> Iterator[str]:
    """A database of this test's own (its sessions are cut; nobody else's)."""
    yield from own_database("ccat_opsdb")


@pytest.fixture(autouse=True)
def short_link_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines made from now on (here and in the commands started) give up after 3 s."""
    monkeypatch.setenv(LINK_TIMEOUT_ENV, str(LINK_TIMEOUT_S))


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.02)


def test_a_purge_whose_opsdb_path_goes_silent_before_its_commit_ends_and_the_next_heals(
        black_hole: BlackHole, opsdb_database: str, instance: DagsterInstance,
        tmp_path: Path) -> None:
    """`ccat-dt purge --package` has unlinked its first file and sent the record of that
    deletion; the path goes silent before the COMMIT. The command ends (exit 2, one line
    naming OpsDB), the deletion stays unrecorded (DELETION_IN_PROGRESS, its certificate
    kept), nothing else is deleted; the server rolls the cut session back (its row locks
    released: before, held 2 h, so the next purge waited for them and failed on
    lock_timeout). Once the path is back, the same command finishes that deletion under its
    certificate, and the rest."""
    config = deployment(tmp_path / "deploy", opsdb_url=black_hole.url(opsdb_database),
                        sites=_sites(KEEP))
    truth = OpsDB(opsdb_database)  # the test's own reads: the server's port, never cut
    files = observe(config, truth)
    run(config, instance)
    [package] = package_names(truth)
    assert all(path.is_file() for path in files)  # archived, kept for retention
    config = retention(config, 0)
    before = _stored(config)
    paused, go = tmp_path / "paused", tmp_path / "go"
    purge = subprocess.Popen(
        [sys.executable, "-c", PAUSED_BEFORE_COMMIT, str(paused), str(go),
         "--config", str(config.path), "purge", "--package", package],
        cwd=REPO, env=_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        _until(lambda: paused.exists() or purge.poll() is not None, "the purge's record")
        assert paused.exists(), purge.communicate()
        black_hole.cut()
        go.touch()
        try:
            _out, err = purge.communicate(timeout=ENDED_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`ccat-dt purge` still waiting on OpsDB {ENDED_WITHIN_S:g} s after "
                        "its path went silent")
    finally:
        if purge.poll() is None:
            purge.kill()
            purge.communicate()
    black_hole.mend()

    line = err.strip().splitlines()[-1]
    assert purge.returncode == 2, err
    assert line.startswith("ccat-dt: error: OpsDB unavailable: "), line
    with truth.session() as session:  # the record never arrived: the copy's deletion stands
        cut = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETION_IN_PROGRESS)).all()
        deleted = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETED)).all()
        assert len(cut) == 1 and deleted == [], ([c.id for c in cut], [c.id for c in deleted])
    # the storage: the one file unlinked before its record is gone, nothing else changed
    assert len(before - _stored(config)) == 1 and _stored(config) <= before, \
        (before - _stored(config), _stored(config) - before)
    assert_safe(config, truth, settled=False)  # every byte kept, that deletion certified

    # The server let the cut session go (rolled back, its row lock released), then the next
    # purge, on the path that is back, finishes the deletion and the rest.
    _until(lambda: _sessions_of(truth, opsdb_database) == [],
           "the server ended the cut session", timeout_s=ENDED_WITHIN_S)
    assert run_cli("--config", str(config.path), "purge", "--package", package) == 0
    assert [path for path in files if path.exists()] == []  # the storage: all purged
    with truth.session() as session:
        assert session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETION_IN_PROGRESS)).all() == []
        assert session.scalars(select(Operation).where(
            Operation.status == OperationStatus.IN_PROGRESS)).all() == []
    assert_safe(config, truth)
    truth.dispose()


def _stored(config: Config) -> set[Path]:
    """Every file at every location of the deployment (the storage, not OpsDB)."""
    return {path for path in config.resolve_root("sites").rglob("*") if path.is_file()}


def _sessions_of(truth: OpsDB, url: str) -> list[str]:
    """The other sessions in the OpsDB's database that are inside a transaction."""
    with truth.session() as session:
        return list(session.scalars(text(
            "SELECT state FROM pg_stat_activity WHERE datname = :name "
            "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"),
            {"name": make_url(url).database}))


def test_a_pooled_connection_whose_path_went_silent_fails_then_heals(
        black_hole: BlackHole, opsdb_database: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection idle in the pool when the path goes silent: the next statement fails
    within the bound (the pool's ping, then a new connection, both given up), an OpsDB
    error; once the path is back the same OpsDB handle works again with nobody's help."""
    monkeypatch.setattr(database, "PG_CONNECT_TIMEOUT_S", 2)  # the reconnection's wait
    config = deployment(tmp_path / "deploy", opsdb_url=black_hole.url(opsdb_database))
    opsdb = OpsDB(config.opsdb_url)
    with opsdb.session() as session:  # a connection made, now idle in the pool
        assert session.scalar(text("SELECT 1")) == 1
    black_hole.cut()
    def query() -> int | None:
        with opsdb.session() as session:
            return session.scalar(text("SELECT 1"))

    failed = outcome_within(query, "a statement on a silent path", ENDED_WITHIN_S)
    assert isinstance(failed, OperationalError), failed

    black_hole.mend()
    with opsdb.session() as session:  # healed: a new connection on the path that is back
        assert session.scalar(text("SELECT 1")) == 1
    opsdb.dispose()
