"""The disks behind configured roots change while packages are held for retention (two disks
mounted at each other's mount point, two roots swapped in the configuration, a disk not
mounted when `ccat-dt migrate` runs); then the pipeline runs again, and the storage is read.
Each root's marker names its location: nothing is deleted at a root holding another
location's marker, `migrate` refuses such roots, and leaves an empty mount point unmarked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance

from ccat_dt.config import Config, load_config
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import run
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import (  # noqa: F401
    archived_with_sources,
    kept,
    retention_in_place,
)
from tests.helpers import run_cli


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
