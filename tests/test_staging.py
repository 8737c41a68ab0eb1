"""Staging round trip: request -> files at PROCESSING identical to the originals -> release ->
files gone, LTA untouched."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import AssetCheckEvaluation, AssetCheckKey, AssetKey, DagsterInstance
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from ccat_assets.cli import main
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.status import print_status
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.packages import plan_packages
from ccat_dt.staging import Selection, StagingError, release, request_staging
from ccat_dt.storage import files_under
from tests.helpers import observe, rehashes_before_unlink


def originals(config: Config, tmp_path: Path) -> dict[str, bytes]:
    """Raw files as written, kept aside before the purge deletes them at the source."""
    source = config.resolve_root("sites/ccat/instruments")
    return {str(p.relative_to(source)): p.read_bytes() for p in files_under(source)}


def test_staging_round_trip(config: Config, opsdb: OpsDB, instance: DagsterInstance,  # noqa: F811
                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    observe(config, opsdb, observations=1, files=2)
    written = originals(config, tmp_path)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    lta = config.resolve_root("sites/cologne/lta")
    lta_before = {p: hash_file(p)[0] for p in files_under(lta)}

    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0", module="chai/lfa"),
                           expires_in=timedelta(hours=1), requested_by="a scientist")
    assert drive(defs, instance).failed == []

    staged_root = config.resolve_root("sites/ramses/processing") / name
    staged = {str(p.relative_to(staged_root)): p.read_bytes()
              for p in files_under(staged_root)}
    expected = {path: data for path, data in written.items() if path.startswith("obs-0/chai/lfa")}
    assert len(expected) == 2
    assert {path.split("/", 1)[1]: data for path, data in staged.items()} == expected
    assert not any(p.suffix == ".tar" for p in staged_root.rglob("*"))  # the tar is not kept
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(AssetKey("staged_copies"), "staged_files_verified"), limit=5)
    assert [r.status for r in history] == [AssetCheckExecutionRecordStatus.SUCCEEDED]

    assert drive(defs, instance).launched == []  # active request: the purge keeps the files
    assert staged_root.exists()
    capsys.readouterr()
    print_status(opsdb, config)  # `ccat-dt status`: the staged files are present there
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("ramses/processing"))
    assert row.split()[1:3] == ["processing", "2"]

    assert release(opsdb, name) == "active"
    assert release(opsdb, name) == "released"  # twice: nothing changes
    assert drive(defs, instance).failed == []
    assert not staged_root.exists()
    assert {p: hash_file(p)[0] for p in files_under(lta)} == lta_before


def test_a_request_released_before_its_run_stages_nothing_and_fails_nothing(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:  # noqa: F811
    """A scientist changes their mind at once: the staging run that comes after the release
    succeeds with nothing to stage (not a red run, a failed drive and a re-attempt), its
    check passes saying why, and nothing lands at the processing location."""
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0"),
                           expires_in=timedelta(hours=1))
    assert release(opsdb, name) == "active"

    report = drive(defs, instance)

    assert report.failed == [] and any(key.startswith("stage:") for key in report.launched)
    assert files_under(config.resolve_root("sites/ramses/processing")) == []
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(AssetKey("staged_copies"), "staged_files_verified"), limit=5)
    assert [r.status for r in history] == [AssetCheckExecutionRecordStatus.SUCCEEDED]
    event = history[0].event
    evaluation = event.dagster_event.event_specific_data if event and event.dagster_event \
        else None
    assert isinstance(evaluation, AssetCheckEvaluation)
    assert "is released" in (evaluation.description or "")


def test_staging_refuses_what_is_not_archived(config: Config, opsdb: OpsDB) -> None:
    observe(config, opsdb, observations=1, files=1)
    # said as the operator gave it, with where to look
    with pytest.raises(StagingError, match=r"^no package matches observation 'obs-0', module "
                       r"'chai/lfa'; `ccat-dt status`"):
        request_staging(opsdb, location="ramses/processing",
                        selection=Selection(observation="obs-0", module="chai/lfa"),
                        expires_in=timedelta(hours=1))
    with pytest.raises(StagingError, match=r"^expiry must be in the future and at most 87600 h "
                       r"\(ten years\), got -5 h$"):
        request_staging(opsdb, location="ramses/processing",
                        selection=Selection(observation="obs-0"), expires_in=timedelta(hours=-5))
    with opsdb.session() as session:
        plan_packages(session, config)  # packages exist, but nothing is archived yet
    with pytest.raises(StagingError, match="not archived yet"):
        request_staging(opsdb, location="ramses/processing",
                        selection=Selection(observation="obs-0"), expires_in=timedelta(hours=1))
    with pytest.raises(StagingError, match="unknown package"):
        request_staging(opsdb, location="ramses/processing",
                        selection=Selection(packages=("nope",)), expires_in=timedelta(hours=1))


def test_stage_command_rejects_a_non_processing_location(config: Config,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    os.environ.pop("CCAT_DT_CONFIG", None)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config.path), "stage", "--location", "cologne/lta",
              "--observation", "obs-0"])
    assert exit_.value.code == 2
    assert "staging targets a processing location" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["stage", "--location", "ramses/processing", "--observation", ""],
    ["stage", "--location", "ramses/processing", "--module", " "],
    ["stage", "--location", "ramses/processing", "--package", ""],
    ["purge", "--package", ""],
])
def test_an_empty_value_is_refused_not_read_as_everything(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,  # noqa: F811
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """A script's unset variable (`ccat-dt stage --observation "$OBS"`): before, an empty
    selection was no selection, and every archived package was staged (a request over the
    whole archive, unpacked by the next drive); `purge --package ""` ran the purge of every
    package. Now exit 2, and nothing is written or deleted anywhere, then or by the drive."""
    observe(config, opsdb, observations=2, files=1)
    assert drive(build_definitions(config), instance).failed == []
    before = {p: p.stat().st_mtime_ns for p in files_under(config.resolve_root("sites"))}
    os.environ.pop("CCAT_DT_CONFIG", None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config.path), *argv])
    assert exit_.value.code == 2
    assert "empty: give a value, or leave the option out" in capsys.readouterr().err
    assert drive(build_definitions(config), instance).failed == []  # nothing asked for
    assert {p: p.stat().st_mtime_ns for p in files_under(config.resolve_root("sites"))} == \
        before


def test_released_staged_files_go_unread_and_a_changed_one_is_kept(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a release the purge deletes the staged files it made, knowing them by the
    identity recorded at staging (no second read of the data); a file whose bytes changed
    since (same size: a processing job wrote into it) holds bytes no archive has: kept."""

    observe(config, opsdb, observations=1, files=2)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0", module="chai/lfa"),
                           expires_in=timedelta(hours=1), requested_by="a scientist")
    assert drive(defs, instance).failed == []
    staged_root = config.resolve_root("sites/ramses/processing") / name
    untouched, changed = sorted(files_under(staged_root))
    new = os.urandom(changed.stat().st_size)
    changed.write_bytes(new)
    reads = rehashes_before_unlink(monkeypatch)

    release(opsdb, name)
    drive(defs, instance, in_process=True)  # in this process: the reads are counted here

    assert not untouched.exists() and changed.read_bytes() == new  # the storage
    assert [Path(r).name for r in reads] == [changed.name]  # only the changed one re-read
