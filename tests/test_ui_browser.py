"""What a person sees: after a small lifecycle on the embedded instance, `dagster-webserver`
shows our five lifecycle assets in the asset graph with their checks passed, in a real
(headless) Chromium. Screenshots are left in $CCAT_TEST_ARTIFACTS (default: tmp_path)."""

from __future__ import annotations

import re
import shutil
import urllib.parse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import BetaWarning, DagsterInstance, PreviewWarning

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from tests.browser import (
    DISMISS_COMMUNITY_MODAL,
    REPO,
    Webserver,
    artifacts_dir,
    dagster_webserver,
    launch_browser,
)
from tests.browser import chromium as chromium_fixture  # noqa: F401
from tests.helpers import observe

if TYPE_CHECKING:
    from playwright.sync_api import Page

warnings.filterwarnings("ignore", category=PreviewWarning)
warnings.filterwarnings("ignore", category=BetaWarning)

# asset -> its check, in lineage order; the graph must show every one of them
LIFECYCLE = {"raw_files": "raw_files_present", "packages": "package_checksum",
             "site_copies": "site_copy_checksum", "lta_copies": "lta_copy_checksum",
             "purge_status": "deletion_certificates"}
GROUP = "lifecycle"
TIMEOUT_MS = 20_000  # the graph and its live data (check results) render asynchronously
ALL_CHECKS_PASSED = re.compile(r"Asset checks\s*(\d+) / \1 Passed")  # e.g. "1 / 1 Passed"


def run_small_lifecycle(config: Config, opsdb: OpsDB) -> Path:
    """One observation, two packages, driven to the archives; returns the instance home."""
    observe(config, opsdb, observations=1, files=1)
    home = config.directory / "dagster_home"  # not $DAGSTER_HOME: `make test` exports the demo's
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        report = drive(build_definitions(config), instance)
    assert report.failed == []
    assert len(report.launched) >= 8  # package, site copy, LTA copy, purge for each package
    return home


def test_asset_graph_shows_the_lifecycle_assets_and_their_passed_checks(
        config: Config, opsdb: OpsDB, chromium: str, tmp_path: Path) -> None:
    home = run_small_lifecycle(config, opsdb)  # before the browser: see tests.browser.chromium
    artifacts = artifacts_dir(tmp_path)
    with dagster_webserver(home, config.path, tmp_path / "webserver.log") as server, \
            launch_browser(chromium) as browser:
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.add_init_script(DISMISS_COMMUNITY_MODAL)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            check_asset_graph(page, group_url(server, GROUP))
            shot(page, artifacts / "ui_asset_graph.png")
            for asset, check in LIFECYCLE.items():
                check_checks_tab(page, f"{server.url}/assets/{asset}?view=checks", check)
                shot(page, artifacts / f"ui_checks_{asset}.png")
        except Exception:
            shot(page, artifacts / "ui_failure.png")
            shutil.copy(server.log, artifacts / "ui_webserver.log")
            print(f"dagster-webserver log (tail):\n{server.log_tail()}")
            raise
        finally:
            context.close()


def check_asset_graph(page: Page, url: str) -> None:
    """Every lifecycle asset is a visible node of the group's lineage graph, its checks passed."""
    from playwright.sync_api import expect

    page.goto(url)
    for asset in LIFECYCLE:
        # each asset node of the lineage graph is one <foreignObject> in its <svg>
        node = page.locator("foreignObject").filter(has=page.get_by_text(asset, exact=True))
        expect(node).to_have_count(1, timeout=TIMEOUT_MS)
        expect(node.get_by_text(asset, exact=True)).to_be_visible(timeout=TIMEOUT_MS)
        expect(node).to_contain_text(ALL_CHECKS_PASSED, timeout=TIMEOUT_MS)
    expect(page.get_by_role("button", name="Skip")).to_have_count(0)  # no community modal


def check_checks_tab(page: Page, url: str, check: str) -> None:
    """The asset's Checks tab lists `check` as succeeded and shows its latest result passed."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.get_by_text(check, exact=True).first).to_be_visible(timeout=TIMEOUT_MS)
    # .first: an asset with two checks (purge_status) lists two succeeded executions
    expect(page.get_by_text("Succeeded", exact=True).first).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.get_by_text("Failed", exact=True)).to_have_count(0)


def group_url(server: Webserver, group: str) -> str:
    location = urllib.parse.quote(server.location, safe=":")
    return f"{server.url}/locations/{location}/asset-groups/{group}"


def shot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
