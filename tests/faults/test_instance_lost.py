"""The Dagster instance (DATA_ROOT/dagster_home: runs, events, sensor cursors, run keys,
materializations) lost or rolled back while OpsDB and the storage moved on: deleted and made
anew by `ccat-dt init` in the middle of a lifecycle, or restored from a copy taken while a
package travelled. The next drives converge from what OpsDB and the storage say: every package
archived everywhere, nothing packaged or sent twice, no archive tar touched, the runs the old
copy holds as in flight closed, and the UI restating what OpsDB holds verified."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, RunsFilter
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.inflight import IN_FLIGHT
from ccat_assets.integrity import copy_check_of
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType, Operation, OperationStatus, OperationType
from ccat_dt.recorded import verified_placements
from ccat_dt.transports import local
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, observe, package_names, package_state
from tests.helpers import first_caller, new_instance_home
from tests.test_operator_actions import check_status

Files = dict[Path, tuple[int, int]]  # path -> (inode, mtime_ns)


def archived_files(config: Config) -> Files:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (config.path.parent / "sites").rglob("*.tar") if "lta" in p.parts}


def work_done(opsdb: OpsDB) -> Counter[tuple[str, int | None, int | None]]:
    """Completed packagings and transfers, per package and destination."""
    with opsdb.session() as session:
        return Counter((o.operation_type.value, o.package_id, o.destination_location_id)
                       for o in session.scalars(select(Operation).where(
                           Operation.operation_type.in_([OperationType.PACKAGING,
                                                         OperationType.TRANSFER]),
                           Operation.status == OperationStatus.COMPLETED)))


def elsewhere(action: Callable[[], None]) -> None:
    """`action` in a forked process that then exits: the drives a cron job ran before the
    instance was lost, their processes long gone."""
    process = multiprocessing.get_context("fork").Process(target=action)
    process.start()
    process.join()
    assert process.exitcode == 0


def driven(config: Config, home: Path, max_rounds: int = 10_000,
           in_process: bool = False) -> Callable[[], None]:
    def action() -> None:
        with DagsterInstance.from_config(str(home)) as instance:
            assert drive(build_definitions(config), instance, max_rounds=max_rounds,
                         in_process=in_process).failed == []
    return action


def snapshot(home: Path, to: Path) -> None:
    """A backup of the instance's directory, each SQLite file copied consistently."""
    for path in sorted(home.rglob("*")):
        target = to / path.relative_to(home)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".db":
            with sqlite3.connect(path) as live, sqlite3.connect(target) as copy:
                live.backup(copy)
        elif path.is_file() and not path.name.endswith(("-wal", "-shm")):
            shutil.copy2(path, target)


def converges(config: Config, home: Path, monkeypatch: pytest.MonkeyPatch,
              before: Files, done: Counter[tuple[str, int | None, int | None]]) -> None:
    """Drives on the instance now at `home` until idle: no run fails, every package archived
    everywhere, no archive tar rewritten, nothing packaged or sent twice, no run left in
    flight, and the UI shows the LTA copies OpsDB holds verified, their checks passed."""
    import sensors.integrity

    monkeypatch.setattr(sensors.integrity, "RESTATE_EVERY_S", 0.0)
    opsdb = OpsDB(config.opsdb_url)
    with DagsterInstance.from_config(str(home)) as instance:
        for _ in range(2):  # the restatement rounds after the work
            assert drive(build_definitions(config), instance, wait_s=10).failed == []
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
        with opsdb.session() as session:
            lta = {copy_check_of(package, site, kind, False)[2]
                   for package, site, kind in verified_placements(session)
                   if kind == LocationType.LONG_TERM_ARCHIVE}
        assert instance.get_materialized_partitions(AssetKey("lta_copies")) == lta
        status = check_status(instance, "lta_copies", "lta_copy_checksum")
        assert {key: status.get(key) for key in lta} == dict.fromkeys(lta, "passed")
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    now = archived_files(config)
    assert {p: now[p] for p in before} == before
    assert len(now) == 2 * len(package_names(opsdb))
    again = work_done(opsdb)
    assert {key: n for key, n in again.items() if n > 1} == {}
    assert {key: again[key] for key in done} == done


def test_an_instance_restored_from_an_older_copy_then_lost_and_made_anew(
        config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(1) The instance is copied while obs-1's first transfer lands (its run STARTED in the
    copy); obs-1 and obs-2 then go all the way, and the copy is put back: cursors and run
    keys behind, a run in flight whose process is long gone, no materialization of what was
    done since. (2) Later, obs-3 archived at one site only and obs-4 filed, not yet planned,
    dagster_home is deleted and made anew (`ccat-dt init`): every cursor at the start, no run
    key used, no partition, no materialization. Each time the drives converge."""
    home = new_instance_home(tmp_path / "dagster_home")
    backup = tmp_path / "backup"
    opsdb = OpsDB(config.opsdb_url)
    real = local.LocalTransport._landed

    def landed(self: local.LocalTransport, temporary: Path) -> None:
        if first_caller(config.directory / "backed-up"):
            snapshot(home, backup)
        real(self, temporary)

    observe(config, opsdb, name="obs-0")
    elsewhere(driven(config, home))
    observe(config, opsdb, name="obs-1")
    monkeypatch.setattr(local.LocalTransport, "_landed", landed)
    elsewhere(driven(config, home))
    monkeypatch.setattr(local.LocalTransport, "_landed", real)
    observe(config, opsdb, name="obs-2")
    elsewhere(driven(config, home))
    shutil.rmtree(home)
    shutil.copytree(backup, home)
    with DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_runs(RunsFilter(statuses=IN_FLIGHT))) == 1

    converges(config, home, monkeypatch, archived_files(config), work_done(opsdb))

    observe(config, opsdb, name="obs-3")
    # One round, each run executed as it is asked for: built, then sent to and archived at
    # its primary site only (the secondary is fed from there, a round later). Two rounds with
    # the runs in child processes raced: a packaging run ended before the copy sensor's first
    # tick, and the primary's copy before its second, had it archived at both sites.
    elsewhere(driven(config, home, max_rounds=1, in_process=True))
    observe(config, opsdb, name="obs-4")
    assert [package_state(opsdb, n).value for n in package_names(opsdb)][-1] == "transferring"
    shutil.rmtree(home)
    new_instance_home(home)

    converges(config, home, monkeypatch, archived_files(config), work_done(opsdb))
