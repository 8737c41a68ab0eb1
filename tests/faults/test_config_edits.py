"""The operator edits the configuration while work is in flight: an archive site removed while
packages are routed to it. Until `ccat-dt migrate` every command that acts refuses, saying to
run it; `migrate` routes those packages to the archive sites the configuration has, and the
pipeline converges: archived where the configuration says, nothing deleted without a verified
copy (checked on the disks), nothing sent to the removed site's disks. And removed while a
transfer to it is still writing there: `migrate` refuses until that transfer has ended, and
so for a location moved to another root (a disk move) while it is written to. A location
holding copies moved to a root its data is not on (the path edited first, or mistyped) is
refused by `migrate` and `init`. So too for a purge deleting a copy at a location being
moved: `migrate` refuses while the deletion is under way, and a deletion never unlinks at a root
OpsDB no longer records, nor on a look at an LTA copy at a root its location has left. A
processing location leaves only once no active staging request targets it; a location that
left is no longer listed by `status` or `why`. A location's disk moved by copying it (`cp -a`,
`rsync -a`, locally or on an archive host) has its copies re-identified by `migrate` (their new
inodes), so a copy that rots there later is repaired with no person; one copied without its
mtimes is judged by its checksum and its identity recorded then."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import func, select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.health import mark_failed
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    Operation,
    OperationStatus,
    OperationType,
    PackageState,
    PhysicalCopy,
    RawDataPackage,
    StagingRequest,
    utcnow,
)
from ccat_dt.packages import build, plan_packages
from ccat_dt.topology import get_location
from tests.faults.conftest import FAST_BACKOFF
from tests.faults.invariants import assert_safe
from tests.faults.moments import size_of
from tests.faults.pipeline import (
    archived_everywhere,
    child_argv,
    deployment,
    finish,
    observe,
    operations,
    package_names,
    run,
    source_root,
    spawn,
    wait_for,
)
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import KEEP, _sites, retention, retention_in_place
from tests.helpers import flip_byte, rehashes_before_unlink, run_cli
from tests.sshd import SshServer
from tests.test_multisite import multisite


def without_site(config: Config, name: str) -> Config:
    """The configuration file with archive site `name` and its routes taken out."""
    settings = yaml.safe_load(config.path.read_text())
    settings["sites"] = [s for s in settings["sites"] if s["short_name"] != name]
    settings["routes"] = [r for r in settings["routes"]
                          if name not in (r["origin"], r["destination"])]
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


def moved(config: Config, site: str, name: str, root: str) -> Config:
    """The configuration file with location `site`/`name` given the root `root`."""
    settings = yaml.safe_load(config.path.read_text())
    entry = next(s for s in settings["sites"] if s["short_name"] == site)
    next(loc for loc in entry["locations"] if loc["name"] == name)["root"] = root
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


def root_in_opsdb(opsdb: OpsDB, site: str, name: str) -> str:
    with opsdb.session() as session:
        return get_location(session, site, name).root


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
    names = _two_packages_the_second_built_for_us(config, opsdb)
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


@pytest.mark.parametrize("transfer_ends", ["let end", "killed"])
def test_a_location_is_not_moved_by_migrate_while_a_transfer_to_it_is_under_way(
        config: Config, instance: DagsterInstance, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], transfer_ends: str) -> None:
    """A package on its way to us/buffer (its process holds the half-written file, as a run
    started before the edit would); the operator copies the disk (its marker) to a new root and
    records that root in the configuration. Before, `migrate` said yes: the transfer, its
    destination read at its start, landed its tar under the old root, and OpsDB recorded it at
    us/buffer, now the new root, where it was not. Now `migrate` refuses, naming the transfer
    and its process, and changes nothing; once the transfer has ended (its tar moved to the new
    root too), or its process is gone (its claim closed by `migrate`), the move goes through and
    the package is archived from the new root."""
    opsdb = OpsDB(config.opsdb_url)
    names = _two_packages_the_second_built_for_us(config, opsdb)
    old, new = config.resolve_root("sites/us/buffer"), config.resolve_root("disks/us-buffer-2")
    marker = tmp_path / "held"
    transfer = spawn(child_argv(config, "place", names[1], "us", "buffer",
                                kill="pause-mid-write", marker=str(marker)))
    try:
        wait_for(marker, transfer)
        part = old / "obs-1" / f".{names[1]}.tar.part"
        assert size_of(part) > 0  # the bytes are landing at the old root
        shutil.copytree(old, new, ignore=shutil.ignore_patterns("*.part"))  # its marker too
        config = moved(config, "us", "buffer", "disks/us-buffer-2")
        capsys.readouterr()
        assert run_cli("--config", str(config.path), "migrate") == 2
        err = capsys.readouterr().err
        assert (f"location us/buffer: a transfer of package {names[1]} to it is under way "
                f"(operation") in err and f"process {transfer.pid} on" in err, err
        assert "let it end (then move what it wrote at the old root to the new one)" in err
        assert "then run `ccat-dt migrate` again" in err
        assert root_in_opsdb(opsdb, "us", "buffer") == str(old)  # nothing changed
        if transfer_ends == "let end":
            marker.unlink()  # the transfer goes on, to its end
            assert finish(transfer).returncode == 0
    finally:
        if transfer.poll() is None:
            transfer.kill()
        transfer.communicate(timeout=60)

    landed = old / "obs-1" / f"{names[1]}.tar"
    if transfer_ends == "let end":  # recorded at us/buffer at the old root, where it is
        assert landed.is_file() and not (new / "obs-1" / landed.name).exists()
        shutil.copytree(old, new, dirs_exist_ok=True)  # the operator moves what it wrote
    else:
        assert not landed.exists() and size_of(part) > 0
    shutil.rmtree(old)
    assert run_cli("--config", str(config.path), "migrate") == 0
    assert root_in_opsdb(opsdb, "us", "buffer") == str(new)
    transfers = operations(opsdb, OperationType.TRANSFER, names[1])
    if transfer_ends == "killed":  # its claim closed by `migrate`, saying why
        status, error = transfers[0]
        assert status == OperationStatus.FAILED and error is not None
        assert f"closed by `ccat-dt migrate` as location us/buffer moved from {old} to {new}" \
            in error
    run(config, instance)
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert files_under(source_root(config)) == []
    assert not old.exists()  # nothing written at the old root once moved
    assert files_under(new) == []  # archived from the new root, then purged there
    assert run_cli("--config", str(config.path), "audit") == 0
    assert_safe(config, opsdb)


@pytest.mark.parametrize("new_root", ["not there", "empty", "mistyped"])
def test_a_location_holding_copies_is_not_moved_to_a_root_without_its_data(
        config: Config, instance: DagsterInstance, capsys: pytest.CaptureFixture[str],
        new_root: str) -> None:
    """cologne/lta holds an archive copy; the operator edits its root before moving the data
    (the new directory not there yet, or made empty), or mistypes it (an existing directory of
    something else). Before, `migrate` said yes and left the location as an unmounted disk
    (every archive copy to cologne failing on "is the disk mounted?", nobody told of the move);
    `init` marked the new root, and OpsDB then counted at cologne/lta copies that were not
    there ("0 packages not yet in 2 verified LTA copies") until the audit found them lost. Now
    both refuse, saying to move the data with its marker, and change nothing (no new root made
    or marked); once the root is moved whole, `migrate` goes through and the archive is
    complete, read on the disks."""
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, name="obs-0", files=2)
    run(config, instance)
    old = config.resolve_root("sites/cologne/lta")
    new = config.resolve_root("disks/cologne-lta-2")
    if new_root == "empty":
        new.mkdir(parents=True)
    elif new_root == "mistyped":
        new.mkdir(parents=True)
        (new / "notes.txt").write_text("someone else's directory\n")
    before = sorted(p.name for p in new.rglob("*")) if new.exists() else None
    config = moved(config, "cologne", "lta", "disks/cologne-lta-2")
    capsys.readouterr()
    for command in (["--config", str(config.path), "migrate"], ["init", str(config.directory)]):
        assert run_cli(*command) == 2, command
        err = capsys.readouterr().err
        assert (f"location cologne/lta holds 1 copy in OpsDB at {old}; the configuration moves "
                f"it to {new}, which does not hold its marker (.ccat-dt-location naming "
                "cologne/lta): move its data there with the marker") in err, err
        assert root_in_opsdb(opsdb, "cologne", "lta") == str(old)  # nothing changed,
        assert (sorted(p.name for p in new.rglob("*")) if new.exists() else None) == before
    assert run_cli("--config", str(config.path), "purge") == 2  # nothing acts meanwhile

    if new.exists():
        shutil.rmtree(new)
    new.parent.mkdir(parents=True, exist_ok=True)
    old.rename(new)  # the operator moves the root whole, its marker included
    assert run_cli("--config", str(config.path), "migrate") == 0
    observe(config, opsdb, name="obs-1", files=2)
    run(config, instance)
    archived_everywhere(config, opsdb)
    assert len([p for p in new.rglob("*.tar")]) == 2
    assert run_cli("--config", str(config.path), "audit") == 0  # every copy where recorded
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_locations_that_left_the_configuration_are_not_listed(
        config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    """A buffer added at cologne, marked unhealthy by a failing transfer, then taken out with
    ramses/processing (both holding nothing). Before, `status` kept listing both in its table,
    the buffer's forecast line and its "unhealthy" line, and `why` the latter, for locations
    nothing looks after any more."""
    settings = yaml.safe_load(config.path.read_text())
    original = yaml.safe_dump(settings, sort_keys=False)
    cologne = next(s for s in settings["sites"] if s["short_name"] == "cologne")
    cologne["locations"].append({"name": "spare", "type": "buffer", "root": "sites/cologne/spare"})
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert run_cli("--config", str(config.path), "migrate") == 0
    opsdb = OpsDB(config.opsdb_url)
    with opsdb.session() as session:
        spare = get_location(session, "cologne", "spare").id
    mark_failed(opsdb, config, spare, "local to cologne/spare: disk I/O error")
    observe(config, opsdb, name="obs-0", files=2)
    with opsdb.session() as session:
        [package] = [p.name for p in plan_packages(session, config)]
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "status") == 0
    assert run_cli("--config", str(config.path), "why", package) == 0
    out = capsys.readouterr().out
    assert "cologne/spare" in out and "location cologne/spare unhealthy" in out

    config.path.write_text(original)
    config = without_site(load_config(config.path), "ramses")
    assert run_cli("--config", str(config.path), "migrate") == 0
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "status") == 0
    assert run_cli("--config", str(config.path), "why", package) == 0
    out = capsys.readouterr().out
    assert "cologne/spare" not in out and "ramses/processing" not in out, out
    assert "cologne/buffer" in out and "cologne/lta" in out  # the configured ones still are
    for root in ("sites/cologne/spare", "sites/ramses/processing"):  # their disks untouched
        assert files_under(config.resolve_root(root)) == []


def _two_packages_the_second_built_for_us(config: Config, opsdb: OpsDB) -> list[str]:
    """Two observations filed and planned, the second's package built at the observatory,
    its primary archive site us (round-robin); the packages' names."""
    observe(config, opsdb, name="obs-0", files=2)
    observe(config, opsdb, name="obs-1", files=2)
    with opsdb.session() as session:
        names = [p.name for p in plan_packages(session, config)]
    build(opsdb, config, names[1])
    assert primaries(opsdb)[names[1]] == "us"
    return names


