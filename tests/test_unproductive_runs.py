"""Work OpsDB keeps showing as due although its runs succeed: the re-attempt sensor's sweep
asks for it again (an OpsDB restored from a backup needs that), but runs that succeed and
leave it undone mean OpsDB and the runs disagree. Asking forever would hide it: a person is
told, and no more runs are asked for until an operator's retry."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

import ccat_dt.retry
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import utcnow
from ccat_dt.retry import Stalled
from ccat_dt.stages import Stage
from tests.faults.pipeline import deployment, package_names
from tests.helpers import observe
from tests.test_stopped_sensors import dagster_cli

QUIET = 0.5  # s: policies.unattended_after_s


def test_runs_the_sweep_asks_for_that_do_nothing_are_told_and_not_asked_again(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    config: Config = deployment(tmp_path / "deploy", policies={"unattended_after_s": QUIET})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    dagster_cli(config, instance, "sensor", "stop", "site_copy_sensor")  # built, held there
    drive(build_definitions(config), instance)
    package = package_names(opsdb)[0]
    real = ccat_dt.retry.stalled_in

    def packaging_always_due(*args: object, **kwargs: object) -> list[Stalled]:
        # OpsDB's view of due work (the re-attempt sensor's, the notices') disagrees with what
        # a packaging run does (it finds the package built, and succeeds): the disagreement a
        # person has to look at.
        return [*real(*args, **kwargs),  # type: ignore[arg-type]
                Stalled(Stage.PACKAGING, package, "", "not built yet")]

    monkeypatch.setattr(ccat_dt.retry, "stalled_in", packaging_always_due)
    swept: list[str] = []
    for _ in range(5):
        time.sleep(2 * QUIET)
        report = drive(build_definitions(config), instance, wait_s=1)
        assert report.failed == []
        swept += [key for key in report.launched if key.startswith("reattempt:packaging")]

    assert len(swept) == 2  # asked twice, each run succeeded and left it "due": no more
    with opsdb.session() as session:
        [problem] = [p for p in current_problems(session, config, utcnow())
                     if p.kind == "escalated"]
    assert problem.key == f"escalated:packaging:{package}"
    assert "2 runs asked for again" in problem.detail
    assert "succeeded and left it undone (not built yet)" in problem.detail
