"""What a person sees and clicks: after a small lifecycle on the embedded instance,
`dagster-webserver` shows our five lifecycle assets in the asset graph with their checks
passed, and the "Materialize" and backfill buttons, clicked in a real (headless) Chromium with
the daemon running as under `make ui`, converge to the truth; clicked in the middle of a
lifecycle (a damaged archive copy, a package not yet archived everywhere), they delete nothing
unsafely. Screenshots are left in $CCAT_TEST_ARTIFACTS (default: tmp_path)."""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    BetaWarning,
    DagsterEventType,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    PreviewWarning,
    RunsFilter,
)
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.instance import write_instance_yaml
from ccat_assets.runlog import run_failure
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PhysicalCopy,
    RawDataFileCopy,
    RawDataPackage,
    Site,
    utcnow,
)
from ccat_dt.packages import package_path
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
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, deployment, package_names, plan
from tests.faults.pipeline import observe as observe_one
from tests.faults.storage_truth import lost_filed_files
from tests.faults.test_deletion_faults import KEEP, _sites, lta_tar, retention
from tests.helpers import flip_byte, observe
from tests.test_dry_runs import primary
from tests.test_operator_actions import by_hand, check_status, lta_intact, opsdb_state

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
            with operator_page(chromium, server, artifacts / "ui_after_clicks.png") as page:
                materialize(page, server, "lta_copies", {"package": [names[0]],
                                                         "site": ["us"]}, "Launch 1 run")
                materialize(page, server, "site_copies", {"package": "All",
                                                          "site": ["cologne"]},
                            "Launch backfill")
                materialize(page, server, "packages", {"": [names[1]]}, "Launch 1 run")
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



@contextlib.contextmanager
def operator_page(chromium: str, server: Webserver, done: Path) -> Iterator[Page]:
    """A browser page on the webserver, as an operator opens one; a screenshot at `done` when
    the clicks went through, else at ui_failure.png beside it, with the GraphQL requests that
    failed and the webserver log's tail printed."""
    with launch_browser(chromium) as browser:
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.add_init_script(DISMISS_COMMUNITY_MODAL)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        graphql = GraphQLFailures(page)
        try:
            yield page
            shot(page, done)
        except Exception:
            shot(page, done.parent / "ui_failure.png")
            print(f"GraphQL requests that failed: {graphql.describe()}")
            print(f"dagster-webserver log (tail):\n{server.log_tail()}")
            raise
        finally:
            context.close()

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
        if picked == "All":  # a single dimension's buttons are the dialog's only ones
            section = (dialog.get_by_text(dimension, exact=True).locator("xpath=../..")
                       if dimension else dialog)
            section.get_by_role("button", name="All", exact=True).click()
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


