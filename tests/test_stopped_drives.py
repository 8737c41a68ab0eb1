"""A drive that never lives long enough: `ccat-dt drive` from cron under `timeout` (a service
manager's run-time limit, the nightly shutdown) stops the same slow transfer at every drive.
Each run ends CANCELED (no failed attempt) and the next drive starts it again from zero; past
the re-attempt horizon a person is told, once, while the work is still asked for
automatically; a drive left to finish then does it, and the notice is resolved.

Real drive processes (tests.faults.child, as test_parallel_drive starts them), a real slow
local copy (64 KiB slices, a pause after each), a real SIGTERM, a real webhook receiver."""

from __future__ import annotations

import signal
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from ccat_assets.instance import write_instance_yaml
from ccat_assets.status import print_status
from ccat_dt.checksums import hash_file
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    LocationType,
    Notification,
    PackageCopy,
    RawDataPackage,
    Reattempt,
    utcnow,
)
from ccat_dt.reattempt import unsettled
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    ChildResult,
    archived_everywhere,
    child_argv,
    deployment,
    finish,
    observe,
    spawn,
    wait_for,
)
from tests.notify_servers import Receiver

HORIZON_S = 0.5  # far shorter than the time between two drives (each starts in seconds)
# A copy of ~20 slices: 2 s when a drive is left to finish it; ~100 s in the drives stopped
# once it has begun, so that it never ends before the signal however loaded the machine is.
SLICE_S, STOPPED_SLICE_S = 0.1, 5.0
STOPPED = "each before it finished: a drive stopped by a timeout or a shutdown? give it longer"


def stopped_drive(config: Config, home: Path, marker: Path,
                  until: Callable[[], bool] = lambda: True) -> ChildResult:
    """A drive, SIGTERMed (as `timeout` stops it) once a copy has begun to land (and `until`
    holds: a message it sends recorded, lest the signal land between its delivery and its
    record, the one message a cut tick may send again: notify.reconcile)."""
    process = spawn(child_argv(config, "drive", kill="slow-copy", slow_s=STOPPED_SLICE_S,
                               marker=str(marker), home=str(home), wait=60),
                    sigint_ignored=True)
    try:
        wait_for(marker, process, timeout=300)
        assert Path(marker.read_text()).exists()  # the copy's temporary at its destination
        deadline = time.monotonic() + 120
        while not until():
            assert process.poll() is None and time.monotonic() < deadline, (
                f"the drive ended ({process.poll()}) or timed out before: {until.__doc__}")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        return finish(process, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()


def told(receiver: Receiver) -> list[str]:
    return [text.splitlines()[0] for text in receiver.texts]


def test_a_transfer_stopped_at_every_drive_is_told_once_and_resolved_when_a_drive_finishes_it(
        tmp_path: Path, webhook_receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = deployment(tmp_path / "deploy", notifications={
        "webhook": {"url": webhook_receiver.url, "timeout_s": 2}, "remind_after_hours": 1},
        policies={"retry_backoff_first_s": 0.2, "retry_horizon_hours": HORIZON_S / 3600})
    opsdb = OpsDB(config.opsdb_url)
    try:
        raw = {path.name: path.read_bytes()
               for path in observe(config, opsdb, files=3, size=400_000)}  # ~20 slices
        home = write_instance_yaml(config, tmp_path / "dagster_home").parent
        for n in range(2):  # stopped twice: the first and the second stop past the horizon
            out = stopped_drive(config, home, tmp_path / f"copying-{n}")
            assert "CANCELED site_copy" in out.stdout or "CANCELED reattempt:site_copy" in (
                out.stdout), out.stdout[-3000:]
            assert "the drive was stopped" in out.stdout and "FAILED" not in out.stdout, (
                out.stdout[-3000:])
        assert webhook_receiver.posts == []  # no drive has looked since the second stop

        # The third drive tells a person, and still asks for the work: its copy begins
        # again (and is stopped again).
        def recorded() -> bool:
            """a person told of the work stopped again and again (the notice recorded)"""
            with opsdb.session() as session:
                return bool(session.scalars(select(Notification).where(
                    Notification.sent_at.is_not(None))).all())

        third = stopped_drive(config, home, tmp_path / "copying-2", until=recorded)
        assert "CANCELED reattempt:site_copy" in third.stdout, third.stdout[-3000:]
        subjects = told(webhook_receiver)
        assert subjects and all(STOPPED in s and "site copy" in s for s in subjects), subjects
        assert len(subjects) == len(set(subjects)), subjects  # each work once
        with opsdb.session() as session:
            rows = [r for r in unsettled(session, config) if r.stopped_told_at is not None]
            assert {f"[ccat-dt] site copy {r.partition} canceled" for r in rows} == {
                s.split(" times since")[0].rsplit(" ", 1)[0] for s in subjects}
            assert all(r.escalated_at is None and r.attempts == 0 for r in rows)  # no failure
            [package] = session.scalars(select(RawDataPackage.name)).all()
            why = {s.stage: s.detail for s in diagnose(session, config, package, utcnow())}
        assert any(STOPPED in detail and "next attempt at" in detail
                   for detail in why.values()), why
        print_status(opsdb, config)
        lines = [line for line in capsys.readouterr().out.splitlines()
                 if line.startswith("re-attempt site copy") and STOPPED in line]
        assert len(lines) == len(subjects) and all(
            "still re-attempted automatically" in line and "next attempt at" in line
            for line in lines), lines

        fourth = stopped_drive(config, home, tmp_path / "copying-3")  # stopped again: nobody
        assert "CANCELED reattempt:site_copy" in fourth.stdout, fourth.stdout[-3000:]  # is
        assert told(webhook_receiver) == subjects  # told again

        # A drive given the time it needs: the work is done, the notice resolved.
        process = spawn(child_argv(config, "drive", kill="slow-copy", slow_s=SLICE_S,
                                   home=str(home), wait=60))
        try:
            done = finish(process, timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
        assert done.returncode == 0 and done.result["result"]["failed"] == [], done.stdout[-3000:]
        assert told(webhook_receiver)[len(subjects):] == [
            s.replace("[ccat-dt] ", "[ccat-dt] RESOLVED: ") for s in subjects]
        archived_everywhere(config, opsdb)
        with opsdb.session() as session:
            assert session.scalars(select(Reattempt)).all() == []
            [built] = session.scalars(select(RawDataPackage)).all()
            archives = [c for c in session.scalars(select(PackageCopy))
                        if c.location.location_type == LocationType.LONG_TERM_ARCHIVE
                        and c.status == CopyStatus.PRESENT]
            paths = [config.resolve_root(c.location.root) / c.relative_path for c in archives]
            checksum = built.checksum
        assert len(paths) == len(config.settings.archive_sites)
        for path in paths:  # the tar as it lies at the storage: its hash and every file in it
            assert hash_file(path)[0] == checksum
            with tarfile.open(path) as tar:
                inside = {Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                          for m in tar.getmembers() if m.isfile()}
            assert {name: inside.get(name) for name in raw} == raw
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()
