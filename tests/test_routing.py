"""A run launched without the sensors' tags (the UI's "Materialize", a backfill, `dagster
asset materialize`) is routed like a sensor's run: its `ccat/link` tag (the per-link run
limit) and its site queue."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    BetaWarning,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    JobDefinition,
    PreviewWarning,
    RunRequest,
    SensorDefinition,
    execute_job,
)
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.remote_origin import (
    InProcessCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.storage.tags import (
    MULTIDIMENSIONAL_PARTITION_PREFIX,
    PARENT_RUN_ID_TAG,
    PARTITION_NAME_TAG,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from ccat_assets.definitions import build_definitions
from ccat_assets.instance import write_instance_yaml
from ccat_assets.partitions import package_site_key
from ccat_assets.routing import RoutedRunCoordinator, routing_tags, stages_of
from ccat_assets.stages import JOBS
from ccat_assets.tags import AGAIN_TAG, LINK_TAG, QUEUE_TAG, RETRY_TAG
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.packages import plan_packages
from ccat_dt.queues import packaging_queue, transfer_queue
from ccat_dt.stages import Stage
from tests.browser import REPO
from tests.helpers import observe
from tests.test_operator_actions import by_hand

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)


def partition_tags(package: str, site: str) -> dict[str, str]:
    """What Dagster puts on a run of one package x site partition."""
    return {PARTITION_NAME_TAG: str(package_site_key(package, site)),
            f"{MULTIDIMENSIONAL_PARTITION_PREFIX}package": package,
            f"{MULTIDIMENSIONAL_PARTITION_PREFIX}site": site}


def ui_origin(job: str) -> RemoteJobOrigin:
    """Where the webserver says a run's job comes from (queued runs need one)."""
    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(
        module_name="ccat_assets.definitions", attribute="defs", working_directory=str(REPO)))
    return RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job)


def test_runs_launched_without_sensor_tags_get_their_link_and_site_queue(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    observe(config, opsdb, observations=1, files=1)
    with opsdb.session() as session:
        planned = plan_packages(session, config)
        package, site = planned[0].name, planned[0].primary_site.short_name
    home = tmp_path / "dagster_home"
    write_instance_yaml(config, home)  # what `ccat-dt init` writes: the run coordinator too
    defs = build_definitions(config)
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("packages", [p.name for p in planned])
        assert by_hand(defs, instance, "packages", package)  # built at the observatory
        link, queue = f"ccat->{site}", transfer_queue(config, site)

        # The UI (and a backfill) create the run and submit it to the instance's coordinator.
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, RoutedRunCoordinator)
        limits = instance.get_concurrency_config().run_queue_config
        assert limits is not None and {"key": LINK_TAG, "value": link, "limit": 2} in [
            dict(limit) for limit in limits.tag_concurrency_limits]
        job = defs.resolve_implicit_global_asset_job_def()
        run = instance.create_run_for_job(job, tags=partition_tags(package, site),
                                          asset_selection=frozenset({AssetKey("site_copies")}),
                                          remote_job_origin=ui_origin(job.name))
        queued = coordinator.submit_run(SubmitRunContext(run, workspace=None))  # type: ignore[arg-type]
        assert queued.status == DagsterRunStatus.QUEUED
        assert queued.tags[LINK_TAG] == link and queued.tags[QUEUE_TAG] == queue

        # `dagster asset materialize` executes the run directly: the executor tags it.
        recon = ReconstructableRepository.for_module(
            "ccat_assets.definitions", "defs").get_reconstructable_job(job.name)
        with execute_job(recon, instance, tags=partition_tags(package, site),
                         asset_selection=[AssetKey("site_copies")]) as result:
            assert result.success
            tags = instance.get_run_by_id(result.run_id).tags  # type: ignore[union-attr]
        assert tags[LINK_TAG] == link and tags[QUEUE_TAG] == queue

        # A sensor's run keeps its own tags.
        sensor_run = instance.create_run_for_job(
            job, tags={**partition_tags(package, site), LINK_TAG: "x->y", QUEUE_TAG: "q"},
            asset_selection=frozenset({AssetKey("site_copies")}),
            remote_job_origin=ui_origin(job.name))
        kept = coordinator.submit_run(SubmitRunContext(sensor_run, workspace=None))  # type: ignore[arg-type]
        assert kept.tags[LINK_TAG] == "x->y" and kept.tags[QUEUE_TAG] == "q"

        # Re-executions (the UI's Re-execute copies every tag of the parent, routed and asked
        # for then): routed afresh for where OpsDB says the data is now, no provenance kept.
        # At `site` the copy is made now (by the run above): nothing to transfer, no link.
        instance.add_run_tags(kept.run_id, {AGAIN_TAG: "1", RETRY_TAG: "lost at us"})
        assert re_executed(instance, job, coordinator, kept.run_id)[LINK_TAG] == ""
        # A copy to another archive routed from the observatory, re-executed after `site`
        # archived the package: it is fed from there now.
        other = next(s.short_name for s in config.settings.archive_sites
                     if s.short_name != site)
        parent = instance.create_run_for_job(
            job, tags={**partition_tags(package, other), LINK_TAG: f"ccat->{other}",
                       QUEUE_TAG: "q"},
            asset_selection=frozenset({AssetKey("site_copies")}),
            remote_job_origin=ui_origin(job.name))
        instance.add_run_tags(parent.run_id, {AGAIN_TAG: "1", RETRY_TAG: "lost"})
        assert by_hand(defs, instance, "lta_copies", str(package_site_key(package, site)))
        tags = re_executed(instance, job, coordinator, parent.run_id)
        assert tags[LINK_TAG] == f"{site}->{other}", tags
        assert tags[QUEUE_TAG] == transfer_queue(config, other), tags


