"""Every way in at once: processes an operator starts by hand while automation runs, each a
real OS process of its own (`ccat-dt drive`, the UI, `dagster asset materialize`, the daemon
all open the same instance and OpsDB)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.script import ScriptDirectory
from dagster import DagsterInstance, RunsFilter
from dagster._core.storage.runs.sqlite import sqlite_run_storage
from dagster._core.storage.sql import get_alembic_config

from ccat_assets.inflight import IN_FLIGHT
from ccat_assets.instance import write_instance_yaml
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, child_argv, finish, observe, run, spawn

PARTIES = 3  # the drive, the UI, an operator's `dagster asset materialize`


def stamps(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        return sorted(row[0] for row in connection.execute("SELECT version_num FROM "
                                                           "alembic_version"))


# A new deployment (`ccat-dt init` writes the instance's dagster.yaml; its storage files are
# made by the first process that opens it): the cron drive, the UI and an operator's
# materialisation start at once. Dagster makes each SQLite file in two steps, tables then the
# schema stamp; a process in between took the tables for an old instance's and stamped an old
# revision beside the new one (or crashed on "table runs already exists"), after which every
# command failed with "alembic_version has more than one head". The stamp is slowed down here so
# that the processes meet in that window every time.
def test_processes_opening_a_new_instance_at_once_all_start_and_leave_it_whole(
        config: Config, opsdb: OpsDB, tmp_path: Path) -> None:
    home = write_instance_yaml(config, tmp_path / "dagster_home").parent
    racers = [spawn(child_argv(config, "instance", home=str(home), slow_stamp="0.3",
                               barrier=str(tmp_path / "barrier"), parties=PARTIES))
              for _ in range(PARTIES)]
    outcomes = [finish(process, timeout=120) for process in racers]

    assert [o.returncode for o in outcomes] == [0] * PARTIES, \
        [o.stderr[-1500:] for o in outcomes if o.returncode]
    head = ScriptDirectory.from_config(
        get_alembic_config(sqlite_run_storage.__file__)).get_current_head()
    for database in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        assert stamps(home / database) == [head], database

    observe(config, opsdb, files=2, size=5000)  # and the instance works: a whole lifecycle
    with DagsterInstance.from_config(str(home)) as instance:
        assert run(config, instance).failed == []
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
