"""Notifications against a real SMTP server (aiosmtpd) and a real HTTP receiver: one message
per problem, a reminder, a resolved message, and a mail server that is down delays nothing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.transports.local as local
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.diagnosis import diagnose
from ccat_dt.notify import Problem, channels, reconcile
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Notification, utcnow
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    REPO,
    archived_everywhere,
    deployment,
    observe,
    package_names,
)
from tests.faults.retrying import operator_retry
from tests.notify_servers import Mailbox, Receiver, free_port, mail_server


def _notified(tmp_path: Path, smtp_port: int, url: str, **policies: object):  # type: ignore[no-untyped-def]
    return deployment(tmp_path / "deploy", notifications={
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "from": "ccat-dt@example.org",
                 "to": ["ops@example.org"], "timeout_s": 2},
        "webhook": {"url": url, "timeout_s": 2}, "remind_after_hours": 1},
        policies={"max_attempts": 1, "retry_backoff_first_s": 0.2, **policies})


PROBLEM = Problem("quarantined:pkg-a", "quarantined", "package pkg-a quarantined",
                  "restore the file, then ccat-dt retry --rebuild-failed")


def test_one_message_per_problem_a_reminder_and_resolved(
        tmp_path: Path, smtp_server: Mailbox, webhook_receiver: Receiver) -> None:
    config = _notified(tmp_path, smtp_server.port, webhook_receiver.url)
    opsdb = OpsDB(config.opsdb_url)
    targets, now = channels(config), utcnow()
    remind = timedelta(hours=1)

    for tick in range(3):  # the same problem at three ticks: told once
        reconcile(opsdb, [PROBLEM], targets, now + timedelta(minutes=tick), remind_after=remind)
    assert smtp_server.subjects == ["[ccat-dt] package pkg-a quarantined"]
    assert webhook_receiver.texts == ["[ccat-dt] package pkg-a quarantined\n" + PROBLEM.detail]
    message = smtp_server.messages[0]
    assert message["To"] == "ops@example.org" and "retry --rebuild-failed" in str(
        message.get_payload())

    reconcile(opsdb, [PROBLEM], targets, now + timedelta(minutes=61), remind_after=remind)
    reconcile(opsdb, [PROBLEM], targets, now + timedelta(minutes=62), remind_after=remind)
    assert smtp_server.subjects[1:] == ["[ccat-dt] REMINDER: package pkg-a quarantined"]

    reconcile(opsdb, [], targets, now + timedelta(minutes=70), remind_after=remind)
    reconcile(opsdb, [], targets, now + timedelta(minutes=71), remind_after=remind)
    assert smtp_server.subjects[2:] == ["[ccat-dt] RESOLVED: package pkg-a quarantined"]
    assert len(webhook_receiver.posts) == 3
    assert webhook_receiver.texts[2].startswith("[ccat-dt] RESOLVED: package pkg-a")
    with opsdb.session() as session:
        rows = session.scalars(select(Notification)).all()
        assert sorted(r.channel for r in rows) == ["smtp", "webhook"]
        assert all(r.closed and r.sends == 2 for r in rows)
    opsdb.dispose()


def test_a_mail_server_that_is_down_is_retried_and_never_blocks(
        tmp_path: Path, webhook_receiver: Receiver) -> None:
    port = free_port()  # nothing listens here yet
    config = _notified(tmp_path, port, webhook_receiver.url)
    opsdb = OpsDB(config.opsdb_url)
    targets, now = channels(config), utcnow()
    started = time.monotonic()
    first = reconcile(opsdb, [PROBLEM], targets, now, remind_after=timedelta(hours=1))
    assert time.monotonic() - started < 3
    assert first.failed == ["smtp problem quarantined:pkg-a"]
    assert first.sent == ["webhook problem quarantined:pkg-a"]

    from aiosmtpd.controller import Controller

    from tests.notify_servers import _Handler

    box = Mailbox(port)
    controller = Controller(_Handler(box), hostname="127.0.0.1", port=port)
    controller.start()  # the mail server comes back
    try:
        again = reconcile(opsdb, [PROBLEM], targets, now + timedelta(minutes=1),
                          remind_after=timedelta(hours=1))
    finally:
        controller.stop()
    assert again.sent == ["smtp problem quarantined:pkg-a"]  # webhook: already told
    assert box.subjects == ["[ccat-dt] package pkg-a quarantined"]
    assert len(webhook_receiver.posts) == 1
    opsdb.dispose()


SIX = [Problem(f"quarantined:pkg-{i}", "quarantined", f"package pkg-{i} quarantined",
               "restore the file") for i in range(6)]
TICK = """
import sys
from datetime import datetime, timedelta
from ccat_dt.config import load_config
from ccat_dt.notify import Problem, channels, reconcile
from ccat_dt.opsdb.database import OpsDB
config = load_config(sys.argv[1])
problems = [Problem(f"quarantined:pkg-{i}", "quarantined", f"package pkg-{i} quarantined",
                    "restore the file") for i in range(6)]