@pytest.fixture(params=["sqlite"])
def kept(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    """A deployment whose sources and buffers outlive the first drive (the purge is run by the
    test, once their retention is set to 0); its OpsDB in SQLite, or (param "postgresql") in
    the test PostgreSQL (skipped without one)."""
    url = ({"opsdb_url": request.getfixturevalue("postgres_url")}
           if request.param == "postgresql" else {})
    return deployment(tmp_path / "kept", sites=_sites(KEEP), policies={
        "max_attempts": 3, "retry_backoff_first_s": FAST_BACKOFF}, **url)


def archived_and_purgeable(config: Config, instance: DagsterInstance
                           ) -> tuple[Config, OpsDB, str, list[Path]]:
    """One package archived at both sites, its sources and buffer copies kept; then their
    retention set to 0 (the next purge may delete them). Returns the source files."""
    opsdb = OpsDB(config.opsdb_url)
    sources = observe(config, opsdb, name="obs-0", files=2)
    run(config, instance)
    [package] = package_names(opsdb)
    assert all(p.is_file() for p in sources)
    return retention(config, 0), opsdb, package, sources


def package_checksum(opsdb: OpsDB, name: str) -> str:
    with opsdb.session() as session:
        checksum = session.scalar(select(RawDataPackage.checksum).where(
            RawDataPackage.name == name))
    assert checksum is not None
    return checksum


def archive_tars_hold_the_package(config: Config, opsdb: OpsDB, package: str) -> None:
    """Each archive site's LTA root (where OpsDB records it now) holds the package's tar, whose
    bytes hash to the package checksum, read on the disk."""
    for site in config.settings.archive_sites:
        root = Path(root_in_opsdb(opsdb, site.short_name, "lta"))
        [tar] = root.rglob(f"{package}.tar")
        assert hash_file(tar)[0] == package_checksum(opsdb, package), tar


def deletion_of(opsdb: OpsDB, label: str) -> Operation:
    """The newest deletion operation of the copy at location `label`."""
    with opsdb.session() as session:
        found = [op for op in session.scalars(select(Operation).where(
            Operation.operation_type == OperationType.DELETION).order_by(Operation.id))
            if op.copy is not None and op.copy.location.label == label]
        session.expunge_all()
    return found[-1]


@pytest.mark.parametrize("kept", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("deletion_ends", ["let end", "killed", "stalled past its lease"])
def test_a_location_is_not_moved_by_migrate_while_a_deletion_there_is_under_way(
        kept: Config, instance: DagsterInstance, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], deletion_ends: str) -> None:
    """A purge has certified the deletion of the package's us/buffer copy and is about to
    unlink it (its process holds there, as a run started before the edit would); the operator
    copies the disk (its marker too) to a new root and records that root in the
    configuration. Before, `migrate` said yes: the purge unlinked at the old root and OpsDB
    recorded the copy deleted while the new root, where OpsDB now says us/buffer is, still
    held the tar (the audit: stale_deleted; nothing ever deleted it). Now `migrate` refuses,
    naming the deletion and its process, and changes nothing; once the deletion has ended
    (the old root copied again), or its process is gone (its claim closed by `migrate`), the
    move goes through and the copy is deleted at the new root. A purge on another host that
    stalled past its lease (`migrate` takes it for gone) and then wakes up does not unlink at
    the old root: OpsDB no longer records us/buffer there."""
    config, opsdb, package, sources = archived_and_purgeable(kept, instance)
    old, new = config.resolve_root("sites/us/buffer"), config.resolve_root("disks/us-buffer-2")
    tar = Path("obs-0") / f"{package}.tar"
    marker = tmp_path / "held"
    purge = spawn(child_argv(config, "purge", package, copy_at="us/buffer", marker=str(marker),
                             kill=("hold-before-unlink" if deletion_ends == "killed"
                                   else "pause-before-unlink")))
    try:
        wait_for(marker, purge, timeout=120)
        claim = deletion_of(opsdb, "us/buffer")
        assert claim.status == OperationStatus.IN_PROGRESS
        assert (old / tar).is_file()  # certified, not yet unlinked
        shutil.copytree(old, new)  # its marker too
        config = moved(config, "us", "buffer", "disks/us-buffer-2")
        if deletion_ends == "stalled past its lease":  # as a purge on an archive host would
            with opsdb.session() as session:  # look once it stopped renewing for 1.5 hours
                held = session.get_one(Operation, claim.id)
                held.owner_host = "archive-host-2 pid:[4026531836]"
                held.lease_until = utcnow() - timedelta(hours=1)
        capsys.readouterr()
        if deletion_ends == "stalled past its lease":
            assert run_cli("--config", str(config.path), "migrate") == 0
        else:
            assert run_cli("--config", str(config.path), "migrate") == 2
            err = capsys.readouterr().err
            assert (f"location us/buffer: a deletion of package {package}'s copy {tar} there is "
                    f"under way (operation {claim.id}, process {purge.pid} on") in err, err
            assert ("let it end (it deletes at the old root: then move the old root to the new "
                    "one again") in err and "then run `ccat-dt migrate` again" in err
            assert root_in_opsdb(opsdb, "us", "buffer") == str(old)  # nothing changed
        if deletion_ends != "killed":
            marker.unlink()  # the purge goes on, to its end
            ended = finish(purge, timeout=120)
            assert ended.returncode == 0, ended.stderr
    finally:
        if purge.poll() is None:
            purge.kill()
        purge.communicate(timeout=60)

    checksum = package_checksum(opsdb, package)
    if deletion_ends == "let end":  # deleted at the old root, where OpsDB said it was
        assert not (old / tar).exists() and hash_file(new / tar)[0] == checksum
        assert deletion_of(opsdb, "us/buffer").status == OperationStatus.COMPLETED
        shutil.rmtree(new)
        shutil.copytree(old, new)  # the operator moves the old root again, as told
        assert not (new / tar).exists()
    else:  # nothing deleted at either root
        assert hash_file(old / tar)[0] == checksum == hash_file(new / tar)[0]
    shutil.rmtree(old)
    if deletion_ends != "stalled past its lease":
        assert run_cli("--config", str(config.path), "migrate") == 0
    assert root_in_opsdb(opsdb, "us", "buffer") == str(new)
    if deletion_ends != "let end":  # its claim closed by `migrate`, saying why
        closed = deletion_of(opsdb, "us/buffer")
        assert closed.status == OperationStatus.FAILED and closed.error is not None
        assert (f"closed by `ccat-dt migrate` as location us/buffer moved from {old} to "
                f"{new}") in closed.error, closed.error
    run(config, instance)
    archived_everywhere(config, opsdb)
    archive_tars_hold_the_package(config, opsdb, package)
    assert not any(p.exists() for p in sources)
    assert not old.exists()  # nothing written at the old root once moved
    assert files_under(new) == []  # deleted at the new root, where OpsDB says it is
    assert run_cli("--config", str(config.path), "audit") == 0
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_a_deletion_does_not_rely_on_an_lta_copy_looked_at_at_a_root_its_location_left(
        kept: Config, instance: DagsterInstance, tmp_path: Path) -> None:
    """A purge re-checked the package's archive copies and is about to unlink its us/buffer
    copy, which us/lta's copy allows; meanwhile the operator moves us/lta's disk to a new root,
    the copy interrupted before the tar (the marker copied), and `migrate` records it
    (nothing is being deleted at us/lta: it does not refuse). Before, the purge unlinked the
    buffer copy, and the sources after it, on its look at the old root: at its new root us/lta
    held no tar, and us no copy at all. Now each deletion checks, at its unlink (and at its
    claim), that every location it looked at is still where OpsDB records it: nothing is
    deleted; the next purge re-checks us/lta at its new root, finds the tar missing, and keeps
    everything until the repair has restored it."""
    config, opsdb, package, sources = archived_and_purgeable(kept, instance)
    buffer_tar = config.resolve_root("sites/us/buffer") / "obs-0" / f"{package}.tar"
    old, new = config.resolve_root("sites/us/lta"), config.resolve_root("disks/us-lta-2")
    marker = tmp_path / "held"
    purge = spawn(child_argv(config, "purge", package, copy_at="us/buffer", marker=str(marker),
                             kill="pause-before-unlink"))
    try:
        wait_for(marker, purge, timeout=120)
        # the copy interrupted before the tar (its marker and directories already there)
        shutil.copytree(old, new, ignore=shutil.ignore_patterns("*.tar"))
        assert list(new.rglob("*.tar")) == [] and list(old.rglob("*.tar"))
        config = moved(config, "us", "lta", "disks/us-lta-2")
        assert run_cli("--config", str(config.path), "migrate") == 0
        assert root_in_opsdb(opsdb, "us", "lta") == str(new)
        marker.unlink()
        ended = finish(purge, timeout=120)
        assert ended.returncode == 0, ended.stderr
    finally:
        if purge.poll() is None:
            purge.kill()
        purge.communicate(timeout=60)

    # us's copies, read on the disks: the buffer copy and the sources are still there
    checksum = package_checksum(opsdb, package)
    assert hash_file(buffer_tar)[0] == checksum
    assert all(p.is_file() for p in sources)
    failures = ended.result["result"]["failures"]
    assert any(f"location us/lta is at {new} in OpsDB now, no longer at {old}, where this "
               "deletion looked" in line for line in failures), failures
    withdrawn = deletion_of(opsdb, "us/buffer")
    assert withdrawn.status == OperationStatus.FAILED and withdrawn.error is not None
    assert "nothing was deleted at either place" in withdrawn.error
    shutil.rmtree(old)
    run(config, instance)
    archived_everywhere(config, opsdb)
    archive_tars_hold_the_package(config, opsdb, package)
    assert len(list(new.rglob("*.tar"))) == 1  # repaired at the new root
    assert not any(p.exists() for p in sources) and not buffer_tar.exists()
    with opsdb.session() as session:  # found missing by the purge's look there
        assert session.scalar(select(func.count(Operation.id)).where(
            Operation.operation_type == OperationType.VERIFICATION,
            Operation.status == OperationStatus.FAILED,
            Operation.reason == "re-check before a deletion")) == 1
    assert run_cli("--config", str(config.path), "audit") == 0
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_a_transfer_starting_while_migrate_records_a_move_lands_at_the_new_root(
        tmp_path: Path, postgres_url: str) -> None:
    """`migrate` has looked for transfers to us/buffer (none), recorded its new root and not
    yet committed, as a transfer (started with the old configuration in memory) claims a copy
    there. Before, the transfer had read its destination before its claim: it wrote its tar
    at the old root, OpsDB then recorded the copy at the new root, where it was not. Now it
    reads the destination under a shared lock on its row, which `migrate` holds: it waits for
    the move and writes at the new root (PostgreSQL; SQLite has one writer at a time)."""
    import threading

    from sqlalchemy import text

    from ccat_dt.opsdb.models import LocationType
    from ccat_dt.replicas import place, plan_placement
    from ccat_dt.topology import sync_topology

    config = deployment(tmp_path / "pg", opsdb_url=postgres_url)
    opsdb = OpsDB(config.opsdb_url)
    try:
        names = _two_packages_the_second_built_for_us(config, opsdb)
        old, new = config.resolve_root("sites/us/buffer"), config.resolve_root("disks/us-buf-2")
        placement = plan_placement(opsdb, config, names[1], "us", LocationType.BUFFER)
        shutil.copytree(old, new)  # the disk copied (its marker), then the root edited
        edited = moved(config, "us", "buffer", "disks/us-buf-2")
        outcome: list[object] = []

        def transfer() -> None:
            try:
                outcome.append(place(opsdb, config, placement, LocationType.BUFFER))
            except Exception as exc:  # noqa: BLE001 - told by the assertion below
                outcome.append(exc)

        with opsdb.session() as migrating:  # `migrate`, up to its commit
            sync_topology(migrating, edited)
            thread = threading.Thread(target=transfer)
            thread.start()
            # a session waiting for a lock that has this schema's data_locations open (the
            # whole server's waits would count other tests' too)
            waits = text("SELECT count(*) FROM pg_locks w WHERE NOT w.granted AND w.pid IN "
                         "(SELECT pid FROM pg_locks WHERE relation = "
                         "'data_locations'::regclass AND pid <> pg_backend_pid())")
            with opsdb.engine.connect() as watch:
                for _ in range(600):  # the transfer waits for the move, or (before) is done
                    if not thread.is_alive() or watch.execute(waits).scalar():
                        break
                    threading.Event().wait(0.05)
        thread.join(timeout=120)
        assert outcome and not isinstance(outcome[0], Exception), outcome
        tar = Path("obs-1") / f"{names[1]}.tar"
        assert (new / tar).is_file(), files_under(new)
        assert hash_file(new / tar)[0] == package_checksum(opsdb, names[1])
        assert not (old / tar).exists()  # nothing landed where OpsDB no longer points
        assert root_in_opsdb(opsdb, "us", "buffer") == str(new)
        assert lost_filed_files(edited, opsdb) == []
    finally:
        opsdb.dispose()


def disk_copied(old: Path, new: Path, how: str) -> None:
    """The operator copies a location's whole root, its marker too, to a new disk with a real
    tool: `cp -a` and `rsync -a` keep each file's size and mtime (its inode is new); plain
    `cp -r` keeps no mtime."""
    new.parent.mkdir(parents=True, exist_ok=True)
    argv = {"cp -a": ["cp", "-a", str(old), str(new)],
            "rsync -a": ["rsync", "-a", f"{old}/", f"{new}/"],
            "cp -r": ["cp", "-r", str(old), str(new)]}[how]
    subprocess.run(argv, check=True, capture_output=True)


def recorded_inodes(opsdb: OpsDB, site: str, name: str) -> dict[str, int | None]:
    """The identity (inode) OpsDB records for each live copy at the location, by path."""
    with opsdb.session() as session:
        location = get_location(session, site, name)
        return {path: inode for path, inode in session.execute(
            select(PhysicalCopy.relative_path, PhysicalCopy.inode).where(
                PhysicalCopy.location_id == location.id,
                PhysicalCopy.status != CopyStatus.DELETED))}


@pytest.mark.parametrize("how", ["cp -a", "rsync -a"])
def test_an_archive_disk_moved_by_copying_is_repaired_with_no_person_when_a_copy_rots(
        kept: Config, instance: DagsterInstance, capsys: pytest.CaptureFixture[str],
        how: str) -> None:
    """us/lta's disk is copied whole to a new disk (sizes and mtimes kept, every inode new),
    its root edited, `migrate` run; then the archive copy rots in place on the new disk.
    Before, OpsDB kept the old disk's inode for each copy: the scrub (or the purge's look)
    quarantined the rotten copy, and its repair refused to overwrite it ("holds a file OpsDB
    does not record there ... nothing was written over it", for a person to move away)
    although it was the recorded copy, only moved; the buffer and the sources were kept for
    ever. Now `migrate` re-identifies each copy at the new root (one stat: the same size and
    mtime), so the repair replaces the rotten copy by itself and the purge goes on, nothing
    deleted without a verified copy (read on the disks)."""
    config, opsdb, package, sources = archived_and_purgeable(kept, instance)
    old, new = config.resolve_root("sites/us/lta"), config.resolve_root("disks/us-lta-2")
    buffer = config.resolve_root("sites/us/buffer")
    disk_copied(old, new, how)
    shutil.rmtree(old)
    before = recorded_inodes(opsdb, "us", "lta")
    config = moved(config, "us", "lta", "disks/us-lta-2")
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "migrate") == 0
    out = capsys.readouterr().out
    assert (f"location us/lta moved from {old} to {new}: 1 copy re-identified there "
            "(the same size and mtime)") in out, out
    [tar] = new.rglob(f"{package}.tar")
    assert recorded_inodes(opsdb, "us", "lta") == {
        str(tar.relative_to(new)): tar.stat().st_ino} != before
    flip_byte(tar, tar.stat().st_size // 3, 0x10)  # bit rot on the new disk, in place

    report = drive(build_definitions(config), instance, schedules=True, wait_s=10)
    assert report.failed == [], report.failed
    assert any(key.startswith("repair:") for key in report.launched), report.launched
    with opsdb.session() as session:  # nobody was asked to move the file away
        refused = session.scalars(select(Operation.error).where(
            Operation.status == OperationStatus.FAILED,
            Operation.error.contains("does not record there"))).all()
    assert refused == []
    checksum = package_checksum(opsdb, package)
    assert hash_file(tar)[0] == checksum  # replaced at the new root, read on the disk
    archived_everywhere(config, opsdb)
    archive_tars_hold_the_package(config, opsdb, package)
    assert not any(p.exists() for p in sources) and files_under(buffer) == []
    assert not old.exists()
    assert run_cli("--config", str(config.path), "audit") == 0
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_an_archive_disk_copied_without_its_mtimes_is_judged_by_checksum_then_repaired(
        kept: Config, instance: DagsterInstance, capsys: pytest.CaptureFixture[str]) -> None:
    """us/lta's disk copied with plain `cp -r` (every mtime new): `migrate` cannot tell the
    copy is the recorded one by a stat and says so, leaving its identity for the checks to
    judge. The scrub re-reads it, finds its bytes intact and records its identity then; when
    it rots later (found by the purge's look before it deletes), its repair replaces it with
    no person, and the purge goes on. Before, a re-read that found an intact copy kept the
    stale identity: the repair refused for ever ("holds a file OpsDB does not record there"),
    the buffers and sources kept."""
    config, opsdb = kept, OpsDB(kept.opsdb_url)
    sources = observe(config, opsdb, name="obs-0", files=2)
    run(config, instance)  # archived at both sites; sources and buffers kept
    [package] = package_names(opsdb)
    old, new = config.resolve_root("sites/us/lta"), config.resolve_root("disks/us-lta-2")
    disk_copied(old, new, "cp -r")
    shutil.rmtree(old)
    before = recorded_inodes(opsdb, "us", "lta")
    config = moved(config, "us", "lta", "disks/us-lta-2")
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "migrate") == 0
    out = capsys.readouterr().out
    assert (f"location us/lta moved from {old} to {new}: 0 copies re-identified there "
            "(the same size and mtime); 1 could not be") in out, out
    assert recorded_inodes(opsdb, "us", "lta") == before  # left for the checks to judge
    [tar] = new.rglob(f"{package}.tar")

    defs = build_definitions(config)
    first = drive(defs, instance, schedules=True)  # the scrub re-reads it: intact
    assert first.failed == [] and any(k.startswith("scrub:") for k in first.launched)
    assert recorded_inodes(opsdb, "us", "lta") == {str(tar.relative_to(new)): tar.stat().st_ino}
    flip_byte(tar, tar.stat().st_size // 3, 0x10)  # it rots later
    config = retention_in_place(config, 0)  # the purge's look finds it before deleting
    again = run(config, instance)
    assert again.failed == [], again.failed
    assert any(key.startswith("repair:") for key in again.launched), again.launched
    assert hash_file(tar)[0] == package_checksum(opsdb, package)
    archived_everywhere(config, opsdb)
    archive_tars_hold_the_package(config, opsdb, package)
    assert not any(p.exists() for p in sources)
    assert files_under(config.resolve_root("sites/us/buffer")) == []
    assert run_cli("--config", str(config.path), "audit") == 0
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)


