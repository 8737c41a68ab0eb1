"""The WAN link fails during a transfer to an archive reached over ssh (rsync, or bbcp where
it is installed, through the test sshd): it drops in the middle of the bytes, or is down when
the transfer starts. The step's retry finds it back up; rsync resumes what had arrived, bbcp
appends to it."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.reaper as reaper
import ccat_dt.replicas as replicas
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    LocationType,
    Notification,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    RawDataPackage,
)
from ccat_dt.report import disagreements
from ccat_dt.transports.factory import ssh_settings
from tests.faults.invariants import assert_safe
from tests.faults.link import Link
from tests.faults.pipeline import (
    after_each_bbcp_start,
    archived_everywhere,
    observe,
    operations,
    package_names,
    run,
)
from tests.sshd import SshServer
from tests.test_multisite import multisite

MB = 1_000_000


@pytest.fixture
def link(sshd: SshServer) -> Iterator[Link]:
    relay = Link(sshd.port)
    yield relay
    relay.close()


@pytest.mark.parametrize("failure", ["drops mid-transfer", "down at the start"])
def test_link_failure_during_a_transfer_is_retried_and_converges(
        tmp_path: Path, sshd: SshServer, link: Link, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    config = multisite(tmp_path, link.through(sshd, tmp_path))
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb, files=3, size=2 * MB)
        if failure == "drops mid-transfer":
            link.cut_after = 3 * MB  # of the ~6 MB package, once
        else:
            link.down = True
            real_copy = _up_again_after_first_attempt(link, monkeypatch)

        report = run(config, instance, in_process=True)  # the relay's state is this process's

        if failure == "drops mid-transfer":
            assert link.cuts == 1
        else:
            assert link.refused >= 1 and real_copy["attempts"] >= 2
        assert report.failed == []  # the step's own retry got through
        [package] = package_names(opsdb)
        transfers = operations(opsdb, OperationType.TRANSFER, package)
        assert transfers[0][0] == OperationStatus.FAILED
        assert any(text in (transfers[0][1] or "") for text in (
            "Connection reset", "connection unexpectedly closed", "kex_exchange_identification",
            "Broken pipe", "closed by"))
        assert [s for s, _ in transfers[1:]] == [OperationStatus.COMPLETED] * 2
        if failure == "drops mid-transfer":  # the second attempt appended to the first's bytes
            log = _completed_log(opsdb, package)
            assert "were already there (resumed)" in log, log[-3000:]
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)  # the "remote" roots are on this machine: read directly
        assert disagreements(opsdb, ssh_settings(config)) == []
    finally:
        opsdb.dispose()


@pytest.mark.skipif(shutil.which("bbcp") is None, reason="bbcp is not installed (not packaged "
                    "for Debian); tests/test_bbcp.py replays captured output of cut transfers")
def test_a_bbcp_transfer_whose_link_drops_is_resumed_by_the_step_retry(
        tmp_path: Path, sshd: SshServer, link: Link, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real bbcp, slowed to 8 MB/s: 1.5 s into the first transfer the link goes down for a
    second (bbcp's ssh control connection is reset). The attempt fails retryable, keeping what
    landed; the step's retry appends to it, and the package ends verified in both archives."""
    config = multisite(tmp_path, link.through(sshd, tmp_path), "bbcp",
                       bbcp={"rate_limit": "8M"})
    opsdb = OpsDB(config.opsdb_url)
    cut = threading.Event()

    def drop_the_link_once() -> None:
        if not cut.is_set():
            cut.set()
            link.cut()
            threading.Timer(1.0, link.restore).start()

    after_each_bbcp_start(monkeypatch, 1.5, drop_the_link_once)
    try:
        observe(config, opsdb, files=3, size=10 * MB)

        report = run(config, instance, in_process=True)  # the link is cut from this process

        assert cut.is_set()
        assert report.failed == []  # the step's own retry got through
        [package] = package_names(opsdb)
        transfers = operations(opsdb, OperationType.TRANSFER, package)
        assert transfers[0][0] == OperationStatus.FAILED
        assert "transfer interrupted" in (transfers[0][1] or "")
        assert [s for s, _ in transfers[1:]] == [OperationStatus.COMPLETED] * 2
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)  # the "remote" roots are on this machine: read directly
        assert disagreements(opsdb, ssh_settings(config)) == []
    finally:
        opsdb.dispose()


