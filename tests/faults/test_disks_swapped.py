"""The disks behind configured roots change while packages are held for retention (two disks
mounted at each other's mount point, two roots swapped in the configuration, a disk not
mounted when `ccat-dt migrate` runs); then the pipeline runs again, and the storage is read.
Each root's marker names its location: nothing is deleted at a root holding another
location's marker, `migrate` refuses such roots, and leaves an empty mount point unmarked.
The same for roots on an archive host (reached over a real sshd) and for a bucket and prefix
(a real S3 server): nothing is written to, counted at or deleted from another location's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt.config import Config, load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.marker import LABEL, MARKER, MARKER_TEXT, marked_label
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation
from ccat_dt.storage import files_under
from ccat_dt.topology import TopologyDrift, prepare_opsdb
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import observe, package_names, run
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import (  # noqa: F401
    KEEP,
    archived_with_sources,
    kept,
    retention_in_place,
)
from tests.helpers import run_cli
from tests.s3server import S3Server, s3, s3server  # noqa: F401 - fixtures
from tests.sshd import SshServer
from tests.test_multisite import multisite
from tests.test_s3 import PREFIX, s3_deployment


def _swap(a: Path, b: Path) -> None:
    scratch = a.with_name(a.name + ".swap")
    a.rename(scratch)
    b.rename(a)
    scratch.rename(b)


def _swap_roots_in_config(config: Config, site: str, x: str, y: str) -> Config:
    settings = yaml.safe_load(config.path.read_text())
    [entry] = [s for s in settings["sites"] if s["short_name"] == site]
    by_name = {loc["name"]: loc for loc in entry["locations"]}
    by_name[x]["root"], by_name[y]["root"] = by_name[y]["root"], by_name[x]["root"]
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


@pytest.mark.parametrize("how", ["disks mounted at each other's mount point",
                                 "roots swapped in the configuration, then migrate"])
def test_cologne_buffer_and_lta_roots_swapped_during_retention(
        kept: Config, instance: DagsterInstance, how: str) -> None:  # noqa: F811
    """Cologne's buffer and LTA disks trade places during the retention: the purge of the
    buffer copy would find the LTA disk's tar at the buffer copy's path, with the right bytes,
    and delete it. It is refused (the marker names cologne/lta); `migrate` refuses the swapped
    roots (exit 2, nothing changed)."""
    opsdb, package, files = archived_with_sources(kept, instance)
    buffer, lta = kept.resolve_root("sites/cologne/buffer"), kept.resolve_root("sites/cologne/lta")
    [lta_tar] = lta.rglob(f"{package}.tar")
    assert list(buffer.rglob(f"{package}.tar"))  # the buffer copy is held for retention

    if how.startswith("disks"):
        _swap(buffer, lta)  # e.g. /dev/sdb and /dev/sdc swapped after a reboot
        config = retention_in_place(kept, 0)
        run(config, instance)
        # No deletion relied on the buffer disk's tar as Cologne's LTA copy: sources kept.
        assert all(p.is_file() for p in files)
        _swap(buffer, lta)  # the operator notices and mounts them right again
    else:
        config = _swap_roots_in_config(kept, "cologne", "buffer", "lta")
        assert run_cli("--config", str(config.path), "migrate") == 2  # refused
        config = retention_in_place(config, 0)
        run(config, instance)
        config = _swap_roots_in_config(config, "cologne", "buffer", "lta")  # typo fixed
        assert run_cli("--config", str(config.path), "migrate") == 0

    assert lost_filed_files(config, opsdb) == []
    # Cologne's verified LTA copy must still be on Cologne's archive disk: the purge of the
    # Cologne buffer copy must not have deleted it.
    assert lta_tar.is_file(), "the purge of the buffer copy deleted Cologne's LTA tar"
    assert_safe(config, opsdb)


def test_migrate_does_not_mark_the_empty_mount_point_of_a_location_holding_copies(
        kept: Config, instance: DagsterInstance) -> None:  # noqa: F811
    """`ccat-dt migrate` is run for an edit elsewhere (an archive site added, a schema upgrade)
    while Cologne's LTA disk is not mounted: its mount point must stay unmarked, so that
    nothing is written to, counted or deleted there until the disk is back."""
    opsdb, package, files = archived_with_sources(kept, instance)
    lta = kept.resolve_root("sites/cologne/lta")
    disk = lta.with_name("lta.unmounted")
    lta.rename(disk)
    lta.mkdir()  # the empty mount point

    assert run_cli("--config", str(kept.path), "migrate") == 0
    config = retention_in_place(kept, 0)
    run(config, instance)
    written = sorted(str(p.relative_to(lta)) for p in lta.rglob("*"))

    lta.rmdir() if not written else None
    assert written == [], "written onto the root filesystem under the mount point"


def _root(config: Config, label: str) -> Path:
    """A location's root; an archive host's is reached here directly (the test's sshd runs
    on this machine), by the pipeline only over ssh."""
    site, name = label.split("/")
    return Path(config.location_root(config.location(site, name)))


def _told(opsdb: OpsDB, label: str) -> str:
    """Why the location is passed over (what `ccat-dt why` and the notices show)."""
    with opsdb.session() as session:
        return next(loc.unhealthy_reason or "" for loc in session.scalars(select(DataLocation))
                    if loc.label == label)


@pytest.mark.parametrize("how", ["disks mounted at each other's mount point",
                                 "roots swapped in the configuration, then migrate"])
def test_remote_buffer_and_lta_roots_swapped_during_retention(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        capsys: pytest.CaptureFixture[str], how: str) -> None:
    """As test_cologne_buffer_and_lta_roots_swapped_during_retention, with Cologne's disks on
    its archive host (looked at, re-checked and deleted from over ssh): the purge of the
    buffer copy must not delete Cologne's LTA tar, nor count it as the buffer's."""
    config = retention_in_place(multisite(tmp_path, sshd), KEEP)
    opsdb = OpsDB(config.opsdb_url)
    try:
        files = observe(config, opsdb, files=2, size=100_000)
        run(config, instance)
        [package] = package_names(opsdb)
        buffer, lta = _root(config, "cologne/buffer"), _root(config, "cologne/lta")
        [lta_tar] = lta.rglob(f"{package}.tar")
        assert list(buffer.rglob(f"{package}.tar"))  # the buffer copy is held for retention

        if how.startswith("disks"):
            _swap(buffer, lta)
            config = retention_in_place(config, 0)
            run(config, instance, wait_s=0)
            capsys.readouterr()
            run_cli("--config", str(config.path), "why", package)
            told = capsys.readouterr().out
            _swap(buffer, lta)
            assert lta_tar.is_file(), "the purge of the buffer copy deleted Cologne's LTA tar"
            assert ("of cologne/lta holds the marker of location cologne/buffer: another "
                    "location's disk is mounted there") in told
        else:
            config = _swap_roots_in_config(config, "cologne", "buffer", "lta")
            assert run_cli("--config", str(config.path), "migrate") == 2  # refused
            config = retention_in_place(config, 0)
            run(config, instance, wait_s=0)
            config = _swap_roots_in_config(config, "cologne", "buffer", "lta")  # typo fixed
            assert run_cli("--config", str(config.path), "migrate") == 0

        assert lta_tar.is_file(), "the purge of the buffer copy deleted Cologne's LTA tar"
        assert all(p.is_file() for p in files)  # no deletion relied on the swapped disks
        assert lost_filed_files(config, opsdb) == []
    finally:
        opsdb.dispose()


def test_nothing_is_archived_onto_remote_archive_disks_swapped_between_sites(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance) -> None:
    """Cologne's and Cornell's archive disks trade places before anything is archived (each
    host's LTA mount point holds the other site's disk): no transfer writes onto either,
    and each location is reported with the marker it found."""
    config = multisite(tmp_path, sshd)
    cologne, us = _root(config, "cologne/lta"), _root(config, "us/lta")
    _swap(cologne, us)
    opsdb = OpsDB(config.opsdb_url)
    try:
        files = observe(config, opsdb, files=2, size=100_000)
        run(config, instance, wait_s=0)

        assert files_under(cologne) == [] and files_under(us) == []  # the storage itself
        assert all(p.is_file() for p in files)
        told = {label: _told(opsdb, label) for label in ("cologne/lta", "us/lta")}
        assert any(f"of {label} holds the marker of location {other}" in told[label]
                   for label, other in (("cologne/lta", "us/lta"), ("us/lta", "cologne/lta"))
                   ), told
    finally:
        opsdb.dispose()


def test_a_bucket_prefix_marked_for_another_location_is_neither_written_nor_counted(
        tmp_path: Path, s3: S3Server, instance: DagsterInstance) -> None:  # noqa: F811
    """Cologne's LTA bucket and prefix hold another location's marker (Cornell's archive
    prefix, configured as Cologne's by mistake): `migrate` refuses it and leaves the marker
    alone; nothing is uploaded there, and the sources stay (one archive copy is not two)."""
    bucket = s3.new_bucket()
    config = s3_deployment(tmp_path / "deploy", s3.url, bucket)
    client, key = s3.client(), f"{PREFIX}/{MARKER}"
    cornell = f"{MARKER_TEXT}{LABEL}us/lta\n".encode()  # the marker `init` writes for us/lta
    client.put_object(Bucket=bucket, Key=key, Body=cornell)

    assert run_cli("--config", str(config.path), "migrate") == 2  # refused
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == cornell
    opsdb = OpsDB(config.opsdb_url)
    try:
        files = observe(config, opsdb, files=2, size=100_000)
        run(config, instance, wait_s=0)

        keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys == [key]  # the bucket itself: nothing written there
        assert all(p.is_file() for p in files)
        assert "holds the marker of location us/lta" in _told(opsdb, "cologne/lta")
    finally:
        opsdb.dispose()


@pytest.mark.parametrize("shared", [
    ("us/lta", "cologne/lta"),  # an archive over ssh on the other archive's directory
    ("cologne/lta", "cologne/buffer"),  # a site's archive over ssh on its own buffer
])
def test_a_root_reached_under_another_host_name_is_refused(
        tmp_path: Path, sshd: SshServer, shared: tuple[str, str]) -> None:
    """One machine under two names: a location configured on `user@127.0.0.1:DIR` where DIR
    is another location's local root. Before, the buffer's tar found at the archive path was
    recorded as the archive copy, and the purge deleted that one file as the buffer copy
    (found by a helper: every filed byte gone while OpsDB showed two archive copies).
    `init`/`migrate` refuse it, keeping the first location's marker and changing no record."""
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    (site, name), (other_site, other_name) = (label.split("/") for label in shared)
    [location] = [loc for s in settings["sites"] if s["short_name"] == site  # type: ignore
                  for loc in s["locations"] if loc["name"] == name]
    location["host"] = sshd.destination
    location["root"] = str(tmp_path / "deploy" / "sites" / other_site / other_name)
    for route in settings["routes"]:  # type: ignore[attr-defined]
        route["transport"] = "rsync"
    ssh = sshd.ssh
    settings["ssh"] = {"port": ssh.port, "identity_file": ssh.identity_file,
                       "known_hosts_file": ssh.known_hosts_file}
    config = load_config(write_default_config(tmp_path / "deploy", overrides=settings))

    with pytest.raises(TopologyDrift, match=f"location {shared[0]}: .* is the root of "
                                            f"location {shared[1]} under another name"):
        prepare_opsdb(config)
    assert marked_label(Path(location["root"])) == shared[1]
    assert run_cli("--config", str(config.path), "migrate") == 2
    with OpsDB(config.opsdb_url).session() as session:
        assert session.scalars(select(DataLocation)).all() == []


def test_migrate_names_the_location_in_an_archive_hosts_older_marker(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance) -> None:
    """A deployment from before markers named their location: `migrate` gives a remote root
    holding copies its name (the swapped-disk checks need it), and still leaves a held
    root without any marker (an empty mount point on the archive host) unmarked."""
    config = multisite(tmp_path, sshd)
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, files=1, size=10_000)
        run(config, instance)
    finally:
        opsdb.dispose()
    older, unmounted = _root(config, "cologne/lta"), _root(config, "us/lta")
    (older / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    (unmounted / MARKER).unlink()

    assert run_cli("--config", str(config.path), "migrate") == 0
    assert marked_label(older) == "cologne/lta"
    assert not (unmounted / MARKER).exists()
