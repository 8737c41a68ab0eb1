"""Policies and routes the operator changes on a running deployment: an earlier, proper
deletion stays proper when `required_lta_copies` is raised later (a certificate is judged by
the policy it was decided under), and a route's lowered `max_concurrent` is not silently
ignored by `migrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterInstance

from ccat_dt.config import Config, load_config
from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.reaper import certificate_problems
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import deployment, observe, package_names, run
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import _sites
from tests.helpers import run_cli
from tests.test_archive_site_added import add_archive_site


def edit(config: Config, change: Any) -> Config:
    settings = yaml.safe_load(config.path.read_text())
    change(settings)
    config.path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config.path)


def test_required_copies_raised_after_a_purge_leaves_its_certificates_proper(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """Purged under `required_lta_copies: 2`; then a third archive site and 3 required. The
    third copy is made; the earlier deletions, each certified by the two copies then
    required, stay proper (before, every one was reported uncertified, the
    `deletion_certificates` check red for good)."""
    config = deployment(tmp_path / "d", sites=_sites(0))
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, files=2)
    run(config, instance)
    assert_safe(config, opsdb)

    config = add_archive_site(config, "third", required_lta_copies=3)
    run(config, instance)

    assert lost_filed_files(config, opsdb) == []
    assert [certificate_problems(opsdb, config, p) for p in package_names(opsdb)] == [[]]
    assert len(list(config.resolve_root("sites/third/lta").rglob("*.tar"))) == 1  # the disk
    assert_safe(config, opsdb)


def test_a_lowered_max_concurrent_is_told_by_migrate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run limits per link live in the instance's dagster.yaml, which `init` writes: a
    route's `max_concurrent` lowered afterwards is not applied by `migrate`, which says so
    and what to run; after `init` the limit is there and `migrate` is quiet."""
    assert run_cli("init", str(tmp_path / "dep")) == 0
    path = tmp_path / "dep" / CONFIG_NAME
    config = edit(load_config(path), lambda s: s["routes"][0].__setitem__("max_concurrent", 1))
    capsys.readouterr()

    assert run_cli("--config", str(path), "migrate") == 0
    assert "routes[].max_concurrent" in capsys.readouterr().err

    assert run_cli("init", str(tmp_path / "dep")) == 0
    home = tmp_path / "dep" / "dagster_home"
    limits = yaml.safe_load((home / "dagster.yaml").read_text())["concurrency"]["runs"][
        "tag_concurrency_limits"]
    assert [limit["limit"] for limit in limits
            if limit["value"] == config.settings.routes[0].link] == [1]
    capsys.readouterr()
    assert run_cli("--config", str(path), "migrate") == 0
    assert "routes[].max_concurrent" not in capsys.readouterr().err