reconcile(OpsDB(config.opsdb_url), problems, channels(config),
          datetime.fromisoformat(sys.argv[2]), remind_after=timedelta(hours=1))
"""


def test_a_tick_cut_off_never_sends_again_what_it_delivered(tmp_path: Path) -> None:
    """The notification tick's process is killed (SIGKILL: the daemon restarted, a drive
    stopped, a tick the daemon gave up on) while it delivers six messages to a slow mail
    server; the next tick sends the rest. Each message arrives once, but for the one in
    flight at the kill (the server had it, its answer had not come). Before, what a tick
    delivered was recorded only at its end: everything it had sent was sent again."""
    now = utcnow()
    with mail_server(delay_s=0.3) as box:
        config = deployment(tmp_path / "smtp-only", notifications={
            "smtp": {"host": "127.0.0.1", "port": box.port, "from": "ccat-dt@example.org",
                     "to": ["ops@example.org"], "timeout_s": 5}})
        tick = subprocess.Popen([sys.executable, "-c", TICK, str(config.path), now.isoformat()],
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 60
        while len(box.messages) < 3 and tick.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        tick.kill()
        tick.wait()
        before = list(box.subjects)
        assert 3 <= len(before) < 6, before  # cut in the middle of the tick

        opsdb = OpsDB(config.opsdb_url)
        delivery = reconcile(opsdb, SIX, channels(config), now + timedelta(minutes=1),
                             remind_after=timedelta(hours=1))
        opsdb.dispose()
    told = Counter(box.subjects)
    assert sorted(told) == sorted(f"[ccat-dt] {p.subject}" for p in SIX)
    assert all(told[subject] == 1 for subject in before[:-1]), told  # delivered: not again
    assert len(delivery.sent) in (6 - len(before), 7 - len(before)), delivery  # the rest, and
    # at most the one in flight at the kill


def test_a_slow_mail_server_gets_what_a_tick_has_no_time_for_at_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick stops starting deliveries once its time (TICK_BUDGET_S) is up: a slow relay
    and many problems (a weekend's escalations) no longer hold the drive's loop, or outlast
    the daemon's sensor time-out and overlap the next tick. What it left is sent at the
    next ticks, each message once, none recorded as failed."""
    import ccat_dt.notify as notify

    monkeypatch.setattr(notify, "TICK_BUDGET_S", 1.0)
    now = utcnow()
    with mail_server(delay_s=0.4) as box:
        config = deployment(tmp_path / "smtp-only", notifications={
            "smtp": {"host": "127.0.0.1", "port": box.port, "from": "ccat-dt@example.org",
                     "to": ["ops@example.org"], "timeout_s": 5}})
        opsdb = OpsDB(config.opsdb_url)
        ticks = []
        for minute in range(len(SIX)):  # each tick sends at least one
            ticks.append(reconcile(opsdb, SIX, channels(config), now + timedelta(minutes=minute),
                                   remind_after=timedelta(hours=1)))
            if not ticks[-1].deferred:
                break
    first = ticks[0]
    assert 1 <= len(first.sent) <= 4 and first.failed == [], first  # 0.4 s each, 1 s budget
    assert len(first.sent) + len(first.deferred) == len(SIX)
    assert sum(len(t.sent) for t in ticks) == len(SIX) and not ticks[-1].deferred
    assert Counter(box.subjects) == Counter(f"[ccat-dt] {p.subject}" for p in SIX)
    with opsdb.session() as session:
        rows = session.scalars(select(Notification)).all()
        assert len(rows) == len(SIX) and all(r.sends == 1 and r.last_error is None for r in rows)
    opsdb.dispose()


def test_a_quarantined_package_is_told_once_through_the_pipeline_with_the_mail_server_down(
        tmp_path: Path, webhook_receiver: Receiver, instance: DagsterInstance) -> None:
    """A source file changed after filing: the package is quarantined and the webhook says
    so once; the mail server is down, which neither fails nor slows any run; a second
    observation goes through the whole lifecycle meanwhile."""
    config = _notified(tmp_path, free_port(), webhook_receiver.url)
    opsdb = OpsDB(config.opsdb_url)
    try:
        files = observe(config, opsdb, name="obs-0")
        files[0].write_bytes(b"changed after filing")
        observe(config, opsdb, name="obs-1")
        defs = build_definitions(config)

        report = drive(defs, instance)
        drive(defs, instance)

        assert [key.split(":")[:2] for key in report.failed] == [
            ["package", "obs-0_primecam-f280_p00"]]
        quarantined = [t for t in webhook_receiver.texts if "quarantined" in t]
        assert len(quarantined) == 1 and "obs-0_primecam-f280_p00" in quarantined[0]
        assert len(webhook_receiver.posts) == 1  # nothing about anything else
        [healthy] = [p for p in package_names(opsdb) if p.startswith("obs-1")]
        with opsdb.session() as session:
            smtp = session.scalars(select(Notification).where(
                Notification.channel == "smtp")).all()
            assert [r.sent_at for r in smtp] == [None] and "Connection refused" in (
                smtp[0].last_error or "")
        assert healthy
        assert_safe(config, opsdb, expected_findings=[
            ("changed", "obs-0/primecam/f280/scan-0.dat")])
    finally:
        opsdb.dispose()