def test_a_remote_archive_disk_moved_by_copying_is_re_identified_over_ssh(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        capsys: pytest.CaptureFixture[str]) -> None:
    """us/lta on an archive host (reached over ssh) is copied there with `cp -a` to a new
    disk and its root edited: `migrate` stats its copies on that host in one ssh round trip
    and records their new inodes; the copy then rots, the purge's look finds it, and its
    repair over ssh replaces it with no person (before: refused as another file), the purge
    going on after it."""
    config = retention_in_place(multisite(tmp_path, sshd), KEEP)
    opsdb = OpsDB(config.opsdb_url)
    try:
        sources = observe(config, opsdb, name="obs-0", files=2)
        run(config, instance)
        [package] = package_names(opsdb)
        old = Path(root_in_opsdb(opsdb, "us", "lta"))
        new = old.parent / "lta-2"
        disk_copied(old, new, "cp -a")  # on the archive host (this machine, through sshd)
        shutil.rmtree(old)
        config = moved(config, "us", "lta", str(new))
        capsys.readouterr()
        assert run_cli("--config", str(config.path), "migrate") == 0
        out = capsys.readouterr().out
        assert (f"location us/lta moved from {sshd.destination}:{old} to {sshd.destination}:"
                f"{new}: 1 copy re-identified there") in out, out
        [tar] = new.rglob(f"{package}.tar")
        assert recorded_inodes(opsdb, "us", "lta") == {str(tar.relative_to(new)):
                                                       tar.stat().st_ino}
        flip_byte(tar, tar.stat().st_size // 3, 0x10)

        config = retention_in_place(config, 0)
        report = run(config, instance)
        assert report.failed == [], report.failed
        assert any(key.startswith("repair:") for key in report.launched), report.launched
        assert hash_file(tar)[0] == package_checksum(opsdb, package)
        archived_everywhere(config, opsdb)
        assert not any(p.exists() for p in sources)
        assert lost_filed_files(config, opsdb) == []
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_staged_files_on_a_processing_disk_moved_by_copying_are_known_unread(
        config: Config, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """ramses/processing holds a request's staged files; its disk is copied whole with
    `cp -a` and `migrate` records the move. Before, every staged file read as changed (its
    inode stale): `why` said the staging failed ("changed files are kept for their owner:
    move them away first"), and after the release the purge re-read each one before deleting
    it. Now they are known by a stat: nothing reads as changed, and the
    purge deletes them at the new root unread."""
    from ccat_dt.diagnosis import diagnose
    from ccat_dt.staging import Selection, release, request_staging

    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, name="obs-0", files=2)
    run(config, instance)
    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0"),
                           expires_in=timedelta(hours=1), requested_by="a scientist")
    run(config, instance)
    old = config.resolve_root("sites/ramses/processing")
    new = config.resolve_root("disks/ramses-processing-2")
    staged = files_under(old / name)
    assert len(staged) == 2
    disk_copied(old, new, "cp -a")
    shutil.rmtree(old)
    config = moved(config, "ramses", "processing", "disks/ramses-processing-2")
    assert run_cli("--config", str(config.path), "migrate") == 0
    with opsdb.session() as session:
        said = diagnose(session, config, name, utcnow())
    assert [s.state for s in said] == ["active", "done"], said  # nothing read as changed
    reads = rehashes_before_unlink(monkeypatch)
    release(opsdb, name)
    assert run(config, instance, in_process=True).failed == []
    assert files_under(new) == [] and not old.exists()  # deleted at the new root
    assert reads == []  # each known by its identity, none read again
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
