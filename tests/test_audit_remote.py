"""The audit on remote locations (over a real sshd, one round trip per location and batch, not
per file), and the fixity scrub when the pipeline is driven by `ccat-dt drive` alone."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.storage as storage
from ccat_assets.cli import main
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import DriveReport, drive, tick_due_schedules
from ccat_dt.audit import audit
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    PackageCopy,
    PhysicalCopy,
    Site,
)
from ccat_dt.transports.remote import CompletedRun
from tests.helpers import flip_byte, observe
from tests.sshd import SshServer
from tests.test_multisite import multisite


def lta_copies(opsdb: OpsDB, site: str) -> list[tuple[int, str, Path]]:
    """(copy id, package name, path) of a site's PRESENT LTA copies, oldest first."""
    with opsdb.session() as session:
        rows = session.execute(
            select(PackageCopy.id, PackageCopy.package_id, DataLocation.root,
                   PackageCopy.relative_path).join(DataLocation).join(Site)
            .where(Site.short_name == site, PackageCopy.status == CopyStatus.PRESENT,
                   DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            .order_by(PackageCopy.id)).all()
    return [(copy_id, str(package), Path(root) / rel) for copy_id, package, root, rel in rows]


def status(opsdb: OpsDB, copy_id: int) -> CopyStatus:
    with opsdb.session() as session:
        return session.get_one(PhysicalCopy, copy_id).status


def count_ssh(monkeypatch: pytest.MonkeyPatch) -> list[Sequence[str]]:
    """Every command storage runs (the audit reaches remote hosts only through storage)."""
    calls: list[Sequence[str]] = []
    real = storage.run

    def counting(argv: Sequence[str], **kwargs: Any) -> CompletedRun:
        calls.append(argv)
        return real(argv, **kwargs)

    monkeypatch.setattr(storage, "run", counting)
    return calls


def per_root(calls: list[Sequence[str]], roots: Sequence[str]) -> Counter[str]:
    """How many ssh commands named each location root (the remote command is the last word)."""
    return Counter(root for argv in calls for root in roots
                   if root in shlex.split(argv[-1]))


def test_remote_corruption_loss_and_dark_file_found_and_repaired(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = multisite(tmp_path, sshd)
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=2)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    with opsdb.session() as session:
        remote = session.scalars(select(DataLocation.root).where(
            DataLocation.host.is_not(None))).all()
    assert all(len(lta_copies(opsdb, site)) == 2 for site in ("cologne", "us"))
    calls = count_ssh(monkeypatch)
    clean = audit(opsdb, checksums=True, config=config)
    assert clean.findings == [] and clean.checked_copies >= 4
    # one listing and one hash batch per location: per file it would be 1 + 2 per LTA root
    assert len(calls) == sum(per_root(calls, remote).values())
    assert max(per_root(calls, remote).values()) == 2 and len(calls) <= 2 * len(remote)

    [(changed_id, changed_pkg, changed), _] = lta_copies(opsdb, "cologne")
    [lost_id, lost_pkg, lost] = next(c for c in lta_copies(opsdb, "us") if c[1] != changed_pkg)
    assert changed.is_relative_to(sshd.root)  # "remote": reached only over ssh by the audit
    flip_byte(changed)  # same size: only the checksum sees it
    lost.unlink()
    dark = lost.parent / "stranger.dat"
    dark.write_bytes(b"not ours")

    calls.clear()
    sizes_only = audit(opsdb, config=config)
    assert sorted(f.kind for f in sizes_only.problems) == ["dark", "lost"]
    assert per_root(calls, remote) == Counter(remote)  # one listing each, whatever the files
    calls.clear()
    report = audit(opsdb, checksums=True, config=config)
    assert sorted((f.kind, f.copy_id, f.path) for f in report.findings) == [
        ("changed", changed_id, str(changed)), ("dark", None, str(dark)),
        ("lost", lost_id, str(lost))]
    assert "xxh3_128 on disk" in next(f for f in report.findings if f.kind == "changed").detail
    assert max(per_root(calls, remote).values()) <= 2 and len(calls) <= 2 * len(remote)
    assert status(opsdb, changed_id) == status(opsdb, lost_id) == CopyStatus.PRESENT

    path = str(config.path)
    with pytest.raises(SystemExit) as exited:
        main(["--config", path, "audit", "--checksums", "--repair"])
    assert exited.value.code == 1
    assert status(opsdb, changed_id) == status(opsdb, lost_id) == CopyStatus.CORRUPT
    assert dark.read_bytes() == b"not ours"  # dark files are only reported

    report_drive = drive(defs, instance)  # the repair sensor copies from the other archive
    assert any(key.startswith("repair:") for key in report_drive.launched)
    assert report_drive.failed == []
    with pytest.raises(SystemExit) as exited:
        main(["--config", path, "audit", "--checksums"])
    assert exited.value.code == 1  # the dark file is still there
    after = audit(opsdb, checksums=True, config=config)
    assert [(f.kind, f.path) for f in after.findings] == [("dark", str(dark))]
    assert {pkg for _, pkg, _ in lta_copies(opsdb, "cologne")} >= {changed_pkg}
    assert {pkg for _, pkg, _ in lta_copies(opsdb, "us")} >= {lost_pkg}
    dark.unlink()
    capsys.readouterr()
    main(["--config", path, "audit", "--checksums"])  # clean: exits 0 (returns)
    assert " 0 problem(s)" in capsys.readouterr().out

    (changed.parent.parent / storage.MARKER).unlink()  # as if another disk were mounted
    # us/lta's host down for good: in the configuration and OpsDB alike (they must agree)
    settings = yaml.safe_load(config.path.read_text())
    next(location for site in settings["sites"] if site["short_name"] == "us"
         for location in site["locations"] if location["name"] == "lta")["host"] = (
        "unreachable.invalid")
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    with opsdb.session() as session:
        us_lta = session.scalars(select(DataLocation).join(Site).where(
            Site.short_name == "us", DataLocation.name == "lta")).one()
        us_lta.host = "unreachable.invalid"
    with pytest.raises(SystemExit) as exited:
        main(["--config", path, "audit", "--repair"])
    assert exited.value.code == 1
    out = capsys.readouterr().out
    assert "not audited on unreachable.invalid" in out and " 0 problem(s)" in out
    assert "cologne/lta" in out and "marker" in out
    assert all(status(opsdb, c) == CopyStatus.PRESENT for c, _, _ in lta_copies(opsdb, "us"))
    opsdb.dispose()




def test_scrub_runs_under_drive_when_due(config: Config, opsdb: OpsDB,
                                        instance: DagsterInstance,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """No daemon: `ccat-dt drive` ticks the fixity scrub when its hourly tick is due."""
    observe(config, opsdb, observations=1, files=1)
    monkeypatch.setenv("DAGSTER_HOME", instance.root_directory)  # `ccat-dt drive` opens it
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []  # the lifecycle; schedules not ticked
    [(bad_id, _, path), *_] = lta_copies(opsdb, "us")
    flip_byte(path)

    main(["--config", str(config.path), "drive"])  # the scrub never ran here: due at once

    assert status(opsdb, bad_id) == CopyStatus.DELETED  # found corrupt, replaced
    assert len(lta_copies(opsdb, "us")) == 2
    runs = {run.tags.get("dagster/run_key", "") for run in instance.get_runs()}
    assert any(key.startswith("scrub:") for key in runs)
    assert any(key.startswith("repair:") for key in runs)
    assert audit(opsdb, checksums=True, config=config).findings == []

    later = DriveReport()
    assert tick_due_schedules(defs, instance, later) == []  # this hour's tick is done
    assert later.launched == []
    next_hour = datetime.now(UTC) + timedelta(hours=1)
    assert tick_due_schedules(defs, instance, later, now=next_hour) == ["fixity_scrub"]
    assert [key.split(":")[0] for key in later.launched] == ["scrub", "scrub"]
    assert later.failed == []
