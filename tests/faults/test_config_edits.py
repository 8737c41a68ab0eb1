"""The operator edits the configuration while work is in flight: an archive site removed while
packages are routed to it. Until `ccat-dt migrate` every command that acts refuses, saying to
run it; `migrate` routes those packages to the archive sites the configuration has, and the
pipeline converges: archived where the configuration says, nothing deleted without a verified
copy (checked on the disks), nothing sent to the removed site's disks. And removed while a
transfer to it is still writing there: `migrate` refuses until that transfer has ended. A
processing location leaves only once no active staging request targets it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import func, select

from ccat_dt.config import Config, load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import PackageState, RawDataPackage, StagingRequest
from ccat_dt.packages import build, plan_packages
from tests.faults.invariants import assert_safe
from tests.faults.moments import size_of
from tests.faults.pipeline import (
    archived_everywhere,
    child_argv,
    observe,
    run,
    source_root,
    spawn,
    wait_for,
)
from tests.faults.storage_truth import lost_filed_files
from tests.helpers import run_cli


def without_site(config: Config, name: str) -> Config:
    """The configuration file with archive site `name` and its routes taken out."""
    settings = yaml.safe_load(config.path.read_text())
    settings["sites"] = [s for s in settings["sites"] if s["short_name"] != name]
    settings["routes"] = [r for r in settings["routes"]
                          if name not in (r["origin"], r["destination"])]
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


def primaries(opsdb: OpsDB) -> dict[str, str]:
    with opsdb.session() as session:
        return {p.name: p.primary_site.short_name
                for p in session.scalars(select(RawDataPackage).order_by(RawDataPackage.id))}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".ccat"))


def test_an_archive_site_removed_while_packages_are_routed_to_it_is_left_by_migrate(
        config: Config, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    """Two packages planned (round-robin: one for cologne, one for us), one built; then us is
    taken out of the configuration. Before, `migrate` accepted it, and the copy sensor failed
    at every tick on "unknown site 'us'": no package of any site was sent again, nothing
    archived, the sources kept for ever, nobody told but the drive's sensor line."""
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, name="obs-0", files=2)
    observe(config, opsdb, name="obs-1", files=2)
    with opsdb.session() as session:
        names = [p.name for p in plan_packages(session, config)]
    build(opsdb, config, names[1])  # built, at the observatory buffer, not sent
    assert sorted(primaries(opsdb).values()) == ["cologne", "us"]
    sources = files_under(source_root(config))

    config = without_site(config, "us")
    capsys.readouterr()
    for command in (["drive"], ["purge"]):
        assert run_cli("--config", str(config.path), *command) == 2, command
        err = capsys.readouterr().err
        assert "routed to archive site us, which is no longer in the configuration" in err
        assert "run `ccat-dt migrate`" in err
    assert run_cli("--config", str(config.path), "status") == 0  # looking still works
    assert "STOPPED: 1 package(s) in no archive yet are routed to archive site us" in \
        capsys.readouterr().out

    assert run_cli("--config", str(config.path), "migrate") == 0
    assert set(primaries(opsdb).values()) == {"cologne"}
    assert run_cli("--config", str(config.path), "why", names[1]) == 0
    assert "re-routed from us to cologne" in capsys.readouterr().out
    run(config, instance)

    archived_everywhere(config, opsdb)  # in cologne's LTA, the one archive now
    with opsdb.session() as session:
        assert {p.state for p in session.scalars(select(RawDataPackage))} == {
            PackageState.ARCHIVED}
    assert lost_filed_files(config, opsdb) == []  # the sources went only once archived
    assert files_under(source_root(config)) == []
    assert len(sources) == 4
    assert files_under(config.resolve_root("sites/us")) == []  # nothing sent to the old site
    assert_safe(config, opsdb)


