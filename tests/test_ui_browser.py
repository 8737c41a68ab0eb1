"""What a person sees and clicks: after a small lifecycle on the embedded instance,
`dagster-webserver` shows our five lifecycle assets in the asset graph with their checks
passed, and the "Materialize" and backfill buttons, clicked in a real (headless) Chromium with
the daemon running as under `make ui`, converge to the truth. Screenshots are left in
$CCAT_TEST_ARTIFACTS (default: tmp_path)."""

from __future__ import annotations

import re
import shutil
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import (
    BetaWarning,
    DagsterInstance,
    DagsterRunStatus,
    PreviewWarning,
    RunsFilter,
)
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.instance import write_instance_yaml
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Operation, OperationType
from ccat_dt.report import disagreements
from tests.browser import (
    DISMISS_COMMUNITY_MODAL,
    GraphQLFailures,
    Webserver,
    artifacts_dir,
    dagster_daemon,
    dagster_webserver,
    launch_browser,
)
from tests.browser import chromium as chromium_fixture  # noqa: F401
from tests.helpers import observe
from tests.test_operator_actions import check_status, lta_intact, opsdb_state

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
    write_instance_yaml(config, home)  # as `ccat-dt init` writes it
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


CLICKED_RUNS_TIMEOUT_S = 300.0  # the daemon dequeues, the backfill daemon submits, runs run


def test_materialize_and_backfill_clicked_in_the_ui_converge_to_the_truth(
        config: Config, opsdb: OpsDB, chromium: str, tmp_path: Path) -> None:
    """On a finished lifecycle, an operator clicks "Materialize" on an archived lta_copies
    partition (its buffer copy purged), launches a backfill of site_copies for one site, and
    re-materialises packages for an archived package (its sources purged). With the daemon
    running (it dequeues those runs and ticks the sensors meanwhile): every run succeeds,
    every check is green, OpsDB is unchanged but for new verification records, the archive
    copies on disk still hash to their checksums, and the sensors find nothing to do."""
    home = run_small_lifecycle(config, opsdb)
    before = opsdb_state(opsdb)
    names = sorted(before["packages"])
    verifications = _verifications(opsdb)
    artifacts = artifacts_dir(tmp_path)
    with DagsterInstance.from_config(str(home)) as instance:
        runs_before = len(instance.get_runs())
        with dagster_webserver(home, config.path, tmp_path / "webserver.log") as server, \
                dagster_daemon(home, config.path, tmp_path / "daemon.log"):
            with launch_browser(chromium) as browser:
                context = browser.new_context(viewport={"width": 1600, "height": 1000})
                context.add_init_script(DISMISS_COMMUNITY_MODAL)
                page = context.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                graphql = GraphQLFailures(page)
                try:
                    materialize(page, server, "lta_copies", {"package": [names[0]],
                                                             "site": ["us"]}, "Launch 1 run")
                    materialize(page, server, "site_copies", {"package": "All",
                                                              "site": ["cologne"]},
                                "Launch backfill")
                    materialize(page, server, "packages", {"": [names[1]]}, "Launch 1 run")
                    shot(page, artifacts / "ui_after_clicks.png")
                except Exception:
                    shot(page, artifacts / "ui_failure.png")
                    print(f"GraphQL requests that failed: {graphql.describe()}")
                    print(f"dagster-webserver log (tail):\n{server.log_tail()}")
                    raise
                finally:
                    context.close()
            clicked = 1 + len(names) + 1
            _wait_for_runs(instance, runs_before + clicked, tmp_path / "daemon.log")

        runs = instance.get_runs()
        assert [r.run_id for r in runs if r.status != DagsterRunStatus.SUCCESS] == [], \
            "a clicked run or a run the sensors launched meanwhile failed"
        clicked_runs = {(_selected(r.asset_selection), r.tags.get("dagster/partition"),
                         "dagster/backfill" in r.tags) for r in runs[:len(runs) - runs_before]}
        assert {("lta_copies", f"{names[0]}|us", False), ("packages", names[1], False),
                *{("site_copies", f"{name}|cologne", True) for name in names}} <= clicked_runs
        follow_up = drive(build_definitions(config), instance)
        assert follow_up.failed == [] and follow_up.launched == []  # nothing left to do
        assert opsdb_state(opsdb) == before  # OpsDB unchanged ...
        assert _verifications(opsdb) > verifications  # ... but for the new re-reads
        lta_intact(opsdb)  # the storage: every LTA copy still hashes to its checksum
        assert disagreements(opsdb) == []
        for asset, check in LIFECYCLE.items():
            statuses = check_status(instance, asset, check)
            assert statuses and set(statuses.values()) == {"passed"}, (asset, statuses)


def materialize(page: Page, server: Webserver, asset: str,
                partitions: dict[str, list[str] | str], launch: str) -> None:
    """The asset's "Materialize…" dialog: per partition dimension ("" for a single one), the
    partitions picked from its selector or "All"; then the launch button, named `launch`."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    page.goto(f"{server.url}/assets/{asset}?view=partitions")
    try:
        page.get_by_role("button", name="Materialize…").click()
    except PlaywrightTimeoutError:
        # An "Unexpected GraphQL error" toast over the button (once in a loaded CI run; its
        # cause is printed if the test fails): the operator reloads the page, once.
        if not page.get_by_text("Unexpected GraphQL error").first.is_visible():
            raise
        print(f"{asset}: an 'Unexpected GraphQL error' toast covered the button; reloading")
        page.reload()
        page.get_by_role("button", name="Materialize…").click()
    dialog = page.get_by_role("dialog").first
    for dimension, picked in partitions.items():
        if picked == "All":
            section = dialog.get_by_text(dimension, exact=True).locator("xpath=../..")
            section.get_by_role("button", name="All").click()
            continue
        for value in picked:
            page.get_by_text("Select a partition or create one").first.click()
            menu = page.locator("[data-radix-popper-content-wrapper]").last
            menu.get_by_role("menuitem").filter(has_text=value).first.click()
            page.keyboard.press("Escape")
    button = dialog.get_by_role("button", name=launch, exact=True)
    expect(button).to_be_enabled()
    button.click()
    expect(page.get_by_role("dialog")).to_have_count(0)


def _wait_for_runs(instance: DagsterInstance, count: int, daemon_log: Path) -> None:
    """Until at least `count` runs exist, none of them is queued or running and every
    backfill is done."""
    deadline = time.monotonic() + CLICKED_RUNS_TIMEOUT_S
    while True:
        runs = instance.get_runs()
        busy = instance.get_runs(RunsFilter(statuses=list(NOT_FINISHED_STATUSES)))
        backfills = instance.get_backfills()
        done = all(b.status != BulkActionStatus.REQUESTED for b in backfills)
        if len(runs) >= count and not busy and backfills and done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(runs)}/{count} runs, {len(busy)} unfinished, backfills "
                f"{[b.status for b in backfills]} after {CLICKED_RUNS_TIMEOUT_S:.0f} s; daemon "
                f"log: {daemon_log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)


def _selected(selection: object) -> str:
    keys = sorted(key.to_user_string() for key in selection or ())  # type: ignore[attr-defined]
    return ",".join(keys)


def _verifications(opsdb: OpsDB) -> int:
    with opsdb.session() as session:
        return session.query(Operation).filter(
            Operation.operation_type == OperationType.VERIFICATION).count()
