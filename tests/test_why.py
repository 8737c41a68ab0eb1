"""`ccat-dt why`: a specific reason for each way a package can be stuck."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from ccat_assets.cli import main
from ccat_dt import packages as stage
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.filing import file_directory, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    RawDataPackage,
    utcnow,
)
from ccat_dt.replicas import place, plan_placement
from ccat_dt.topology import prepare_opsdb, primary_location
from tests.helpers import observe


def why(opsdb: OpsDB, config: Config, name: str) -> dict[str, tuple[str, str]]:
    with opsdb.session() as session:
        return {s.stage: (s.state, s.detail) for s in diagnose(session, config, name, utcnow())}


def planned(opsdb: OpsDB, config: Config) -> list[str]:
    with opsdb.session() as session:
        return [p.name for p in stage.plan_packages(session, config)]


def test_an_open_observation_waits_for_filing_to_close(config: Config, opsdb: OpsDB,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = config.resolve_root("sites/ccat/instruments")
    (source / "obs-open").mkdir(parents=True)
    (source / "obs-open" / "a.dat").write_bytes(b"x" * 100)
    start_observation(opsdb, "obs-open")
    file_directory(opsdb, observation="obs-open", module="chai/lfa", directory="obs-open")
    main(["--config", str(config.path), "why", "obs-open"])
    out = capsys.readouterr().out
    assert "filing" in out and "waiting" in out and "still open" in out


def test_a_finished_observation_names_its_packages_and_what_is_not_packaged_yet(
        config: Config, opsdb: OpsDB) -> None:
    observe(config, opsdb, observations=1, files=2)
    with opsdb.session() as session:
        before = [(s.stage, s.state) for s in diagnose(session, config, "obs-0", utcnow())]
    assert before == [("filing", "done"), ("packaging", "waiting")]
    names = planned(opsdb, config)
    stage.build(opsdb, config, names[0])
    with opsdb.session() as session:
        package = session.scalars(select(RawDataPackage).where(
            RawDataPackage.name == names[0])).one()
        package.state = PackageState.ARCHIVED  # as if the lifecycle ended for this one
    with opsdb.session() as session:
        after = diagnose(session, config, "obs-0", utcnow())
    assert len(names) == 2  # one package per instrument module
    assert after[0].stage == "filing" and sorted((s.stage, s.state) for s in after[1:]) == [
        ("package", "done"), ("package", "planned")]
    assert all(f"ccat-dt why {n}" in " ".join(s.detail for s in after) for n in names)
    assert not any(s.stage == "packaging" for s in after)  # every file is in a package


def test_a_built_package_waits_for_its_site_copy_and_the_second_archive_for_the_first(
        config: Config, opsdb: OpsDB) -> None:
    observe(config, opsdb, observations=1, files=1)
    name = planned(opsdb, config)[0]
    stage.build(opsdb, config, name)
    stages = why(opsdb, config, name)
    assert stages["packaging"][0] == "done"
    assert stages["site copy cologne"] == ("waiting", "due; waiting for its run")
    assert stages["site copy us"][0] == "waiting"
    assert "no verified source copy yet" in stages["site copy us"][1]
    for site in ("cologne", "us"):  # each archive after its own site copy, not "due"
        assert stages[f"LTA copy {site}"] == (
            "waiting", f"after the site copy to {site} (archived from that buffer copy)")


def test_a_source_changed_after_filing_fails_packaging_with_the_reason(
        config: Config, opsdb: OpsDB) -> None:
    source = observe(config, opsdb, observations=1, files=1)
    for raw in source.rglob("scan-0.dat"):
        raw.write_bytes(b"changed")
    name = planned(opsdb, config)[0]
    with pytest.raises(stage.PackageBuildFailed):
        stage.build(opsdb, config, name)
    stages = why(opsdb, config, name)
    state, detail = stages["packaging"]
    assert state == "failed" and "scan-0.dat" in detail
    for site in ("cologne", "us"):  # nothing else is due: it all waits for the packaging
        assert stages[f"site copy {site}"] == ("waiting", "after packaging")
        assert stages[f"LTA copy {site}"] == ("waiting", "after packaging")


def test_a_full_destination_disk_is_named(config: Config, opsdb: OpsDB) -> None:
    observe(config, opsdb, observations=1, files=1)
    name = planned(opsdb, config)[0]
    stage.build(opsdb, config, name)
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        buffer = primary_location(session, "cologne", LocationType.BUFFER)
        session.add(Operation(operation_type=OperationType.TRANSFER, package=package,
                              destination_location_id=buffer.id, status=OperationStatus.FAILED,
                              retry_count=2, finished_at=utcnow(), log_path="/logs/x.log",
                              error="rsync: write failed: No space left on device (28)"))
    state, detail = why(opsdb, config, name)["site copy cologne"]
    assert state == "failed"
    assert detail.startswith("destination disk full; attempt 3 failed") and "/logs/x.log" in detail


def test_retention_holds_the_purge_with_the_time_it_ends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = {**EMBEDDED_DEFAULT}
    settings["sites"] = [dict(site) for site in EMBEDDED_DEFAULT["sites"]]  # type: ignore[attr-defined]
    for site in settings["sites"]:  # type: ignore[attr-defined]
        site["locations"] = [{**loc, "retention_hours": 24} for loc in site["locations"]]
    config = load_config(write_default_config(tmp_path / "deploy", overrides=settings))
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    name = planned(opsdb, config)[0]
    stage.build(opsdb, config, name)
    for site in ("cologne", "us"):
        for kind in (LocationType.BUFFER, LocationType.LONG_TERM_ARCHIVE):
            place(opsdb, config, plan_placement(opsdb, config, name, site, kind), kind)
    state, detail = why(opsdb, config, name)["purge"]
    assert state == "waiting" and "retention 24h not reached: deletable after" in detail
    tomorrow = (utcnow() + timedelta(hours=25)).date().isoformat()
    assert tomorrow in detail or (utcnow() + timedelta(hours=24)).date().isoformat() in detail


def test_each_site_shows_its_own_error_and_an_archive_failure_before_any_copy(
        config: Config, opsdb: OpsDB) -> None:
    """A transfer failed towards cologne and an archive attempt failed at us before any LTA
    copy row existed: each row shows its own error, not another site's, and a stage waiting
    for an automatic re-attempt says when."""
    from ccat_dt.opsdb.models import Reattempt

    observe(config, opsdb, observations=1, files=1)
    name = planned(opsdb, config)[0]
    stage.build(opsdb, config, name)
    now = utcnow()
    with opsdb.session() as session:
        package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
        cologne = primary_location(session, "cologne", LocationType.BUFFER)
        us_lta = primary_location(session, "us", LocationType.LONG_TERM_ARCHIVE)
        session.add(Operation(operation_type=OperationType.TRANSFER, package=package,
                              destination_location_id=cologne.id, finished_at=now,
                              status=OperationStatus.FAILED, error="Connection refused"))
        session.add(Operation(operation_type=OperationType.ARCHIVE, package=package,
                              destination_location_id=us_lta.id, finished_at=now,
                              status=OperationStatus.FAILED, error="tape library offline"))
        session.add(Reattempt(stage="site_copy", partition=f"{name}|cologne", package=name,
                              site="cologne", attempts=2, first_failed_at=now,
                              last_failed_at=now,
                              next_attempt_at=now + timedelta(minutes=2)))
    stages = why(opsdb, config, name)
    state, detail = stages["site copy cologne"]
    assert state == "failed" and "Connection refused" in detail
    assert f"next attempt at {now + timedelta(minutes=2):%H:%M:%S} UTC" in detail
    # the attempts counted in one series: the two failed runs, then the next, automatic one
    assert "attempt 2 failed at" in detail and "attempt 3, automatic" in detail
    assert stages["site copy us"][0] == "waiting"  # not cologne's error
    assert "Connection refused" not in stages["site copy us"][1]
    state, detail = stages["LTA copy us"]
    assert state == "failed" and "tape library offline" in detail
    assert "tape library" not in stages["LTA copy cologne"][1]


def test_runs_are_listed_oldest_first_without_failures_a_later_run_fixed(
        config: Config, opsdb: OpsDB, capsys: pytest.CaptureFixture[str]) -> None:
    """Of each piece of work only its newest run explains anything: a site copy that failed
    and then succeeded is not listed, nor a canceled one a later run replaced; what still
    fails is, oldest first."""
    from dagster import AssetKey, DagsterRun, DagsterRunStatus

    from ccat_assets.instance import instance_home, open_instance, write_instance_yaml

    observe(config, opsdb, observations=1, files=1)
    name = planned(opsdb, config)[0]
    write_instance_yaml(config, instance_home(config))
    instance = open_instance(config)

    def add(run_id: str, site: str, status: DagsterRunStatus) -> None:
        instance.add_run(DagsterRun(
            job_name="__ASSET_JOB", run_id=run_id, status=status,
            asset_selection=frozenset({AssetKey("site_copies")}),
            tags={"dagster/partition/package": name, "dagster/partition/site": site,
                  "dagster/run_key": f"{site}-{run_id}"}))

    add("a" * 36, "us", DagsterRunStatus.CANCELED)  # replaced by the next us run
    add("f" * 36, "cologne", DagsterRunStatus.FAILURE)  # fixed by the next run
    add("0" * 36, "cologne", DagsterRunStatus.SUCCESS)
    add("b" * 36, "us", DagsterRunStatus.FAILURE)
    add("1" * 36, "ccat", DagsterRunStatus.FAILURE)  # newer, though its id sorts first
    instance.dispose()
    capsys.readouterr()

    main(["--config", str(config.path), "why", name])

    runs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    assert [line.split()[1] for line in runs] == ["bbbbbbbb", "11111111"]
    assert runs[0].endswith(f"us-{'b' * 36}: FAILURE")


def test_runs_created_after_opsdb_was_read_are_not_listed(
        config: Config, opsdb: OpsDB, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`why` under a working drive reads OpsDB, then (a second or more later) Dagster's runs.
    A run created in between is of work the OpsDB answer has not reached: before, `why` said
    "site copy cologne  waiting  after packaging" and, below it, the site copy's run STARTED.
    Now only runs created before OpsDB was read are listed (the packaging run started then)."""
    from dagster import AssetKey, DagsterRun, DagsterRunStatus

    import ccat_dt.diagnosis as diagnosis
    from ccat_assets.instance import instance_home, open_instance, write_instance_yaml

    observe(config, opsdb, observations=1, files=1)
    name = planned(opsdb, config)[0]
    write_instance_yaml(config, instance_home(config))
    instance = open_instance(config)

    def add(run_id: str, asset: str, status: DagsterRunStatus, **tags: str) -> None:
        instance.add_run(DagsterRun(
            job_name="__ASSET_JOB", run_id=run_id, status=status,
            asset_selection=frozenset({AssetKey(asset)}),
            tags={"dagster/partition/package": name, **tags,
                  "dagster/run_key": f"{asset}-{run_id}"}))

    add("a" * 36, "packages", DagsterRunStatus.STARTED)
    real = diagnosis.diagnose

    def read_then_the_drive_moves_on(*args: object, **kwargs: object) -> object:
        stages = real(*args, **kwargs)  # type: ignore[arg-type]
        add("b" * 36, "site_copies", DagsterRunStatus.STARTED,
            **{"dagster/partition/site": "cologne"})
        return stages

    monkeypatch.setattr(diagnosis, "diagnose", read_then_the_drive_moves_on)
    capsys.readouterr()
    main(["--config", str(config.path), "why", name])
    instance.dispose()

    out = capsys.readouterr().out
    assert "after packaging" in out, out
    runs = [line for line in out.splitlines() if line.startswith("run ")]
    assert [line.split()[1] for line in runs] == ["aaaaaaaa"], out
