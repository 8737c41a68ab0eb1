"""How the embedded default cuts a package's journey into runs, and how often it reads what it
wrote: a drive of two observations counted run by run and hash pass by hash pass, its end
state read on the storage."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    BetaWarning,
    DagsterInstance,
    PreviewWarning,
    RunsFilter,
)
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt import checksums
from ccat_dt import packages as package_builds
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import CopyStatus, LocationType, PackageState, RawDataPackage
from ccat_dt.reaper import certificate_problems
from ccat_dt.storage import files_under
from ccat_dt.tarball import BuiltPackage, PackageMember
from ccat_dt.transports import local as local_transport
from ccat_dt.transports import remote as remote_hashing
from tests.helpers import observe

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

PACKAGE_TAGS = ("dagster/partition/package", "dagster/partition")


@pytest.fixture
def hash_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], Counter[str]]:
    """Every full read of a file's bytes to hash them, per final path: the packaging build's
    and the transport's landed-bytes hash (of the temporary name, counted for the name it is
    renamed to) and every re-read (the checks', the scrub's, place()'s of an existing copy).
    Counted in a file, one line per read, as the drive's runs execute in child processes;
    called for the counts."""
    passes = tmp_path / "hash-passes"
    copy_and_hash = local_transport.LocalTransport._copy_and_hash
    hash_file = remote_hashing.hash_file
    build = package_builds.build_package

    def count(path: Path) -> None:
        with open(passes, "a") as handle:  # one write per line: appends never interleave
            handle.write(f"{path}\n")

    def counted_copy(self: object, source: int, destination: int,
                     landed: Path) -> tuple[str, int]:
        count(landed.with_name(landed.name.removeprefix(".").removesuffix(".part")))
        return copy_and_hash(self, source, destination, landed)  # type: ignore[arg-type]

    def counted_hash(path: Path) -> tuple[str, int]:
        count(path)
        return hash_file(path)

    def counted_build(members: list[PackageMember], destination: Path,
                      **options: Any) -> BuiltPackage:
        count(destination)  # the build reads its tar back once (tests/test_tarball.py)
        return build(members, destination, **options)

    monkeypatch.setattr(package_builds, "build_package", counted_build)
    monkeypatch.setattr(local_transport.LocalTransport, "_copy_and_hash", counted_copy)
    monkeypatch.setattr(remote_hashing, "hash_file", counted_hash)
    return lambda: Counter(passes.read_text().splitlines() if passes.exists() else [])


def lifecycle(opsdb: OpsDB) -> list[RawDataPackage]:
    with opsdb.session() as session:
        found = session.scalars(select(RawDataPackage).order_by(RawDataPackage.id)).all()
        for package in found:
            _ = [(c.location.site.short_name, c.location.root) for c in package.copies]
        return list(found)


def test_a_package_takes_at_most_four_runs_and_each_copy_is_read_once(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        hash_passes: Callable[[], Counter[str]]) -> None:
    source = observe(config, opsdb)
    archive_sites = [s.short_name for s in config.settings.sites if s.is_archive]
    assert len(archive_sites) == 2

    report = drive(build_definitions(config), instance)

    assert report.failed == []
    found = lifecycle(opsdb)
    assert len(found) == 4
    # The end state is the lifecycle's, read on the storage: every LTA copy hashes to the
    # package checksum, every buffer copy and every source file is gone.
    for package in found:
        assert package.state == PackageState.ARCHIVED
        lta = [c for c in package.copies
               if c.location.location_type == LocationType.LONG_TERM_ARCHIVE]
        assert sorted(c.location.site.short_name for c in lta) == sorted(archive_sites)
        for copy in lta:
            path = Path(copy.location.root) / copy.relative_path
            assert checksums.hash_file(path)[0] == package.checksum
        for copy in package.copies:
            if copy.location.location_type == LocationType.BUFFER:
                assert copy.status == CopyStatus.DELETED
                assert not (Path(copy.location.root) / copy.relative_path).exists()
        assert certificate_problems(opsdb, config, package.name) == []
    assert files_under(source) == []

    # Every copy written was read back once: the tar by its build, each copy the transport
    # landed at an archive site by the transport, before the rename; their checks reported
    # those reads instead of reading again.
    landed = [Path(c.location.root) / c.relative_path for p in found for c in p.copies]
    assert len(landed) == (1 + 2 * len(archive_sites)) * len(found)
    passes = hash_passes()
    for path in landed:
        assert passes[str(path)] == 1, (path, passes)
    for asset, check, by in [("packages", "package_checksum", "packaging"),
                             ("site_copies", "site_copy_checksum", "local"),
                             ("lta_copies", "lta_copy_checksum", "local")]:
        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey(asset), check), limit=100)
        assert len(history) == (1 if asset == "packages" else len(archive_sites)) * len(found)
        for record in history:
            assert record.event is not None and record.event.dagster_event is not None
            evaluation = record.event.dagster_event.event_specific_data
            assert isinstance(evaluation, AssetCheckEvaluation)
            assert evaluation.passed
            assert evaluation.metadata["verified_by"].value == by
            assert evaluation.metadata["checksum"].value
            assert evaluation.metadata["operation_id"].value

    # Runs per package: packaging, one copy-and-archive run per archive site, one purge.
    runs: Counter[str] = Counter()
    for run in instance.get_runs(RunsFilter()):
        tagged = next((run.tags[t] for t in PACKAGE_TAGS if t in run.tags), None)
        if tagged is not None:
            runs[tagged] += 1
    assert set(runs) == {p.name for p in found}
    assert max(runs.values()) <= 1 + len(archive_sites) + 1, runs


def test_a_purge_cycle_asks_one_run_per_package_with_exactly_its_planned_copies(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """In-process every site's storage is reachable: each package's deletions at every site go
    in one run, told exactly the copies the cycle planned for it."""
    from dagster import Definitions, build_sensor_context

    from ccat_dt.opsdb.models import utcnow
    from ccat_dt.purge_cycle import plan_cycle

    observe(config, opsdb)
    full = build_definitions(config)
    no_purge = Definitions(assets=full.assets, asset_checks=full.asset_checks, jobs=full.jobs,
                           sensors=[s for s in full.sensors or []  # type: ignore[union-attr]
                                    if s.name != "purge_sensor"],
                           resources=full.resources, executor=full.executor)
    assert drive(no_purge, instance).failed == []
    with opsdb.session() as session:
        plan = plan_cycle(session, config, utcnow())
    planned = {package: sorted(ids) for package, (ids, _) in plan.by_package().items()}
    sites = {package: {site for p, site in plan.by_site() if p == package} for package in planned}
    assert planned and all(len(s) >= 2 for s in sites.values())  # observatory and archives

    repository = full.get_repository_def()
    with build_sensor_context(instance=instance, instance_ref=instance.get_ref(),
                              repository_def=repository, resources=full.resources) as context:
        requests = repository.get_sensor_def("purge_sensor").evaluate_tick(
            context).run_requests or []

    assert sorted(str(r.partition_key) for r in requests) == sorted(planned)
    for request in requests:
        cycle = request.run_config["ops"]["purge_status"]["config"]
        assert sorted(cycle["copy_ids"]) == planned[str(request.partition_key)]
        assert request.run_key is not None
        assert request.run_key.startswith(f"purge:{request.partition_key}:*:")