def _up_again_after_first_attempt(link: Link, monkeypatch: pytest.MonkeyPatch
                                  ) -> dict[str, int]:
    """The first attempt of a placement (its first ssh: the look at what lies at the final
    name, before any byte moves) meets the dead link; the link comes back while the step
    waits for its retry."""
    real = replicas._occupied
    calls = {"attempts": 0}

    def occupied(opsdb, config, destination_id, jobs):  # type: ignore[no-untyped-def]
        calls["attempts"] += 1
        try:
            return real(opsdb, config, destination_id, jobs)
        finally:
            link.down = False

    monkeypatch.setattr(replicas, "_occupied", occupied)
    return calls


def _completed_log(opsdb: OpsDB, package: str) -> str:
    with opsdb.session() as session:
        path = session.scalars(select(Operation.log_path).join(
            RawDataPackage, Operation.package_id == RawDataPackage.id).where(
            RawDataPackage.name == package, Operation.operation_type == OperationType.TRANSFER,
            Operation.status == OperationStatus.COMPLETED).order_by(Operation.id)).first()
    assert path
    return Path(path).read_text()


def _down_at_first_call(link: Link, monkeypatch: pytest.MonkeyPatch, name: str
                        ) -> dict[str, int]:
    """The link goes down as the reaper's `name` is first called (what is open is reset,
    ssh's shared connection too; new connections refused) and is back once that call ends.
    Returns the count of its calls."""
    calls = {"calls": 0}
    real = getattr(reaper, name)

    def call(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["calls"] += 1
        if calls["calls"] == 1:
            link.cut()
        try:
            return real(*args, **kwargs)
        finally:
            link.restore()

    monkeypatch.setattr(reaper, name, call)
    return calls


@pytest.mark.parametrize("outage", ["the rm", "the rm and the first look after it"])
def test_a_deletion_cut_by_the_link_is_finished_by_the_reattempt_without_a_person(
        tmp_path: Path, sshd: SshServer, link: Link, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch, outage: str) -> None:
    """The link goes down as the purge's first `rm` over ssh runs (exit 255: nobody can tell
    whether the file went), and maybe again when the retry first looks. The copy is not
    frozen for a person: the step's retry within the run looks at the storage and finishes
    the deletion (before, the run failed and a new run finished it after the back-off)."""
    config = multisite(tmp_path, link.through(sshd, tmp_path), retry_backoff_first_s=0.3)
    opsdb = OpsDB(config.opsdb_url)
    cut = _down_at_first_call(link, monkeypatch, "_rm_remote")
    if outage != "the rm":
        looks = _down_at_first_call(link, monkeypatch, "remote_size")
    try:
        observe(config, opsdb, files=2, size=MB)

        report = run(config, instance, in_process=True)  # the relay's state is this process's

        assert link.refused + link.cuts >= 1 and cut["calls"] >= 2
        if outage != "the rm":
            assert looks["calls"] >= 2
        assert report.failed == [], report  # healed within the purge run
        with opsdb.session() as session:
            buffers = [(Path(c.location.root) / c.relative_path, c.location.host)
                       for c in session.scalars(select(PackageCopy))
                       if c.location.location_type == LocationType.BUFFER]
            failed = session.scalars(select(Operation).where(
                Operation.operation_type == OperationType.DELETION,
                Operation.status == OperationStatus.FAILED)).all()
            assert session.scalars(select(Notification)).all() == []
        assert [path for path, host in buffers if host and path.exists()] == []  # the storage
        assert [path for path, _ in buffers if path.exists()] == []
        assert len(failed) == 1 and "rm " in (failed[0].error or "")
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()


def test_a_purge_whose_lta_recheck_meets_the_link_down_is_reattempted_without_a_person(
        tmp_path: Path, sshd: SshServer, link: Link, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The link is down while the purge looks at the LTA copies it relies on: nothing can be
    deleted then, and nothing is. The purge is not done: the step's retry within the run
    looks again once the link is back and deletes the buffer copies, with no person, no
    notice and no failed run."""
    config = multisite(tmp_path, link.through(sshd, tmp_path), retry_backoff_first_s=0.3)
    opsdb = OpsDB(config.opsdb_url)
    looks = _down_at_first_call(link, monkeypatch, "recheck_lta_copies")
    try:
        observe(config, opsdb, files=2, size=MB)

        report = run(config, instance, in_process=True)  # the relay's state is this process's

        assert looks["calls"] >= 2 and link.refused + link.cuts >= 1
        assert report.failed == [], report  # healed within the purge run
        with opsdb.session() as session:
            buffers = [Path(c.location.root) / c.relative_path
                       for c in session.scalars(select(PackageCopy))
                       if c.location.location_type == LocationType.BUFFER]
            assert session.scalars(select(Notification)).all() == []
        assert buffers and [path for path in buffers if path.exists()] == []  # the storage
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()
