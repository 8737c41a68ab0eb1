"""What `ccat-dt` tells an operator: files bigger than the package cap, disk use as `df`
shows it, status rows by location type, site names with '-'."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from ccat_dt.config import Config, ConfigError, load_config
from ccat_dt.defaults import CONFIG_NAME
from ccat_dt.marker import MARKER, write_marker
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, LocationType, RawDataPackage, Site
from ccat_dt.packages import plan_packages
from ccat_dt.purge_cycle import DiskUsage, measure
from tests.helpers import observe, run_cli

if TYPE_CHECKING:
    from dagster import DagsterInstance

MODULE = "primecam/f280"


def deployment(tmp_path: Path, edit: Any = None) -> Path:
    """`ccat-dt init` (after `edit(settings)` on the written configuration, if given)."""
    root = tmp_path / "deploy"
    assert run_cli("init", str(root)) == 0
    config = root / CONFIG_NAME
    if edit is not None:
        data = yaml.safe_load(config.read_text())
        edit(data)
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        assert run_cli("init", str(root)) == 0
    return config


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


# --- a file bigger than policies.package_max_bytes -------------------------------------------


def test_a_file_bigger_than_the_cap_is_warned_about_and_packaged_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    def small_cap(data: dict[str, Any]) -> None:
        data["policies"]["package_max_bytes"] = 1000

    config_path = deployment(tmp_path, small_cap)
    source = config_path.parent / "sites" / "ccat" / "instruments"
    for name, size in (("a.dat", 400), ("b.dat", 5000), ("c.dat", 400), ("d.dat", 400)):
        write(source / "o" / name, size)
    c = ("--config", str(config_path))
    assert run_cli(*c, "observation", "start", "o") == 0
    capsys.readouterr()
    assert run_cli(*c, "file", "--observation", "o", "--module", MODULE, "--directory", "o") == 0
    err = capsys.readouterr().err
    assert "o/b.dat is 5000 bytes, more than policies.package_max_bytes (1000)" in err
    assert "package of its own" in err
    assert "a.dat" not in err
    assert run_cli(*c, "observation", "finish", "o") == 0

    config = load_config(config_path)
    opsdb = OpsDB(config.opsdb_url)
    with caplog.at_level(logging.WARNING, logger="ccat_dt"), opsdb.session() as session:
        packages = {p.name: sorted(f.relative_path for f in p.files)
                    for p in plan_packages(session, config)}
    opsdb.dispose()
    assert sorted(packages.values()) == [["o/a.dat"], ["o/b.dat"], ["o/c.dat", "o/d.dat"]]
    warned = [r.getMessage() for r in caplog.records if "package_max_bytes" in r.getMessage()]
    assert len(warned) == 1 and "o/b.dat" in warned[0] and "package of its own" in warned[0]


# --- disk use as df computes it ---------------------------------------------------------------


def test_disk_use_is_used_over_used_plus_available() -> None:
    # 100 GB disk, 50 used, 40 available (10 reserved for root): df says 56%, not 50%
    usage = DiskUsage(total=100, used=50, available=40)
    assert usage.percent == pytest.approx(100 * 50 / 90)
    assert usage.capacity == 90


def test_measured_disk_use_matches_df(tmp_path: Path) -> None:
    if shutil.which("df") is None:
        pytest.skip("no df(1)")
    location = DataLocation(name="buffer", location_type=LocationType.BUFFER,
                            root=str(tmp_path), site=Site(name="CCAT", short_name="ccat"))
    write_marker(tmp_path, location.label)
    measured = measure(location)
    df = subprocess.run(["df", "--output=pcent", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.splitlines()[-1].strip().rstrip("%")
    assert measured is not None
    # df rounds up to a whole percent; the disk may change a little between the two reads
    assert abs(math.ceil(measured.percent) - int(df)) <= 1


# --- status: rows by location type --------------------------------------------------------


def test_status_lists_every_location_under_its_own_type(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = deployment(tmp_path)
    source = config_path.parent / "sites" / "ccat" / "instruments"
    write(source / "o" / "a.dat", 10)
    c = ("--config", str(config_path))
    assert run_cli(*c, "observation", "start", "o") == 0
    assert run_cli(*c, "file", "--observation", "o", "--module", MODULE, "o/a.dat") == 0
    capsys.readouterr()
    assert run_cli(*c, "status") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("raw files: 1 ") and "packages: none" in out[0]
    rows = [line.split() for line in out
            if line.split() and "/" in line.split()[0] and len(line.split()) == 6]
    assert [(r[0], r[1]) for r in rows] == [
        ("ccat/instruments", "source"), ("ccat/buffer", "buffer"),
        ("cologne/buffer", "buffer"), ("us/buffer", "buffer"),
        ("cologne/lta", "long_term_archive"), ("us/lta", "long_term_archive"),
        ("ramses/processing", "processing")]
    assert rows[0][2] == "1"  # the filed file, present at the source
    forecast = {line.split()[1]: line.split()[0] for line in out
                if "not filling" in line or "full in" in line}
    assert forecast["ccat/instruments"] == "source"
    assert forecast["ccat/buffer"] == "buffer"


def test_status_reads_the_locations_in_as_many_queries_however_many_sites(
        opsdb: OpsDB, config: Config) -> None:
    """The buffer forecast reads each location's site with it (its disk's marker is checked
    by name), and the archive sites' buffers are read at once: no query per site or location
    (issue 17: `status` answers in a fraction of a second)."""
    from sqlalchemy import event

    from ccat_dt.forecast import forecast_buffers
    from ccat_dt.health import sites_down
    from ccat_dt.opsdb.models import utcnow

    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(opsdb.engine, "before_cursor_execute", seen)
    with opsdb.session() as session:  # three sites with a source or buffer, two archive sites
        assert len(forecast_buffers(session, utcnow())) == 4
        assert len(statements) == 3, statements  # the locations, copies and raw files
        statements.clear()
        assert sites_down(session, config, utcnow()) == {}
        assert len(statements) == 1, statements


# --- site names ----------------------------------------------------------------------------


def rename_us(new: str) -> Any:
    def edit(data: dict[str, Any]) -> None:
        for site in data["sites"]:
            if site["short_name"] == "us":
                site["short_name"] = new
        for route in data["routes"]:
            for end in ("origin", "destination"):
                if route[end] == "us":
                    route[end] = new
    return edit


@pytest.mark.parametrize("name", ["Cologne", "us east", "-us", "us-", "us.east"])
def test_a_bad_site_name_says_which_characters_are_allowed_and_why(tmp_path: Path,
                                                                     name: str) -> None:
    root = tmp_path / "d"
    assert run_cli("init", str(root)) == 0
    path = root / CONFIG_NAME
    data = yaml.safe_load(path.read_text())
    rename_us(name)(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "sites[2].short_name" in message
    assert "lower-case letters, digits, '_' and '-'" in message and "queue" in message


@pytest.mark.slow
def test_a_site_name_with_a_dash_goes_through_the_lifecycle(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path = deployment(tmp_path, rename_us("us-east"))
    source = config_path.parent / "sites" / "ccat" / "instruments"
    for i in range(2):
        write(source / "o" / f"scan-{i}.dat", 20_000)
    c = ("--config", str(config_path))
    assert run_cli(*c, "observation", "start", "o") == 0
    assert run_cli(*c, "file", "--observation", "o", "--module", MODULE, "--directory", "o") == 0
    assert run_cli(*c, "observation", "finish", "o") == 0
    capsys.readouterr()
    assert run_cli(*c, "drive") == 0
    out = capsys.readouterr().out
    assert "us-east" in out and "FAILED" not in out
    config = load_config(config_path)
    opsdb = OpsDB(config.opsdb_url)
    with opsdb.session() as session:
        states = [p.state.value for p in session.query(RawDataPackage)]
    opsdb.dispose()
    assert states == ["archived"]
    assert run_cli(*c, "status") == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("us-east/lta"))
    assert row.split()[2] == "1"


# --- the run report: one line per run -------------------------------------------------------


def test_run_lines_name_stage_package_and_site_and_pass_other_messages_on() -> None:
    from dagster import DagsterInstance

    from ccat_assets.runlog import RunReporter

    written: list[str] = []
    with DagsterInstance.ephemeral() as instance:
        reporter = RunReporter(instance, write=written.append)
        reporter("ok     site_copy:obs-1_chai-lfa_p00:us-east:17")
        reporter("FAILED scrub:cologne:2026-12-01T10")
        reporter("retrying site copy obs-1|us: link was down")
    assert [(r.stage, r.package, r.site, r.ok) for r in reporter.lines] == [
        ("site_copy", "obs-1_chai-lfa_p00", "us-east", True), ("scrub", "", "cologne", False)]
    assert written[0].split()[:4] == ["ok", "site_copy", "obs-1_chai-lfa_p00", "us-east"]
    assert written[1].startswith("FAILED scrub") and "next: the run's events" in written[1]
    assert written[2] == "retrying site copy obs-1|us: link was down"
    assert reporter.summary().startswith("2 run(s), 1 failed")


def test_a_copy_and_archive_run_whose_archiving_failed_is_reported_as_the_lta_copy(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """The embedded default copies a package to a site and archives it there in one run: when
    only the archiving fails (here the archive disk is not mounted), the run's line names the
    LTA copy, as `why` does, not the site copy that succeeded."""
    from ccat_assets.definitions import build_definitions
    from ccat_assets.driver import drive
    from ccat_assets.runlog import RunReporter

    marker = config.directory / "sites" / "us" / "lta" / MARKER
    marker.rename(marker.with_name("unmounted"))
    observe(config, opsdb, observations=1, files=1)
    reporter = RunReporter(instance, write=lambda _: None)
    drive(build_definitions(config), instance, log=reporter)
    combined = [line for line in reporter.lines  # the copy-and-archive run to us
                if line.key.startswith("site_copy:") and line.site == "us"]
    assert combined and not combined[0].ok
    assert combined[0].stage == "lta_copy" and "marker" in combined[0].cause, combined[0]
    assert {line.stage for line in reporter.lines if not line.ok} == {"lta_copy"}


def test_a_run_stopped_by_a_failed_check_is_reported_with_what_the_check_found(
        config: Config, opsdb: OpsDB, instance: DagsterInstance) -> None:
    """A filed raw file deleted before packaging: the packaging run stops at its blocking
    check, and its line says which file is missing, not only that a check failed."""
    from ccat_assets.definitions import build_definitions
    from ccat_assets.driver import drive
    from ccat_assets.runlog import RunReporter

    source = observe(config, opsdb, observations=1, files=2)
    gone = source / "obs-0" / "chai/lfa" / "sub" / "scan-1.dat"
    gone.unlink()
    reporter = RunReporter(instance, write=lambda _: None)
    drive(build_definitions(config), instance, log=reporter)
    [failed] = [line for line in reporter.lines if not line.ok]
    assert failed.stage == "package" and failed.package.endswith("chai-lfa_p00")
    assert "check raw_files_present failed" in failed.cause, failed.cause
    assert "obs-0/chai/lfa/sub/scan-1.dat" in failed.cause, failed.cause


def test_run_lines_of_reattempts_purges_and_rebuilds_name_their_package() -> None:
    """Every kind of run key the sensors make: the line names the stage, package and site it
    works on, and a failure's next step names the package (`ccat-dt why PACKAGE`)."""
    from dagster import DagsterInstance

    from ccat_assets.runlog import RunReporter

    keys = {
        "reattempt:lta_copy:obs-1_p00|cologne:09e26bf9:2": ("lta_copy", "obs-1_p00", "cologne"),
        "reattempt:packaging:obs-1_p00:09e26bf9:3": ("package", "obs-1_p00", ""),  # as the
        # package sensor's runs: one name per stage
        "purge:obs-1_p00:*:3f2a9c0d1e2b": ("purge", "obs-1_p00", ""),
        "purge:obs-1_p00:us:3f2a9c0d1e2b:2": ("purge", "obs-1_p00", "us"),
        "purge-unfinished:obs-1_p00:17": ("purge-unfinished", "obs-1_p00", ""),
        "rebuild:obs-1_p00:12:0": ("rebuild", "obs-1_p00", ""),
        "package:obs-1_p00": ("package", "obs-1_p00", ""),
        "stage:req-7": ("stage", "req-7", ""),
    }
    written: list[str] = []
    with DagsterInstance.ephemeral() as instance:
        reporter = RunReporter(instance, write=written.append)
        for key in keys:
            reporter(f"FAILED {key}")
    assert [(r.stage, r.package, r.site) for r in reporter.lines] == list(keys.values())
    for line, (_, package, _) in zip(written, keys.values(), strict=True):
        assert f"`ccat-dt why {package}`" in line, line


def test_a_buffer_forecast_reads_in_hours_near_and_days_or_more_far() -> None:
    from ccat_assets.status import until

    assert [until(h) for h in (0.5, 47.9, 100.0, 24 * 364, 99_519.7)] == [
        "0.5 h", "47.9 h", "4 days", "364 days", "over a year"]
