"""Staging under faults: a processing disk that is not mounted (its mount point bare, or gone)
gets nothing written, and the request is staged by the re-attempt sensor once the disk is
back, with no person; `ccat-dt retry` covers staging too; a failed staging run's line names
a next step that works for a staging request."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.retry import operator_retry
from ccat_assets.runlog import RunLine, RunReporter, _key_parts
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import CONFIG_NAME, EMBEDDED_DEFAULT, write_default_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.marker import MARKER, write_marker
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Reattempt, StagingRequest, utcnow
from ccat_dt.retry import stalled_work
from ccat_dt.stages import Stage
from ccat_dt.staging import Selection, StagingError, release, request_staging, stage
from ccat_dt.storage import files_under
from tests.faults.pipeline import deployment
from tests.helpers import (
    _checkpointed,
    copied_deployment,
    instance_template,
    new_instance_home,
    observe,
    run_cli,
    scratch_instance,
    template_directory,
)
from tests.services import unavailable

PROCESSING = "sites/ramses/processing"


def unmount(root: Path, how: str) -> None:
    """The processing disk goes: its mount point stays, bare ("unmarked"), or not even that
    ("missing")."""
    shutil.rmtree(root)
    if how == "unmarked":
        root.mkdir()


def mount(root: Path) -> None:
    """The disk `ccat-dt init` prepared is back: its root holds the marker."""
    root.mkdir(parents=True, exist_ok=True)
    write_marker(root)


def archived(tmp_path: Path, instance: DagsterInstance, backoff_s: float,
             opsdb_url: str | None = None) -> tuple[Config, OpsDB, dict[str, bytes]]:
    """One observation filed and archived; its raw bytes as written (the purge deletes them at
    the source). `opsdb_url`: another OpsDB than the embedded SQLite one. On the SQLite OpsDB,
    `instance` (this module's fixture) and tmp_path/deploy are already a copy of what
    `_archived_template`'s drive made; here its configuration gets the test's back-off."""
    if opsdb_url is None:
        template = _archived_template()
        directory = tmp_path / "deploy"
        assert (directory / CONFIG_NAME).exists(), "archived on SQLite takes this module's instance"
        (directory / CONFIG_NAME).unlink()  # as deployment() writes it, with this back-off
        write_default_config(directory, overrides=_settings(backoff_s))
        config = load_config(directory / CONFIG_NAME)
        return config, OpsDB(config.opsdb_url), dict(template.written)
    config = deployment(tmp_path / "deploy", policies={"retry_backoff_first_s": backoff_s},
                        opsdb_url=opsdb_url)
    opsdb = OpsDB(config.opsdb_url)
    return config, opsdb, _filed_and_archived(config, opsdb, instance)


def _filed_and_archived(config: Config, opsdb: OpsDB,
                        instance: DagsterInstance) -> dict[str, bytes]:
    source = observe(config, opsdb, observations=1, files=2)
    written = {str(p.relative_to(source)): p.read_bytes() for p in files_under(source)
               if "chai/lfa" in str(p)}
    assert drive(build_definitions(config), instance).failed == []
    return written


def _settings(backoff_s: float) -> dict[str, Any]:
    """deployment()'s configuration with this back-off (top-level keys over the default's)."""
    settings = copy.deepcopy(EMBEDDED_DEFAULT)
    settings["policies"] = {**settings["policies"],  # type: ignore[dict-item]
                            "retry_backoff_first_s": backoff_s}
    return settings


@dataclass(frozen=True)
class _Template:
    deploy: Path  # the deployment the drive archived at, OpsDB checkpointed
    home: Path  # the instance it drove, closed and checkpointed (tests.helpers)
    written: dict[str, bytes]


@functools.cache
def _archived_template() -> _Template:
    """The archived state most tests here start from, made by the real lifecycle (a drive of
    the observation filed) once per test process: ~4.4 s of CPU that each test spent again
    (three quarters of this file's). Each test starts from a copy (this module's `instance`
    fixture): its own deployment directory and instance, every path and inode OpsDB and the
    instance record of its files made its own (tests.helpers.copied_deployment)."""
    directory = template_directory("archived")
    home = new_instance_home(directory / "dagster_home")
    config = deployment(directory / "deploy", policies={"retry_backoff_first_s": 3600.0})
    opsdb = OpsDB(config.opsdb_url)
    with DagsterInstance.from_config(str(home)) as instance:
        written = _filed_and_archived(config, opsdb, instance)
    opsdb.dispose()
    _checkpointed(directory / "deploy" / "opsdb.sqlite")
    return _Template(directory / "deploy", instance_template(home), written)


@pytest.fixture
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DagsterInstance]:
    """conftest's, except that a test on the SQLite OpsDB starts archived: tmp_path/deploy a
    copy of the template's deployment and the instance a copy of its (`_archived_template`)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("database") == "postgresql":
        with scratch_instance(tmp_path) as fresh:
            yield fresh
        return
    template = _archived_template()
    with copied_deployment(template.deploy, template.home, tmp_path) as copied:
        yield copied