def test_a_check_only_run_is_routed_to_the_site_whose_copy_its_checks_read(
        config: Config, opsdb: OpsDB) -> None:
    """The Checks tab's "Execute" on one partition: a run of the asset job with the checks and
    no asset selected. Before, it had no stage (neither asset nor job named one): no site queue,
    and under Celery its step went to the default queue, which no worker serves."""
    observe(config, opsdb, observations=1, files=1)
    with opsdb.session() as session:
        planned = plan_packages(session, config)
        package, site = planned[0].name, planned[0].primary_site.short_name
    for job, asset, check, tags, stage, queue in (
            ("__ASSET_JOB", "site_copies", "site_copy_checksum", partition_tags(package, site),
             Stage.SITE_COPY, transfer_queue(config, site)),
            ("__ASSET_JOB", "packages", "package_checksum", {PARTITION_NAME_TAG: package},
             Stage.PACKAGING, packaging_queue(config)),
            # the integrity sensor's recheck (sensors/integrity.py _rechecks): the stage's job
            (JOBS[Stage.SITE_COPY].name, "site_copies", "site_copy_checksum",
             partition_tags(package, site), Stage.SITE_COPY, transfer_queue(config, site))):
        run = DagsterRun(job_name=job, asset_selection=frozenset(), tags=tags,
                         asset_check_selection=frozenset({AssetCheckKey(AssetKey(asset), check)}))
        assert stages_of(run) == (stage,)
        assert routing_tags(config, run)[QUEUE_TAG] == queue


def re_executed(instance: DagsterInstance, job: JobDefinition,
                coordinator: RoutedRunCoordinator, parent_id: str) -> dict[str, str]:
    """The tags of a re-execution of `parent_id` as the coordinator submits it; no provenance
    tag of its parent's left on it."""
    parent = instance.get_run_by_id(parent_id)
    assert parent is not None
    child = instance.create_run_for_job(
        job, tags={**parent.tags, PARENT_RUN_ID_TAG: parent.run_id},
        asset_selection=parent.asset_selection, remote_job_origin=parent.remote_job_origin)
    tags = dict(coordinator.submit_run(SubmitRunContext(child, workspace=None)).tags)  # type: ignore[arg-type]
    assert not tags.get(AGAIN_TAG) and not tags.get(RETRY_TAG), tags
    return tags

@contextmanager
def archived_not_purged(config: Config, opsdb: OpsDB, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch
                        ) -> Iterator[tuple[DagsterInstance, Definitions, list[str]]]:
    """An observation driven through the lifecycle without the purge sensor: every package
    archived, nothing purged yet; the instance, the full definitions and the package names."""
    from ccat_assets.driver import drive

    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    observe(config, opsdb, observations=1, files=1)
    home = tmp_path / "dagster_home"
    write_instance_yaml(config, home)
    full = build_definitions(config)
    no_purge = Definitions(assets=full.assets, asset_checks=full.asset_checks, jobs=full.jobs,
                           sensors=[s for s in full.sensors or []
                                    if s.name != "purge_sensor"],  # type: ignore[union-attr]
                           resources=full.resources, executor=full.executor)
    with DagsterInstance.from_config(str(home)) as instance:
        assert drive(no_purge, instance).failed == []
        yield instance, full, sorted(instance.get_dynamic_partitions("packages"))