def _mid_lifecycle(root: Path) -> tuple[Config, OpsDB, Path, str, str, datetime]:
    """A deployment in the middle of its lifecycle, its sources and buffers kept until the
    operator's edit at the end: obs-0's two packages verified in both archives (sources and
    buffer copies still there), obs-1's one package at the observatory buffer and in its
    primary's archive only; then one of obs-0's LTA copies damaged on disk, OpsDB still saying
    it is verified, and the retention set to 0 (everything archived twice may go now).
    Returns (config, OpsDB, instance home, the damaged package, the half-archived one, when
    the damage was done)."""
    config = deployment(root / "deploy", sites=_sites(KEEP),
                        policies={"retry_backoff_first_s": 1.0,
                                  "retry_backoff_max_hours": 4.0 / 3600})
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb, observations=1, files=1)
    home = config.directory / "dagster_home"
    write_instance_yaml(config, home)
    with DagsterInstance.from_config(str(home)) as instance:
        defs = build_definitions(config)
        assert drive(defs, instance).failed == []
        observe_one(config, opsdb, name="obs-1", files=1, size=20_000)
        half = plan(config, opsdb, instance)
        site = primary(opsdb, half)
        for asset, partition in (("raw_files", half), ("packages", half),
                                 ("site_copies", f"{half}|{site}"),
                                 ("lta_copies", f"{half}|{site}")):
            assert by_hand(defs, instance, asset, partition), (asset, partition)
    damaged = sorted(name for name in package_names(opsdb) if name.startswith("obs-0"))[0]
    tar = lta_tar(config, "us", damaged)
    damaged_at = utcnow()
    flip_byte(tar, tar.stat().st_size // 2, 0x10)
    return retention(config, 0), opsdb, home, damaged, half, damaged_at


def test_clicks_mid_lifecycle_delete_nothing_unsafely_and_the_deployment_converges(
        tmp_path: Path, chromium: str) -> None:
    """Mid-lifecycle (_mid_lifecycle: an LTA copy damaged on disk that OpsDB still calls
    verified, a package archived at one site only), with the daemon running and its sensors
    ticking (they race the clicks for the same work), the operator clicks a backfill of
    purge_status over every package and "Materialize" of the half-archived package's
    site_copies and lta_copies at the site it lacks. On the storage, looked at as the files
    go: no source file or buffer copy is gone whose package was not then in a tar hashing to
    its checksum in every archive it must be in. No deletion certificate counts the damaged
    copy; it is reported (its verification failed; the purges of its package kept everything
    and say why in the UI); a run that could not do its work failed saying why (a deliberate
    Failure, not an exception's traceback). The drive that watches the daemon finish ends
    with everything archived twice (the damaged copy repaired), nothing left at the
    observatory or in a buffer, the audit clean and every check green."""
    config, opsdb, home, damaged, half, damaged_at = _mid_lifecycle(tmp_path)
    missing = ({"cologne", "us"} - {primary(opsdb, half)}).pop()
    kept = _deletable_files(config, opsdb)  # every file a purge may delete, and its package
    artifacts = artifacts_dir(tmp_path)
    with DagsterInstance.from_config(str(home)) as instance:
        runs_before = {r.run_id for r in instance.get_runs()}
        with DeletionWatch(config, opsdb, kept) as watch, \
                dagster_webserver(home, config.path, tmp_path / "webserver.log") as server, \
                dagster_daemon(home, config.path, tmp_path / "daemon.log"):
            with operator_page(chromium, server, artifacts / "ui_mid_lifecycle_clicks.png") as page:
                materialize(page, server, "purge_status", {"": "All"}, "Launch backfill")
                materialize(page, server, "site_copies", {"package": [half],
                                                          "site": [missing]},
                            "Launch 1 run")
                materialize(page, server, "lta_copies", {"package": [half],
                                                         "site": [missing]},
                            "Launch 1 run")
            _wait_for_runs(instance, len(runs_before) + 5, tmp_path / "daemon.log")
            # The drive waits while the daemon ticks the sensors and runs what they ask for,
            # until it has nothing left to do.
            report = drive(build_definitions(config), instance, wait_s=30)
        runs = [r for r in instance.get_runs() if r.run_id not in runs_before]
        clicked = [r for r in runs if not {"dagster/sensor_name", "dagster/schedule_name"}
                   & set(r.tags)]  # not the sensors' nor the hourly scrub's
        print("\n".join(f"{r.status.value:<8} {_selected(r.asset_selection):<13} "
                        f"{r.tags.get('dagster/partition')} {r.tags.get('dagster/sensor_name')}"
                        f" {run_failure(instance, r.run_id)}" for r in reversed(runs)))
        print(f"drive: {report}")
        assert report.sensor_failures == {}
        assert {(_selected(r.asset_selection), r.tags.get("dagster/partition"))
                for r in clicked} == {
            *(("purge_status", name) for name in package_names(opsdb)),
            ("site_copies", f"{half}|{missing}"), ("lta_copies", f"{half}|{missing}")}
        assert [r.run_id for r in runs if r.status not in FINISHED_STATUSES] == []
        assert _unclear_failures(instance, runs) == []
        # ... the storage: nothing deleted that lacks a good copy in every archive
        assert watch.gone, "the purge deleted nothing"
        assert watch.violations() == []
        assert _certified_while_damaged(opsdb, damaged, damaged_at) == []
        # The damaged copy reported: its verification failed, and each purge of its package
        # until the repair shows in the UI what it kept and why.
        assert any("checksum mismatch" in error
                   for error in _failed_verifications(opsdb, damaged, "us"))
        assert any("integrity check failed for us/lta copy" in kept
                   for kept in _purges_kept(instance, damaged)), _purges_kept(instance, damaged)
        follow_up = drive(build_definitions(config), instance)
        assert follow_up.failed == [] and follow_up.launched == []  # nothing left to do
        archived_everywhere(config, opsdb)  # both archives; observatory and buffers empty
        assert _good_archives(config, opsdb, damaged) == {"cologne", "us"}  # repaired
        assert_safe(config, opsdb)  # every byte in a good copy, the audit clean
        assert lost_filed_files(config, opsdb) == []
        for asset, check in LIFECYCLE.items():
            statuses = check_status(instance, asset, check)
            assert statuses and set(statuses.values()) == {"passed"}, (asset, statuses)


def _deletable_files(config: Config, opsdb: OpsDB) -> dict[Path, tuple[str, frozenset[str]]]:
    """Every raw file at its source and package copy in a buffer OpsDB records, on the
    storage now: its path -> its package's name and the archive sites whose LTA copy must be
    good before it may go (an archive site's buffer copy: that site's; at the observatory:
    every archive site's, as `required_lta_copies` asks here)."""
    every = frozenset(site.short_name for site in config.settings.archive_sites)
    with opsdb.session() as session:
        files = {}
        for copy in session.scalars(select(PhysicalCopy).join(DataLocation).where(
                DataLocation.location_type.in_([LocationType.SOURCE, LocationType.BUFFER]))):
            package = (copy.package if isinstance(copy, PackageCopy) else
                       copy.raw_data_file.package if isinstance(copy, RawDataFileCopy) else None)
            assert package is not None, copy
            site = copy.location.site.short_name
            files[Path(copy.location.root) / copy.relative_path] = (
                package.name, frozenset({site}) if site in every else every)
    assert config.settings.required_lta_copies == len(every)
    assert all(path.is_file() for path in files)
    return files


def _good_archives(config: Config, opsdb: OpsDB, package: str) -> set[str]:
    """The archive sites whose LTA tar of `package` hashes, read now, to its checksum."""
    with opsdb.session() as session:
        row = session.scalar(select(RawDataPackage).where(RawDataPackage.name == package))
        assert row is not None and row.checksum is not None
        relative, checksum = package_path(row), row.checksum
    good = set()
    for site in config.settings.archive_sites:
        tar = config.resolve_root(f"sites/{site.short_name}/lta") / relative
        with contextlib.suppress(OSError):
            if tar.is_file() and hash_file(tar)[0] == checksum:
                good.add(site.short_name)
    return good


class DeletionWatch:
    """Looks at the storage while the UI's runs and the daemon's run: a file of `files` seen
    gone, its package's LTA tars are read at once; each gone while its package was not good
    in every archive it must be in is a violation (a repair made after the deletion would
    hide it later)."""

    def __init__(self, config: Config, opsdb: OpsDB,
                 files: dict[Path, tuple[str, frozenset[str]]]) -> None:
        self.config, self.opsdb, self.files = config, opsdb, dict(files)
        self.gone: dict[Path, set[str]] = {}  # each file seen gone -> the good archives then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> DeletionWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._look()

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self._look()

    def _look(self) -> None:
        for path, (package, _) in self.files.items():
            if path not in self.gone and not path.exists():
                self.gone[path] = _good_archives(self.config, self.opsdb, package)

    def violations(self) -> list[str]:
        return [f"{path} deleted while {self.files[path][0]} was good only in {sorted(good)}, "
                f"not in every one of {sorted(self.files[path][1])}"
                for path, good in self.gone.items() if not self.files[path][1] <= good]


def _certified_while_damaged(opsdb: OpsDB, package: str, since: datetime) -> list[str]:
    """Deletions of `package`'s copies whose certificate counts its us LTA copy on a hash
    made before `since` (when that copy was damaged)."""
    found = []
    with opsdb.session() as session:
        for operation in session.scalars(select(Operation).join(
                RawDataPackage, Operation.package_id == RawDataPackage.id).where(
                Operation.operation_type == OperationType.DELETION,
                RawDataPackage.name == package)):
            for copy in (operation.evidence or {}).get("copies", []):
                if copy["site"] == "us" and datetime.fromisoformat(copy["hashed_at"]) < since:
                    found.append(f"operation {operation.id}: {copy}")
    return found


def _failed_verifications(opsdb: OpsDB, package: str, site: str) -> list[str]:
    """The errors of failed verifications of `package`'s LTA copies at `site`."""
    with opsdb.session() as session:
        return [operation.error or "" for operation in session.scalars(
            select(Operation).join(RawDataPackage, Operation.package_id == RawDataPackage.id)
            .join(PhysicalCopy, Operation.copy_id == PhysicalCopy.id)
            .join(DataLocation, PhysicalCopy.location_id == DataLocation.id)
            .join(Site, DataLocation.site_id == Site.id).where(
                Operation.operation_type == OperationType.VERIFICATION,
                Operation.status == OperationStatus.FAILED, RawDataPackage.name == package,
                Site.short_name == site,
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE))]


def _purges_kept(instance: DagsterInstance, package: str) -> list[str]:
    """What each materialization of purge_status for `package` says it kept, and why."""
    records = instance.fetch_materializations(AssetRecordsFilter(
        asset_key=AssetKey("purge_status"), asset_partitions=[package]), limit=100).records
    return [str(record.asset_materialization.metadata["kept"].value)  # type: ignore[union-attr]
            for record in records]


def _unclear_failures(instance: DagsterInstance, runs: list[DagsterRun]) -> list[str]:
    """Failed runs that did not fail saying why: each failed step must have raised a
    deliberate Failure (or failed a blocking check) whose message is the run's failure."""
    unclear = []
    for run in runs:
        if run.status != DagsterRunStatus.FAILURE:
            continue
        said = run_failure(instance, run.run_id)
        steps = [record.dagster_event.step_failure_data for record in instance.all_logs(
            run.run_id, of_type=DagsterEventType.STEP_FAILURE) if record.dagster_event]
        deliberate = steps and all(
            data.user_failure_data is not None
            or (data.error is not None and data.error.cls_name == "DagsterAssetCheckFailedError")
            for data in steps)
        if not said or "Traceback" in said or not deliberate:
            unclear.append(f"{run.run_id} {_selected(run.asset_selection)} "
                           f"{run.tags.get('dagster/partition')}: {said or 'no message'} "
                           f"({[d.error.cls_name if d.error else None for d in steps]})")
    return unclear


def test_a_copy_clicked_before_its_source_is_there_fails_saying_why_and_the_drive_heals_it(
        tmp_path: Path, chromium: str) -> None:
    """A package built, at the observatory only; the operator clicks "Materialize" on its
    site_copies partition at the second archive site (not its primary), which gets its copy
    from the primary's LTA copy, not there yet; no daemon: `ccat-dt drive` executes the queued
    run, then the sensors' runs. The clicked run fails once, nothing copied, saying what it
    waits for (before: only "no verified copy to send to SITE yet", though the observatory
    held a verified tar). Before, the drive also counted that run as a failure no later run
    healed (a NotReady failure was taken for one decided for a person) and `ccat-dt drive`
    exited 1, although its sensors then made that very copy: the package archived at both
    sites, nothing left for anyone. Now the failure is healed by the run that made the copy."""
    config = deployment(tmp_path / "deploy")
    opsdb = OpsDB(config.opsdb_url)
    observe_one(config, opsdb, name="obs-1", files=1, size=20_000)
    home = config.directory / "dagster_home"
    write_instance_yaml(config, home)
    artifacts = artifacts_dir(tmp_path)
    with DagsterInstance.from_config(str(home)) as instance:
        defs = build_definitions(config)
        package = plan(config, opsdb, instance)
        for asset in ("raw_files", "packages"):
            assert by_hand(defs, instance, asset, package), asset
        first = primary(opsdb, package)
        other = ({"cologne", "us"} - {first}).pop()
        runs_before = {r.run_id for r in instance.get_runs()}
        with dagster_webserver(home, config.path, tmp_path / "webserver.log") as server, \
                operator_page(chromium, server, artifacts / "ui_copy_too_early.png") as page:
            materialize(page, server, "site_copies", {"package": [package], "site": [other]},
                        "Launch 1 run")
        [clicked] = [r for r in instance.get_runs() if r.run_id not in runs_before]
        report = drive(defs, instance)
        print(f"drive: {report}")
        clicked = instance.get_run_by_id(clicked.run_id) or clicked
        assert clicked.status == DagsterRunStatus.FAILURE
        said = run_failure(instance, clicked.run_id)
        assert f"no verified copy to send to {other} yet: a package leaves ccat once, for its " \
            f"primary archive site {first}" in said and \
            f"(lta_copies {package}|{first} makes the first); nothing was copied" in said, said
        with opsdb.session() as session:  # the clicked run moved nothing
            assert session.query(Operation).filter(
                Operation.run_id == clicked.run_id).count() == 0
        assert report.failed_ids == [clicked.run_id]
        assert report.unhealed == [] and report.sensor_failures == {}, report
    # The storage: the package's tar in both archives, hashing to its checksum; its source
    # file and every buffer copy gone (purged after archiving); OpsDB agrees.
    assert _good_archives(config, opsdb, package) == {"cologne", "us"}
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    assert [p for p in config.resolve_root("sites/ccat/instruments").rglob("*.dat")] == []
