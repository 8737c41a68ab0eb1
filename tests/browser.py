"""Headless Chromium (Debian's, driven by Playwright) and a throw-away `dagster-webserver`, so
that what the Dagster UI shows a person is tested in a real browser instead of assumed.

Import the fixture into a test module: `from tests.browser import chromium as chromium_fixture`
(with `# noqa: F401`); it is named "chromium" whatever the alias, and the alias keeps ruff from
seeing test arguments as redefinitions (F811). Then `with launch_browser(chromium) as browser:`.

Playwright only drives the system Chromium (`executable_path`); it never downloads a browser
(`playwright install` is not needed and not used).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from dagster import DagsterInstance

from tests.processes import DidNotStart, running
from tests.services import free_port, unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Response

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PACKAGES = ["chromium"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # Playwright gives each launch a fresh user data dir
# `dagster-daemon run`, its backfill daemon looking for work every 2 s instead of every 30 (a
# constant of Dagster's): a backfill's runs, and then its end, are seen in seconds, not a minute.
DAEMON_MAIN = ("import runpy, dagster._daemon.controller as controller; "
               "controller.DEFAULT_DAEMON_INTERVAL_SECONDS = 2; "
               "runpy.run_module('dagster._daemon', run_name='__main__')")
START_TIMEOUT_S = 60.0  # webserver up and our code location loaded
# The "Join the Dagster community" modal stays away once this browser-storage key is set
# (dagster-webserver's CommunityNux; it is only shown on 127.0.0.1/localhost).
DISMISS_COMMUNITY_MODAL = "window.localStorage.setItem('communityNux', '1')"


def artifacts_dir(tmp_path: Path) -> Path:
    """Where tests leave screenshots: $CCAT_TEST_ARTIFACTS (CI keeps it), else tmp_path."""
    directory = Path(os.environ.get("CCAT_TEST_ARTIFACTS") or tmp_path).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    return directory



def _chromium() -> str | None:
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")



@pytest.fixture(name="chromium")  # named: importable under any alias
def chromium() -> str:
    """The path of a Chromium that Playwright can drive (`make test-deps` installs it).
    Launch it with `launch_browser(chromium)` only when needed: Playwright's sync API keeps an
    asyncio loop running in this thread while it is open, which Dagster's in-process runs
    trip over, so a test runs its Dagster work first and opens the browser afterwards."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        unavailable("Playwright", f"{exc} (pip install -e '.[dev]')")
    executable = _chromium()
    if executable is None:
        unavailable("Chromium", f"{CHROMIUM} missing: run `make test-deps` "
                    f"(scripts/setup-test-host installs {' '.join(PACKAGES)})")
    assert executable is not None  # unavailable() has skipped or failed otherwise
    return executable


@contextmanager
def launch_browser(executable: str) -> Iterator[Browser]:
    """That Chromium, headless, through Playwright; closed (and Playwright stopped) on exit."""
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                                 args=CHROMIUM_ARGS, timeout=30_000)
        except Error as exc:
            unavailable("Chromium", f"{executable} did not start under Playwright: {exc}")
        try:
            yield browser
        finally:
            browser.close()


@dataclass(frozen=True)
class Webserver:
    url: str  # http://127.0.0.1:PORT
    location: str  # the code location's name, e.g. "ccat_assets.definitions:defs"
    log: Path

    def graphql(self, query: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + "/graphql", data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read().decode()))

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class GraphQLFailures:
    """Every GraphQL request of a page that failed, answered an HTTP error or carried errors:
    what the UI's "Unexpected GraphQL error" toast is about, said when a test fails."""

    def __init__(self, page: Page) -> None:
        self.responses: list[Response] = []
        self.failed: list[str] = []
        page.on("response", lambda r: self.responses.append(r) if "/graphql" in r.url else None)
        page.on("requestfailed", lambda r: self.failed.append(
            f"{r.method} {r.url}: {r.failure}") if "/graphql" in r.url else None)
        page.on("console", lambda m: self.failed.append(f"console: {m.text[:1500]}")
                if m.type == "error" and "GraphQL" in m.text else None)

    def describe(self) -> str:
        found = list(self.failed)
        for response in self.responses:
            try:
                body = response.text()
            except Exception as exc:  # noqa: BLE001  the page may be gone: say so
                body = f"(body unreadable: {exc})"
            if response.status >= 400 or '"errors"' in body or "PythonError" in body:
                operation = (response.request.post_data_json or {}).get("operationName")
                found.append(f"{operation}: HTTP {response.status}: {body[:1500]}")
        return "\n".join(found) or "none"


LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _loaded_location(server: Webserver) -> tuple[str | None, str]:
    """(the code location's name once loaded, else None; what is wrong meanwhile)."""
    try:
        workspace = server.graphql(LOCATIONS)["data"]["workspaceOrError"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"GraphQL: {exc.__class__.__name__}: {exc}"
    entries = workspace.get("locationEntries") or []
    if not entries:
        return None, f"no code location yet: {workspace}"
    entry = entries[0]
    loaded = entry.get("locationOrLoadError") or {}
    if loaded.get("__typename") == "PythonError":
        raise AssertionError(f"code location {entry['name']} failed to load: "
                             f"{loaded.get('message')}\n{server.log_tail()}")
    if entry.get("loadStatus") == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
        return str(entry["name"]), ""
    return None, f"code location {entry['name']}: {entry.get('loadStatus')}"


@contextmanager
def dagster_webserver(dagster_home: Path, config_path: Path, log: Path) -> Iterator[Webserver]:
    """`dagster-webserver` over the instance in `dagster_home` and the repo's workspace.yaml
    (our Definitions, built from `config_path`), on a free 127.0.0.1 port; stopped afterwards.

    Fails (not skips): the webserver is a dependency of the project, so it not serving our
    code location is a bug."""
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "CCAT_DT_CONFIG": str(config_path)}
    command = [sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
               "-w", str(REPO / "workspace.yaml")]
    server = Webserver(url=f"http://127.0.0.1:{port}", location="", log=log)
    loaded: list[str] = []

    def ready() -> str:
        try:
            with urllib.request.urlopen(server.url + "/server_info", timeout=2):
                pass
        except (OSError, urllib.error.URLError) as exc:
            return f"/server_info: {exc}"
        location, problem = _loaded_location(server)
        if location is not None:
            loaded.append(location)
        return problem

    # Its own process group, so that its code-server child is stopped along with it.
    try:
        with running(command, log=log, ready=ready, timeout_s=START_TIMEOUT_S,
                     name="dagster-webserver", env=env, cwd=REPO, group=True, poll_s=0.25):
            yield Webserver(url=server.url, location=loaded[-1], log=log)
    except DidNotStart as exc:
        raise AssertionError(f"{exc}\n{server.log_tail()}") from exc


DAEMON_READY = "Instance is configured with the following daemons"


@contextmanager
def dagster_daemon(dagster_home: Path, config_path: Path, log: Path
                   ) -> Iterator[subprocess.Popen[bytes]]:
    """`dagster-daemon run` over the same instance and workspace, as `make ui` (`dagster dev`)
    runs it beside the webserver: it dequeues the runs the UI submits, executes backfills and
    ticks the sensors and the schedule. Yields its process (the leader of its process group:
    its code server is in the group). Stopped (with its code server) afterwards, and its
    heartbeats wiped: Dagster leaves them (a drive on another host would wait for a daemon
    that is gone until they are DAEMON_FRESH_S old, ccat_assets.driver.wait_for_daemon)."""
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "CCAT_DT_CONFIG": str(config_path)}
    command = [sys.executable, "-c", DAEMON_MAIN, "run", "-w", str(REPO / "workspace.yaml")]

    def ready() -> str:
        started = log.exists() and DAEMON_READY in log.read_text(errors="replace")
        return "" if started else "daemons not started yet"

    try:
        with running(command, log=log, ready=ready, timeout_s=START_TIMEOUT_S,
                     name="dagster-daemon", env=env, cwd=REPO, group=True,
                     poll_s=0.25) as process:
            yield process
    except DidNotStart as exc:
        raise AssertionError(str(exc)) from exc
    finally:
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.wipe_daemon_heartbeats()
