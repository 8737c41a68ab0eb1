"""Packages archived long ago still get what an archive needs: an archive site added to a
running deployment receives every package archived before it was there, and an LTA copy of
a package whose partition was retired is repaired when found corrupt, by the sensors or by
`ccat-dt retry`. Checked on the disks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from dagster import DagsterInstance

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.retry import operator_retry
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config, load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import RawDataPackage
from tests.helpers import observe, rot_an_lta_copy, run_cli
from tests.test_retire import deployment_retiring_at_once


def archived_and_retired(tmp_path: Path, instance: DagsterInstance,
                         observations: int) -> tuple[Config, OpsDB, dict[str, str]]:
    """The embedded default driven to the end, every package's partition retired: its
    packages' names and checksums."""
    config, opsdb = deployment_retiring_at_once(tmp_path)
    observe(config, opsdb, observations=observations, files=1)
    assert drive(build_definitions(config), instance).failed == []
    assert instance.get_dynamic_partitions("packages") == []
    with opsdb.session() as session:
        packages = {p.name: p.checksum or "" for p in session.query(RawDataPackage)}
    assert packages and all(packages.values())
    return config, opsdb, packages


def tars_below(root: Path) -> dict[str, str]:
    """Every file below a location root but its marker: name -> xxh3-128 read now."""
    return {path.name: hash_file(path)[0] for path in sorted(root.rglob("*"))
            if path.is_file() and not path.name.startswith(".ccat-dt")}


def add_archive_site(config: Config, name: str, **policies: Any) -> Config:
    """What an operator does: the site, its buffer and LTA, and routes to and from every
    other archive in the configuration file (and `policies` changed with it); then
    `ccat-dt migrate`."""
    settings = yaml.safe_load(config.path.read_text())
    settings["policies"].update(policies)
    archives = [site.short_name for site in config.settings.archive_sites]
    settings["sites"].append({"short_name": name, "name": name.title(), "locations": [
        {"name": "buffer", "type": "buffer", "root": f"sites/{name}/buffer"},
        {"name": "lta", "type": "long_term_archive", "root": f"sites/{name}/lta"}]})
    settings["routes"] += [{"origin": config.settings.observatory, "destination": name,
                            "transport": "local", "cost": 10}]
    settings["routes"] += [{"origin": a, "destination": b, "transport": "local", "cost": 3}
                           for other in archives for a, b in ((other, name), (name, other))]
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert run_cli("--config", str(config.path), "migrate") == 0
    return load_config(config.path)


def test_an_archive_site_added_later_receives_every_archived_package(
        tmp_path: Path, instance: DagsterInstance) -> None:
    config, _, packages = archived_and_retired(tmp_path, instance, observations=2)

    config = add_archive_site(config, "bonn", sensor_page_rows=1)  # a tick seeds one package
    report = drive(build_definitions(config), instance)

    assert tars_below(config.resolve_root("sites/bonn/lta")) == {
        f"{name}.tar": checksum for name, checksum in packages.items()}
    assert tars_below(config.resolve_root("sites/bonn/buffer")) == {}  # purged once archived
    for site in ("cologne", "us"):  # the archives it came from keep theirs
        assert len(tars_below(config.resolve_root(f"sites/{site}/lta"))) == len(packages)
    assert report.failed == [] and report.sensor_failures == {}
    assert drive(build_definitions(config), instance).launched == []
    # retired again, finished (the retire sensor goes through the live partitions in turn)
    assert instance.get_dynamic_partitions("packages") == []


def test_a_corrupt_lta_copy_of_a_retired_package_is_repaired(
        tmp_path: Path, instance: DagsterInstance) -> None:
    config, opsdb, packages = archived_and_retired(tmp_path, instance, observations=1)
    bad = rot_an_lta_copy(opsdb, "cologne")
    path = Path(bad.location.root) / bad.relative_path
    assert hash_file(path)[0] != packages[bad.package.name]
    run_cli("--config", str(config.path), "audit", "--checksums", "--repair")

    report = drive(build_definitions(config), instance)

    assert hash_file(path)[0] == packages[bad.package.name]
    assert tars_below(config.resolve_root("sites/cologne/buffer")) == {}
    assert report.failed == [] and report.sensor_failures == {}
    assert instance.get_dynamic_partitions("packages") == []


def test_ccat_dt_retry_of_a_package_whose_partition_was_retired(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The operator's retry (before any sensor ran) brings the partition back too, and its
    run lines name the stage, package and site it retried."""
    config, opsdb, packages = archived_and_retired(tmp_path, instance, observations=1)
    bad = rot_an_lta_copy(opsdb, "cologne")
    path = Path(bad.location.root) / bad.relative_path
    run_cli("--config", str(config.path), "audit", "--checksums", "--repair")

    retried, report = operator_retry(config, instance, opsdb, packages=[bad.package.name])

    assert hash_file(path)[0] == packages[bad.package.name]
    assert report.failed == []
    assert [item.site for item in retried] == ["cologne"]
    assert any(key.startswith(f"site_copy:{bad.package.name}:cologne:retry-")
               for key in report.launched), report.launched


def test_an_archive_site_added_while_the_nearest_archive_disk_is_unmounted_is_fed_from_another(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """A third archive site is added while the LTA disk of the archive that would feed it
    (the cheapest route) is unmounted, its mount point bare: the new site receives every
    package from the other archive's LTA copies, with no person; the unmounted archive's
    copies are not judged (PRESENT, their tars untouched once the disk is back) and the new
    site's locations are not marked failing. Before: every attempt read the unmounted disk
    again (a "source missing", its re-read "not re-read"), the other archive's copy never."""
    from sqlalchemy import select

    from ccat_dt.opsdb.models import CopyStatus, DataLocation, PackageCopy, Site
    from ccat_dt.routing import nearest_lta_copy

    config, opsdb, packages = archived_and_retired(tmp_path, instance, observations=2)
    config = add_archive_site(config, "bonn", retry_backoff_first_s=0.5)
    settings = yaml.safe_load(config.path.read_text())
    for route in settings["routes"]:  # Cologne is the nearest archive to Bonn
        if (route["origin"], route["destination"]) == ("cologne", "bonn"):
            route["cost"] = 1
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    config = load_config(config.path)
    with opsdb.session() as session:
        nearest = {copy.location.site.short_name for p in session.scalars(
            select(RawDataPackage)) if (copy := nearest_lta_copy(session, config, p, "bonn"))}
    assert nearest == {"cologne"}
    down = "cologne"
    disk = config.resolve_root(f"sites/{down}/lta")
    before = tars_below(disk)
    disk.rename(disk.with_name("lta-unmounted"))
    disk.mkdir()

    report = drive(build_definitions(config), instance, wait_s=30)

    # The first attempt of each may fail on the unmounted disk; its re-attempt reads the other.
    assert all(k.startswith(("seed:", "reattempt:")) for k in report.failed), report.failed
    assert tars_below(config.resolve_root("sites/bonn/lta")) == {
        f"{name}.tar": checksum for name, checksum in packages.items()}  # the new disk
    disk.rmdir()
    disk.with_name("lta-unmounted").rename(disk)
    assert tars_below(disk) == before  # the unmounted archive's copies, untouched
    with opsdb.session() as session:
        statuses = {c.status for c in session.scalars(select(PackageCopy).join(DataLocation)
                                                      .join(Site).where(Site.short_name == down))
                    if c.location.name == "lta"}
        assert statuses == {CopyStatus.PRESENT}
        assert [loc.label for loc in session.scalars(select(DataLocation).join(Site).where(
            Site.short_name == "bonn", DataLocation.failing_since.is_not(None)))] == []