def test_work_failing_past_the_horizon_is_escalated_told_once_and_resolved(
        tmp_path: Path, webhook_receiver: Receiver, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination disk that stays full: re-attempted with a growing back-off until the
    horizon, then escalated (no more automatic attempts, `why` and `status` say so, one
    message). Once freed, the operator's retry converges and a "resolved" message follows."""
    config = deployment(tmp_path / "deploy", notifications={
        "webhook": {"url": webhook_receiver.url, "timeout_s": 2}},
        policies={"max_attempts": 1, "retry_backoff_first_s": 0.3,
                  "retry_horizon_hours": 1.5 / 3600})
    opsdb = OpsDB(config.opsdb_url)
    try:
        observe(config, opsdb)

        def full(source: int, destination: int, length: int, buffer: bytearray) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(local, "_copy_slice", full)
        report = drive(build_definitions(config), instance, wait_s=5)

        [package] = package_names(opsdb)
        attempts = len(report.failed)  # the first run, then automatic re-attempts until the
        assert attempts >= 2  # horizon (how many fit depends on how long each run takes)
        assert [k.split(":")[0] for k in report.failed] == ["site_copy"] + ["reattempt"] * (
            attempts - 1)
        assert report.next_due is None  # escalated: nothing more is scheduled
        disk, told = webhook_receiver.texts  # the disk at once, the work at the horizon
        assert "buffer cologne/buffer full since" in disk and "Make room" in disk
        assert f"site copy {package}|cologne still failing after {attempts} attempts" in told
        assert "No space left on device" in told and "ccat-dt retry" in told
        with opsdb.session() as session:
            stage = {s.stage: s for s in diagnose(session, config, package, utcnow())}
        assert stage["site copy cologne"].state == "failed"
        assert "escalated at" in stage["site copy cologne"].detail
        assert drive(build_definitions(config), instance, wait_s=0).launched == []
        assert len(webhook_receiver.posts) == 2  # not told again

        # A person retries before the cause is fixed: the run fails again, so nothing is
        # "resolved" (the work goes back to automatic attempts, the problem stays open).
        operator_retry(config, instance, opsdb)
        drive(build_definitions(config), instance, wait_s=0)
        assert len(webhook_receiver.posts) == 2, webhook_receiver.texts

        monkeypatch.undo()  # space is freed; a person retries, as the message said
        operator_retry(config, instance, opsdb)

        archived_everywhere(config, opsdb)
        assert len(webhook_receiver.posts) == 4
        assert sorted(t.splitlines()[0] for t in webhook_receiver.texts[2:]) == [
            f"[ccat-dt] RESOLVED: {subject}" for subject in sorted(
                t.splitlines()[0].removeprefix("[ccat-dt] ") for t in (disk, told))]
        assert_safe(config, opsdb)
    finally:
        opsdb.dispose()



def test_a_mail_server_that_never_answers_holds_a_drive_once_per_interval_not_every_round(
        tmp_path: Path, webhook_receiver: Receiver, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mail server that accepts the connection and never says a word costs its timeout at
    every delivery. `drive` ticks the notification sensor as the daemon does, once per its
    interval and as the drive ends, not in every round between runs (where it held the next
    runs for the timeout each time)."""
    import socket

    import ccat_dt.notify as notify

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing is ever said
    config = _notified(tmp_path, silent.getsockname()[1], webhook_receiver.url)
    opsdb = OpsDB(config.opsdb_url)
    problem = notify.Problem("quarantined:pkg-x", "quarantined", "package pkg-x quarantined",
                             "a problem open all along")
    real = notify.current_problems
    ticks: list[int] = []

    def with_a_problem(*args, **kwargs):  # type: ignore[no-untyped-def]
        ticks.append(1)
        return [*real(*args, **kwargs), problem]

    monkeypatch.setattr("sensors.notify.current_problems", with_a_problem)
    try:
        observe(config, opsdb)
        report = drive(build_definitions(config), instance, wait_s=5)
    finally:
        silent.close()
        opsdb.dispose()

    assert report.failed == [] and report.rounds > 3
    assert len(ticks) <= 2, (len(ticks), report.rounds)  # the first round's, and the last
    assert len(webhook_receiver.posts) == 1  # the webhook told it, once