@contextmanager
def planned_not_built(config: Config, opsdb: OpsDB, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch
                      ) -> Iterator[tuple[DagsterInstance, Definitions, list[str]]]:
    """An observation's packages planned and registered as partitions, none built yet: the
    instance (with the run coordinator `ccat-dt init` writes), the definitions, the names."""
    monkeypatch.setenv("CCAT_DT_CONFIG", str(config.path))
    observe(config, opsdb, observations=1, files=1)
    with opsdb.session() as session:
        names = sorted(p.name for p in plan_packages(session, config))
    assert len(names) >= 2
    home = tmp_path / "dagster_home"
    write_instance_yaml(config, home)
    full = build_definitions(config)
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("packages", names)
        yield instance, full, names


def queued_build(instance: DagsterInstance, full: Definitions, name: str,
                 tags: dict[str, str] | None = None) -> str:
    """A run of `packages` for `name` queued as the UI (or a backfill) queues it; its id."""
    job = full.resolve_implicit_global_asset_job_def()
    run = instance.create_run_for_job(
        job, tags={PARTITION_NAME_TAG: name, **(tags or {})},
        asset_selection=frozenset({AssetKey("packages")}), remote_job_origin=ui_origin(job.name))
    instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))  # type: ignore[arg-type]
    return run.run_id


def ticked(instance: DagsterInstance, full: Definitions, sensor: SensorDefinition
           ) -> list[RunRequest]:
    """The run requests of one tick of `sensor`, as the daemon would evaluate it."""
    from dagster import build_sensor_context

    with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                              repository_def=full.get_repository_def(),
                              resources=full.resources) as context:
        return list(sensor.evaluate_tick(context).run_requests or [])


