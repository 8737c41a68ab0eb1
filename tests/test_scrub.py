"""Fixity scrub and repair: a byte flipped in an LTA copy is found by the scheduled re-read,
the copy is marked bad, a new copy is made from a good one elsewhere, and its check passes."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetCheckKey, AssetKey, DagsterInstance
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import CopyStatus
from tests.helpers import lta_copies_at, observe, rot_an_lta_copy

LTA_CHECK = AssetCheckKey(AssetKey("lta_copies"), "lta_copy_checksum")


def test_scrub_finds_a_flipped_byte_and_repair_restores_the_copy(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:  # noqa: F811
    observe(config, opsdb, observations=1, files=1)
    defs = build_definitions(config)
    assert drive(defs, instance).failed == []
    bad = rot_an_lta_copy(opsdb, "us")

    report = drive(defs, instance, schedules=True)  # the hourly scrub, then what follows

    scrubs = [key for key in report.launched if key.startswith("scrub:")]
    repairs = [key for key in report.launched if key.startswith("repair:")]
    assert scrubs and repairs and report.failed == []
    history = instance.event_log_storage.get_asset_check_execution_history(LTA_CHECK, limit=50)
    assert any(r.status == AssetCheckExecutionRecordStatus.FAILED for r in history)
    assert history[0].status == AssetCheckExecutionRecordStatus.SUCCEEDED  # newest: repaired
    us = lta_copies_at(opsdb, "us")
    old = next(c for c in us if c.id == bad.id)
    assert old.status == CopyStatus.DELETED  # the bad copy was replaced, never used as source
    [new] = [c for c in us if c.status == CopyStatus.PRESENT and c.package_id == bad.package_id]
    assert new.id > bad.id and new.is_verified
    assert hash_file(Path(new.location.root) / new.relative_path)[0] == new.package.checksum
    cologne = [c for c in lta_copies_at(opsdb, "cologne") if c.status == CopyStatus.PRESENT]
    assert len(cologne) == 2 and all(c.is_verified for c in cologne)