def ask_to_stage(opsdb: OpsDB, module: str | None = "chai/lfa") -> str:
    """A scientist's request: obs-0 (its `module`, or all of it) at ramses/processing for an
    hour."""
    return request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0", module=module),
                           expires_in=timedelta(hours=1))


def staged(root: Path, name: str) -> dict[str, bytes]:
    """The request's files as they lie at the processing location, by their raw path."""
    return {str(p.relative_to(root / name)).split("/", 1)[1]: p.read_bytes()
            for p in files_under(root / name)}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["unmarked", "missing"])
def test_unmounted_processing_disk_gets_nothing_and_staging_heals_by_itself(
        tmp_path: Path, instance: DagsterInstance, capsys: pytest.CaptureFixture[str],
        how: str) -> None:
    config, opsdb, written = archived(tmp_path, instance, backoff_s=2.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    unmount(root, how)
    name = ask_to_stage(opsdb)
    lines: list[str] = []

    report = drive(defs, instance, log=RunReporter(instance, write=lines.append))

    # The storage: nothing made on the bare mount point (or in its place).
    assert (list(root.iterdir()) == []) if how == "unmarked" else not root.exists()
    assert f"stage:{name}" in report.failed
    assert all(key.startswith(("stage:", "reattempt:staging:")) for key in report.failed)
    failed = next(line for line in lines if line.startswith("FAILED stage"))
    assert "mounted?)" in failed and str(root) in failed and "nothing was written" in failed
    assert f"`ccat-dt why {name}`" in failed
    with opsdb.session() as session:
        row = session.scalars(select(Reattempt)).one()
        assert (row.stage, row.partition, row.escalated_at) == (Stage.STAGING, name, None)
        assert row.next_attempt_at is not None
    # The hint works: `why` knows the request, says why it failed and that it is re-attempted.
    capsys.readouterr()
    assert run_cli("--config", str(config.path), "why", name) == 0
    why = capsys.readouterr().out
    assert "staging" in why and "failed" in why and "mounted?)" in why
    assert "automatic" in why

    mount(root)
    report = drive(defs, instance, wait_s=60)  # no `ccat-dt retry`: the back-off, then a run

    assert report.failed == []
    assert any(key.startswith(f"reattempt:staging:{name}:") for key in report.launched)
    assert staged(root, name) == written
    assert stalled_work(opsdb, config, packages=[name]) == []
    with opsdb.session() as session:
        assert session.scalars(select(Reattempt)).all() == []  # the work is done: row gone

    release(opsdb, name)  # the staged copies are purged from the marked root as usual
    assert drive(defs, instance).failed == []
    assert [p.name for p in root.iterdir()] == [MARKER]


@pytest.mark.slow
def test_retry_stages_a_request_whose_run_failed(tmp_path: Path,
                                                 instance: DagsterInstance) -> None:
    """Escalated work, or a person who would not wait for the back-off: `ccat-dt retry`."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    unmount(root, "unmarked")
    name = ask_to_stage(opsdb)
    assert drive(defs, instance).failed == [f"stage:{name}"]
    assert list(root.iterdir()) == []
    unwanted = ask_to_stage(opsdb, module=None)
    release(opsdb, unwanted)  # not wanted any more: never stalled

    stalled = [s for s in stalled_work(opsdb, config) if s.stage == Stage.STAGING]
    assert [(s.package, s.site) for s in stalled] == [(name, "")]
    assert "failed" in stalled[0].reason and "mounted?)" in stalled[0].reason

    mount(root)
    retried, report = operator_retry(config, instance, opsdb)

    assert [(s.stage, s.package) for s in retried] == [(Stage.STAGING, name)]
    assert report.failed == []
    assert staged(root, name) == written
    assert [s for s in stalled_work(opsdb, config) if s.stage == Stage.STAGING] == []


def test_a_failed_staging_run_names_a_next_step_for_its_request() -> None:
    """Its partition is a staging request, not a package: `why` on the request, or release
    it; whichever run key it has (the staging sensor's, a re-attempt's, a retry's)."""
    for key in ("stage:stage-1a2b3c4d", "reattempt:staging:stage-1a2b3c4d:0f0f0f0f:2",
                "staging:stage-1a2b3c4d:*:retry-12345678"):
        stage, request, site = _key_parts(key)
        assert (stage, request, site) == ("stage", "stage-1a2b3c4d", "")  # one name per stage
        line = RunLine(key, stage, request, site, False, 0, 1.0, "no marker").text()
        assert "`ccat-dt why stage-1a2b3c4d` shows the staging request" in line
        assert "`ccat-dt stage --release stage-1a2b3c4d`" in line
    package = RunLine("package:p:*", "package", "p", "", False, 0, 1.0, "x").text()
    assert "`ccat-dt why p` says whether" in package and "--release" not in package


def test_why_of_a_request_reads_its_own_staging_not_anothers(tmp_path: Path,
                                                            instance: DagsterInstance) -> None:
    """Two requests for the same package at the same place: the first failed (its disk not
    mounted), the second, made once the disk was back, staged. `why` of the first still says
    it failed, and why; of the second, that it is staged: neither reads the other's try."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0)
    root = config.resolve_root(PROCESSING)
    selection = Selection(observation="obs-0", module="chai/lfa")
    unmount(root, "unmarked")
    first = request_staging(opsdb, location="ramses/processing", selection=selection,
                            expires_in=timedelta(hours=1))
    with pytest.raises(StagingError, match=r"mounted\?\)"):
        stage(opsdb, config, first)
    mount(root)
    second = request_staging(opsdb, location="ramses/processing", selection=selection,
                             expires_in=timedelta(hours=1))

    stage(opsdb, config, second)

    assert staged(root, second) == written and not (root / first).exists()
    with opsdb.session() as session:
        [*_, of_first] = diagnose(session, config, first, utcnow())
        [*_, of_second] = diagnose(session, config, second, utcnow())
    assert (of_first.stage, of_first.state) == ("staging", "failed")
    assert "mounted?)" in of_first.detail
    assert (of_second.stage, of_second.state) == ("staging", "done")


def test_staged_files_removed_or_changed_are_restored_or_kept_as_the_disk_says(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """A processing job removes one staged file and writes into another. The record still says
    STAGED, but the disk is the truth: `why` says the request's files are not all there, and
    the next drive stages the removed file again from the archive, with nobody asked. The
    changed file holds bytes no archive has: never overwritten; the run fails once, naming it,
    until a person moves it away, and the next drive stages it too."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb)
    assert drive(defs, instance).failed == []
    removed, changed = sorted(p for p in files_under(root / name))
    removed.unlink()
    mine = b"a processing job's output"
    changed.write_bytes(mine)

    with opsdb.session() as session:
        said = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert said["staging"].state == "failed"
    assert "1 staged file(s) gone" in said["staging"].detail
    assert "1 staged file(s) changed" in said["staging"].detail
    assert [s.package for s in stalled_work(opsdb, config) if s.stage == Stage.STAGING] == [name]

    report = drive(defs, instance)

    assert len(report.failed) == 1 and name in report.failed[0], report.failed
    assert changed.read_bytes() == mine  # the storage: kept as its owner left it
    restored = staged(root, name)
    raw = str(removed.relative_to(root / name)).split("/", 1)[1]
    assert restored[raw] == written[raw]  # the removed file is back, as filed
    with pytest.raises(StagingError, match=f"changed at the processing location.*{changed.name}"):
        stage(opsdb, config, name)

    changed.rename(tmp_path / "moved-away")  # its owner keeps it elsewhere
    report = drive(defs, instance)

    assert report.failed == []
    assert staged(root, name) == written
    assert (tmp_path / "moved-away").read_bytes() == mine
    with opsdb.session() as session:
        said = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert said["staging"].state == "done"
    assert [s for s in stalled_work(opsdb, config) if s.stage == Stage.STAGING] == []


@contextmanager
def small_disk(root: Path, size: str) -> Iterator[None]:
    """A real tmpfs of `size` mounted at `root` (marked, as `ccat-dt init` leaves a disk),
    unmounted on the way out."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "ccat-test", str(root)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        unavailable("a tmpfs mount", f"mount: {done.stderr.strip()} (needs root)")
    try:
        write_marker(root)
        yield
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.slow
def test_a_processing_disk_that_fills_while_unpacking_keeps_no_half_file_and_heals(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The processing disk holds the package's tar and its first file, not the second: the
    unpacking fails on ENOSPC. Nothing is left under a staged name (no half-written file for
    a job to read), nor any scratch; the run fails once with the cause and the path, and the
    re-attempt stages everything once there is room, with no person."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=2.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    with small_disk(root, "180k"):
        name = ask_to_stage(opsdb)
        lines: list[str] = []

        report = drive(defs, instance, wait_s=0, log=RunReporter(instance, write=lines.append))

        assert f"stage:{name}" in report.failed
        assert [p.name for p in root.rglob("*") if p.is_file()] == [MARKER]  # the storage
        failed = next(line for line in lines if line.startswith("FAILED stage"))
        assert "No space left on device" in failed and "nothing of it was left" in failed

        subprocess.run(["mount", "-o", "remount,size=10m", str(root)], check=True)
        report = drive(defs, instance, wait_s=60)  # the back-off, then the re-attempt

        assert report.failed == []
        assert staged(root, name) == written
        assert not list(root.rglob("*.part")) and not list(root.rglob("*.tar"))


def test_a_staged_directory_replaced_by_a_symlink_is_never_written_through(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """A job replaces a staged directory by a symlink to its own scratch space and an operator
    retries the request: nothing is written through the link (outside the processing
    location); the run fails naming it; the files behind the link are untouched."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb)
    assert drive(defs, instance).failed == []
    first = sorted(files_under(root / name))[0]
    jobs = tmp_path / "job-scratch"
    jobs.mkdir()
    shutil.rmtree(first.parent)
    first.parent.symlink_to(jobs)

    _, report = operator_retry(config, instance, opsdb, packages=[name])

    assert len(report.failed) == 1
    assert list(jobs.iterdir()) == []  # the storage: nothing written outside the location
    with opsdb.session() as session:
        said = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert said["staging"].state == "failed" and "changed" in said["staging"].detail


@pytest.mark.parametrize("fault", ["rotten", "removed"])
def test_staging_from_a_rotten_nearest_archive_copy_moves_on_to_a_good_one(
        tmp_path: Path, instance: DagsterInstance, fault: str) -> None:
    """The nearest LTA copy rotted since its last check (the staged tar arrives with the wrong
    checksum), or is gone from its disk: the source is re-hashed on its storage, quarantined
    (and repaired from the other archive), and the re-attempt stages from the other archive,
    with no person. Before: the same bad copy every attempt; a copy gone was tried again at
    every attempt until the horizon, the other archive's never, and nobody was told an
    archive had lost it."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=0.5)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    [tar] = config.resolve_root("sites/cologne/lta").rglob("*chai-lfa*.tar")
    intact = tar.read_bytes()
    if fault == "rotten":
        data = bytearray(intact)
        data[len(data) // 2] ^= 0x01
        tar.write_bytes(bytes(data))
    else:
        tar.unlink()
    name = ask_to_stage(opsdb)

    report = drive(defs, instance, wait_s=30)

    assert staged(root, name) == written  # the storage: the filed bytes, from the good copy
    assert tar.read_bytes() == intact  # and the bad copy made again by its repair
    assert any(key.startswith("stage:") for key in report.failed)  # the first attempt
    with opsdb.session() as session:
        said = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert said["staging"].state == "done"


def test_staging_a_package_whose_every_archive_copy_is_gone_says_so_and_stages_the_rest(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """A request of two packages, one of whose archive copies (its only copies: the sources
    were purged) are both gone from their disks: the other package is staged, nothing of the
    lost one is written, the request is never taken for staged, and `why REQUEST` names the
    package with no verified copy to stage from, whose copies are quarantined (the package
    LOST, told). Before, the missing copy was tried at every attempt, never quarantined, and
    `why` repeated that attempt's "source missing" with a next attempt to come."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=0.5)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    gone = sorted(config.resolve_root("sites").glob("*/lta/**/*chai-lfa*.tar"))
    assert len(gone) == 2
    for tar in gone:
        tar.unlink()
    name = ask_to_stage(opsdb, module=None)

    drive(defs, instance, wait_s=5)

    on_disk = staged(root, name)  # the storage: the other package's files, none of chai's
    assert on_disk and not any("chai" in path for path in on_disk)
    assert not any(p.exists() for p in gone)
    with opsdb.session() as session:
        request = session.scalars(select(StagingRequest).where(
            StagingRequest.name == name)).one()
        assert request.staged_at is None
        [lost] = [p for p in request.packages if "chai" in p.name]
        assert sorted(c.status.value for c in lost.copies
                      if c.location.location_type.value == "long_term_archive") == [
            "corrupt", "corrupt"]
        said = {s.stage: s for s in diagnose(session, config, name, utcnow())}
    assert said["staging"].state == "failed"
    assert f"no verified LTA copy of {lost.name}" in said["staging"].detail


@pytest.mark.parametrize("ended", ["released", "expired"])
def test_a_killed_staging_step_leaves_nothing_once_its_request_has_ended(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch,
        ended: str) -> None:
    """A staging run is killed (SIGKILL: no `finally` runs) between landing its second
    package's tar and unpacking it; the request ends before any re-attempt (the scientist
    released it, or it expired). Its scratch tar, as large as a package, is not left on the
    processing disk for good: the release, or the purge of the request's staged files,
    takes it; then nothing of the request is left there."""
    import ccat_dt.staging as staging

    config, opsdb, _ = archived(tmp_path, instance, backoff_s=3600.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb, module=None)
    real, unpacked = staging.extract_package, []

    def killed_at_the_second(*args: object, **kwargs: object) -> object:
        unpacked.append(args)  # in the run's own (forked) process
        if len(unpacked) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(staging, "extract_package", killed_at_the_second)
    assert drive(defs, instance).failed == [f"stage:{name}"]
    monkeypatch.setattr(staging, "extract_package", real)
    assert [p.name for p in (root / name).iterdir() if p.name.endswith(".tar")]  # left

    if ended == "released":
        release(opsdb, name)
    else:
        with opsdb.session() as session:
            request = session.scalars(select(StagingRequest).where(
                StagingRequest.name == name)).one()
            request.expires_at = utcnow() - timedelta(seconds=1)
    drive(defs, instance)

    assert [p.name for p in root.rglob("*")] == [MARKER]  # the storage: nothing of it left


def test_a_release_while_staging_stops_the_run_and_leaves_nothing(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """The scientist releases a request while its run stages it: the run stops after the
    package at hand (it succeeds, saying so) instead of staging the rest for the purge to
    delete, and the purge then leaves nothing of the request on the processing disk."""
    import ccat_dt.staging as staging

    config, opsdb, _ = archived(tmp_path, instance, backoff_s=3600.0)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb, module=None)
    real, staged_packages = staging._stage_package, []

    def released_meanwhile(*args: Any, **kwargs: Any) -> tuple[int, int, list[str]]:
        done = real(*args, **kwargs)
        staged_packages.append(args[3])
        release(OpsDB(config.opsdb_url), name)  # from another terminal, as it were
        return done

    staging._stage_package = released_meanwhile
    try:
        report = drive(defs, instance, in_process=True)  # in this process: the list counts
    finally:
        staging._stage_package = real
    assert report.failed == [] and len(staged_packages) == 1
    drive(defs, instance)

    assert [p.name for p in root.rglob("*")] == [MARKER]


def test_a_file_written_at_a_staged_name_while_it_is_staged_again_is_never_replaced(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """A processing job removes a staged file, then writes its own output under that name
    while the run staging the removed file again fetches the package (hours on a long link).
    The disk said "gone" when the run looked; at the rename the name holds the job's bytes,
    which no archive has: they are never replaced. The run fails naming the file; once its
    owner moves it away, the next attempt stages the file again."""
    import ccat_dt.staging as staging

    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb)
    stage(opsdb, config, name)
    taken = sorted(files_under(root / name))[0]
    taken.unlink()
    mine = b"a processing job's output, written under that name meanwhile"
    real = staging.extract_package

    def job_writes_meanwhile(*args: Any, **kwargs: Any) -> Any:
        taken.write_bytes(mine)  # after the run looked, before anything is renamed
        return real(*args, **kwargs)

    monkeypatch.setattr(staging, "extract_package", job_writes_meanwhile)
    try:
        stage(opsdb, config, name)
        failure = ""
    except StagingError as exc:
        failure = str(exc)
    monkeypatch.setattr(staging, "extract_package", real)

    assert taken.read_bytes() == mine  # the storage: the job's bytes, as it wrote them
    assert taken.name in failure
    taken.rename(tmp_path / "moved-away")
    stage(opsdb, config, name)
    assert staged(root, name) == written
    assert (tmp_path / "moved-away").read_bytes() == mine


def test_a_staged_file_whose_record_was_lost_is_taken_as_staged_not_copied_over(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """A staging step renamed a file to its staged name and died before recording it: the
    next attempt finds the archive's bytes at the name and records that file as staged."""
    from ccat_dt.opsdb.models import RawDataFileCopy

    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb)
    stage(opsdb, config, name)
    with opsdb.session() as session:
        unrecorded = session.scalars(select(RawDataFileCopy).where(
            RawDataFileCopy.staging_request_id.is_not(None)).order_by(
            RawDataFileCopy.id).limit(1)).one()
        path = root / unrecorded.relative_path
        session.delete(unrecorded)
    before = os.lstat(path)

    stage(opsdb, config, name)

    assert staged(root, name) == written
    after = os.lstat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)



def test_a_staged_file_written_to_before_its_record_is_not_purged_after_release(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job starts on a staged file the moment it appears and writes into it before the
    staging step records it. The record must hold the file as it was verified, not as a
    later look found it: after the release, the purge finds the file changed and keeps the
    job's bytes (before: the job's file was recorded as staged and deleted unread)."""
    import ccat_dt.staging as staging
    from ccat_dt.reaper import purge_package

    config, opsdb, _ = archived(tmp_path, instance, backoff_s=3600.0)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb)
    real = staging._record_staged
    written_into: list[tuple[Path, bytes]] = []

    def job_writes_first(*args: Any, **kwargs: Any) -> None:
        if not written_into:
            target = sorted(files_under(root / name))[0]  # at its staged name, unrecorded
            mine = bytes(b ^ 0xFF for b in target.read_bytes())  # its size, other bytes
            with open(target, "r+b") as stream:  # in place, between the rename and the record
                stream.write(mine)
            written_into.append((target, mine))
        real(*args, **kwargs)

    monkeypatch.setattr(staging, "_record_staged", job_writes_first)
    stage(opsdb, config, name)
    monkeypatch.setattr(staging, "_record_staged", real)
    release(opsdb, name)
    with opsdb.session() as session:
        package = session.scalars(select(StagingRequest).where(
            StagingRequest.name == name)).one().packages[0].name
    purge_package(opsdb, config, package)

    [(target, mine)] = written_into
    assert target.exists() and target.read_bytes() == mine  # the storage: the job's bytes


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_stagings_of_one_request_at_once_stage_and_record_each_file_once(
        tmp_path: Path, instance: DagsterInstance, request: pytest.FixtureRequest,
        database: str) -> None:
    """The staging sensor's run and an operator's Materialize of the same request at once,
    each a process of its own. The second, past its look at what is staged, comes while the
    first has renamed every file to its staged name and not yet recorded it: it waits for the
    first's claim on the package, then finds the files staged. Before, it staged them all
    again over the first's scratch, took the first's files at their names for its own, and
    each file was recorded staged twice: the request's check stayed red ("4 of 2 files
    staged") for as long as the request was active."""
    from ccat_dt.opsdb.models import CopyStatus, RawDataFileCopy
    from ccat_dt.reaper import purge_package
    from ccat_dt.staging import staged_problems
    from tests.faults.pipeline import child_argv, finish, spawn
    from tests.faults.test_race_faults import _arrived

    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    config, opsdb, written = archived(tmp_path, instance, backoff_s=3600.0, opsdb_url=url)
    root = config.resolve_root(PROCESSING)
    name = ask_to_stage(opsdb)
    gate = tmp_path / "gate"
    first = spawn(child_argv(config, "stage", name, barrier=str(gate), parties=2, at="record"))
    _arrived(gate, first)  # its files at their staged names, about to record them
    second = spawn(child_argv(config, "stage", name, barrier=str(gate), parties=2, at="claim"))
    outcomes = [finish(first), finish(second)]

    assert [o.returncode for o in outcomes] == [0, 0], [o.stdout + o.stderr[-2000:]
                                                        for o in outcomes]
    # the storage: each file once at its staged name, the archive's bytes, no scratch left
    assert staged(root, name) == written
    assert [p.name for p in (root / name).rglob(".*")] == []
    with opsdb.session() as session:
        recorded = sorted(session.scalars(select(RawDataFileCopy.relative_path).where(
            RawDataFileCopy.status == CopyStatus.STAGED)))
    assert len(recorded) == len(set(recorded)) == len(written), recorded
    assert staged_problems(opsdb, name) == []
    release(opsdb, name)
    with opsdb.session() as session:
        [package] = [p.name for p in session.scalars(select(StagingRequest).where(
            StagingRequest.name == name)).one().packages]
    assert purge_package(opsdb, config, package).failures == []
    assert [p.name for p in root.rglob("*")] == [MARKER]


@pytest.mark.slow
def test_staging_while_every_archive_disk_is_unmounted_says_which_and_heals_from_the_first_back(
        tmp_path: Path, instance: DagsterInstance) -> None:
    """Both archives' LTA disks are unmounted (their mount points bare) when a staging comes:
    the staging fails, nothing is written at the processing location, neither archive copy is
    judged (both stay PRESENT, their tars untouched), both LTA locations are marked down as
    sources, and `why REQUEST` names both. Cornell's disk comes back first, Cologne's (the
    cheapest route) stays away: the re-attempt stages from Cornell, with no person. Before:
    the copy at Cologne was read at every attempt (a "source missing", re-read, "not re-read"),
    never Cornell's, until Cologne's disk came back."""
    config, opsdb, written = archived(tmp_path, instance, backoff_s=0.5)
    defs = build_definitions(config)
    root = config.resolve_root(PROCESSING)
    disks = {site: config.resolve_root(f"sites/{site}/lta") for site in ("cologne", "us")}
    tars = {site: sorted(disk.rglob("*chai-lfa*.tar")) for site, disk in disks.items()}
    intact = {site: [t.read_bytes() for t in found] for site, found in tars.items()}
    for disk in disks.values():  # unmounted: the files on the disk are out of sight
        disk.rename(disk.with_name("lta-unmounted"))
        disk.mkdir()
    name = ask_to_stage(opsdb)

    report = drive(defs, instance)

    assert f"stage:{name}" in report.failed
    assert staged(root, name) == {}  # the storage: nothing staged
    with opsdb.session() as session:
        said = {s.stage: s for s in diagnose(session, config, name, utcnow())}
        request = session.scalars(select(StagingRequest).where(
            StagingRequest.name == name)).one()
        assert {c.status.value for p in request.packages for c in p.copies
                if c.location.location_type.value == "long_term_archive"} == {"present"}
    assert said["staging"].state == "failed"
    assert "cologne/lta" in said["staging"].detail and "us/lta" in said["staging"].detail
    assert "mounted?" in said["staging"].detail

    disks["us"].rmdir()  # Cornell's disk is back; Cologne's is not
    disks["us"].with_name("lta-unmounted").rename(disks["us"])
    report = drive(defs, instance, wait_s=30)  # no person: the back-off, then a re-attempt

    assert report.failed == []
    assert staged(root, name) == written  # the filed bytes, on the processing disk
    disks["cologne"].rmdir()
    disks["cologne"].with_name("lta-unmounted").rename(disks["cologne"])
    assert {site: [t.read_bytes() for t in found] for site, found in tars.items()} == intact