def test_an_archive_site_is_not_removed_by_migrate_while_a_transfer_to_it_is_under_way(
        config: Config, instance: DagsterInstance, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A package on its way to us (its process holds the half-written file, as a run started
    before the edit would), us taken out of the configuration: `migrate` refuses, naming the
    transfer and its process, and changes nothing. Before, it said yes, and the transfer,
    past its start, would record its copy at a location the configuration no longer has: every
    command would then stop on "put it back", with no word of it at `migrate`. Once that
    process is gone, `migrate` goes through (closing its claim) and the package is archived at
    cologne."""
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, name="obs-0", files=2)
    observe(config, opsdb, name="obs-1", files=2)
    with opsdb.session() as session:
        names = [p.name for p in plan_packages(session, config)]
    build(opsdb, config, names[1])
    assert primaries(opsdb)[names[1]] == "us"
    marker = tmp_path / "held"
    transfer = spawn(child_argv(config, "place", names[1], "us", "buffer",
                                kill="hold-mid-write", marker=str(marker)))
    try:
        wait_for(marker, transfer)
        part = config.resolve_root("sites/us/buffer") / "obs-1" / f".{names[1]}.tar.part"
        assert size_of(part) > 0  # the bytes are landing at us
        config = without_site(config, "us")
        capsys.readouterr()
        assert run_cli("--config", str(config.path), "migrate") == 2
        err = capsys.readouterr().err
        assert (f"location us/buffer: a transfer of package {names[1]} to it is under way "
                f"(operation") in err and f"process {transfer.pid} on" in err, err
        assert "then run `ccat-dt migrate` again" in err
        assert primaries(opsdb)[names[1]] == "us"  # nothing changed
    finally:
        transfer.kill()
        transfer.communicate(timeout=30)

    assert run_cli("--config", str(config.path), "migrate") == 0  # nothing writes there now
    run(config, instance)
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert files_under(source_root(config)) == []
    assert [p.name for p in config.resolve_root("sites/us").rglob("*.tar")] == []
    # The killed transfer's half-written file stays on the removed site's disk, which ccat-dt
    # no longer looks after (the operator's to clear); its claim was closed by `migrate`.
    assert size_of(part) > 0
    part.unlink()
    assert_safe(config, opsdb)


def test_a_processing_location_with_active_staging_requests_leaves_only_once_released(
        config: Config, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    """A staging request for ramses/processing, not staged yet; ramses taken out of the
    configuration. Before, `migrate` said yes (no copy there yet), `stage` still took
    requests for it (OpsDB keeps the location), and the staging sensor failed on "unknown site
    'ramses'" at every tick: no request anywhere was staged again. Now the removal is refused
    while a request is active, saying what to do; put back, staged, released and purged,
    ramses leaves, and a new request for it is refused at `stage`, changing nothing."""
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, name="obs-0", files=2)
    run(config, instance)
    original = config.path.read_text()
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "stage", "--location", "ramses/processing",
                   "--observation", "obs-0", "--expires-hours", "24") == 0
    request = capsys.readouterr().out.strip()

    config = without_site(config, "ramses")
    capsys.readouterr()
    for command in (["migrate"], ["drive"]):
        assert run_cli("--config", str(config.path), *command) == 2, command
        assert (f"location ramses/processing is no longer in the configuration, but 1 active "
                f"staging request(s) target it ({request}): put it back, release them") in \
            capsys.readouterr().err

    config.path.write_text(original)  # put back: staged, then released and purged
    config = load_config(config.path)
    run(config, instance)
    processing = config.resolve_root("sites/ramses/processing")
    assert len(files_under(processing / request)) == 2  # staged, on the disk
    assert run_cli("--config", str(config.path), "stage", "--release", request) == 0
    run(config, instance)
    assert files_under(processing) == []

    config = without_site(config, "ramses")
    assert run_cli("--config", str(config.path), "migrate") == 0
    with opsdb.session() as session:
        before = session.scalar(select(func.count(StagingRequest.id)))
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "stage", "--location", "ramses/processing",
                   "--observation", "obs-0", "--expires-hours", "24") == 2
    assert "location 'ramses/processing' is not in the configuration" in capsys.readouterr().err
    with opsdb.session() as session:
        assert session.scalar(select(func.count(StagingRequest.id))) == before
    report = run(config, instance)
    assert report.sensor_failures == {}, report.sensor_failures
    assert files_under(processing) == []
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