def test_sensors_see_a_backfills_runs_in_flight(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backfill's queued run for a partition: the sensors ask for no second run of it, and
    the purge deletes nothing of that package meanwhile."""
    with archived_not_purged(config, opsdb, tmp_path, monkeypatch) as (instance, full, names):
        job = full.resolve_implicit_global_asset_job_def()
        coordinator = instance.run_coordinator
        backfill = instance.create_run_for_job(
            job, tags={**partition_tags(names[0], "us"), "dagster/backfill": "b1"},
            asset_selection=frozenset({AssetKey("lta_copies")}),
            remote_job_origin=ui_origin(job.name))
        coordinator.submit_run(SubmitRunContext(backfill, workspace=None))  # type: ignore[arg-type]

        repository = full.get_repository_def()
        purge = repository.get_sensor_def("purge_sensor")
        requests = ticked(instance, full, purge)
        assert requests and {r.partition_key for r in requests} == set(names[1:])

        # names[0]'s LTA copies lost, so that archiving it is due again at both sites: the
        # backfill in flight at us leaves only cologne's.
        from ccat_dt.opsdb.models import CopyStatus, LocationType
        from ccat_dt.packages import get_package

        with opsdb.session() as session:
            for copy in get_package(session, names[0]).copies:
                if copy.location.location_type == LocationType.LONG_TERM_ARCHIVE:
                    copy.status = CopyStatus.DELETED
        lta = repository.get_sensor_def("lta_copy_sensor")
        requests = ticked(instance, full, lta)  # from the start
        keys = {str(r.partition_key) for r in requests}
        assert str(package_site_key(names[0], "us")) not in keys
        assert str(package_site_key(names[0], "cologne")) in keys


def test_a_purge_in_flight_gets_no_second_purge_of_its_package(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The purge sensor ticks while other packages' copies are still made (the drive no longer
    waits for every run to end): a package whose purge run (the sensor's, or the UI's
    "Materialize" of purge_status) is queued or running is not planned again meanwhile, so no
    second run races the first over the same copies."""
    with archived_not_purged(config, opsdb, tmp_path, monkeypatch) as (instance, full, names):
        assert len(names) >= 2
        job = full.resolve_implicit_global_asset_job_def()
        by_ui = instance.create_run_for_job(
            job, tags={PARTITION_NAME_TAG: names[0]},
            asset_selection=frozenset({AssetKey("purge_status")}),
            remote_job_origin=ui_origin(job.name))
        instance.run_coordinator.submit_run(SubmitRunContext(by_ui, workspace=None))  # type: ignore[arg-type]

        repository = full.get_repository_def()
        purge = repository.get_sensor_def("purge_sensor")
        requests = ticked(instance, full, purge)
        assert {r.partition_key for r in requests} == set(names[1:])

        # A later run of another stage of that package, finished (the UI's "Materialize" of
        # `packages`: already built), does not make the purge in flight look dead.
        assert by_hand(full, instance, "packages", names[0])
        requests = ticked(instance, full, purge)
        assert {r.partition_key for r in requests} == set(names[1:])

        # Once that run ended (here: failed before doing anything), the package is planned.
        instance.report_run_failed(instance.get_run_by_id(by_ui.run_id))  # type: ignore[arg-type]
        requests = ticked(instance, full, purge)
        assert names[0] in {r.partition_key for r in requests}


def test_a_package_in_flight_gets_no_second_build_from_another_sensor(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new package, and a package whose observatory tar was found corrupt, each with a
    packaging run queued (the UI's "Materialize", or the re-attempt sensor's run earlier in
    the round): neither the package sensor nor the repair sensor's rebuild asks for a second
    run, which would build the same tar at the same time (seen in CI under load)."""
    from dagster import build_sensor_context

    from ccat_dt.opsdb.models import CopyStatus, LocationType
    from ccat_dt.packages import get_package

    with planned_not_built(config, opsdb, tmp_path, monkeypatch) as (instance, full, names):
        repository = full.get_repository_def()
        in_flight = queued_build(instance, full, names[0])
        with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                                  repository_def=repository, resources=full.resources) as context:
            new = repository.get_sensor_def("package_sensor").evaluate_tick(context)
        assert {r.partition_key for r in new.run_requests or []} == set(names[1:])

        assert by_hand(full, instance, "packages", names[1])  # built, then found corrupt
        with opsdb.session() as session:
            [tar] = [c for c in get_package(session, names[1]).copies
                     if c.location.location_type == LocationType.BUFFER]
            tar.status = CopyStatus.CORRUPT
        rebuild = queued_build(instance, full, names[1])
        repair = repository.get_sensor_def("repair_sensor")
        assert names[1] not in {r.partition_key for r in ticked(instance, full, repair)}

        for run_id in (in_flight, rebuild):  # once those runs ended, the rebuild is asked for
            instance.report_run_failed(instance.get_run_by_id(run_id))  # type: ignore[arg-type]
        assert names[1] in {r.partition_key for r in ticked(instance, full, repair)}


def test_a_run_of_checks_alone_in_flight_does_not_pass_the_work_over(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of a package's checks alone queued (the integrity sensor's recheck, the Checks
    tab's "Execute") as the package sensor first sees the package: it reads the work, it does
    not do it. Before, the sensor left the package out as in flight and its cursor moved on:
    nothing built it until the hourly sweep for unattended work. Now it is asked for, and a
    drive builds and archives it (its tar at each archive read back)."""
    from dagster import AssetCheckKey

    from ccat_assets.driver import drive
    from ccat_dt.checksums import hash_file
    from ccat_dt.packages import get_package
    from tests.test_celery import ui_run

    with planned_not_built(config, opsdb, tmp_path, monkeypatch) as (instance, full, names):
        _, recheck = ui_run(instance, {PARTITION_NAME_TAG: names[0]}, checks=frozenset(
            {AssetCheckKey(AssetKey("packages"), "package_checksum")}),
            origin=ui_origin("__ASSET_JOB"))
        instance.run_coordinator.submit_run(SubmitRunContext(recheck, workspace=None))  # type: ignore[arg-type]
        sensor = full.get_repository_def().get_sensor_def("package_sensor")
        assert {r.partition_key for r in ticked(instance, full, sensor)} == set(names)

        drive(full, instance)
        with opsdb.session() as session:
            checksum = get_package(session, names[0]).checksum
        tars = sorted(config.resolve_root("sites").rglob(f"lta/**/{names[0]}.tar"))
        assert len(tars) == len(config.settings.archive_sites), tars
        assert all(hash_file(tar)[0] == checksum for tar in tars)


def test_an_operator_retry_leaves_alone_the_work_a_queued_run_does(
        config: Config, opsdb: OpsDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ccat-dt retry` while a daemon or a backfill has a run of a package queued: that
    package's work is not launched a second time (the others' is), and the operator is told.
    With no daemon to dequeue it, the queued run itself is executed (as the daemon would)."""
    from dagster import RunsFilter

    from ccat_assets.retry import operator_retry
    from ccat_assets.stages import JOBS
    from ccat_dt.stages import Stage

    with planned_not_built(config, opsdb, tmp_path, monkeypatch) as (instance, full, names):
        queued = queued_build(instance, full, names[0], {"dagster/backfill": "b1"})

        said: list[str] = []
        retried, report = operator_retry(config, instance, opsdb, log=said.append)
        assert {item.package for item in retried} == set(names[1:])
        assert report.failed == []
        builds = [run for run in instance.get_runs(RunsFilter(tags={PARTITION_NAME_TAG: names[0]}))
                  if run.job_name == JOBS[Stage.PACKAGING].name
                  or AssetKey("packages") in (run.asset_selection or ())]
        assert [run.run_id for run in builds] == [queued], [  # who made a second one, if any
            (run.run_id[:8], run.status, run.tags) for run in builds]
        assert builds[0].status == DagsterRunStatus.SUCCESS
        assert any(line.startswith("not retrying packaging") and names[0] in line
                   for line in said)
