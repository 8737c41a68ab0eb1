"""Notifications against a real SMTP server (aiosmtpd) and a real HTTP receiver: one message
per problem, a reminder, a resolved message, and a mail server that is down delays nothing."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select

import ccat_dt.transports.local as local
from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_assets.status import print_status
from ccat_dt.config import Config, load_config
from ccat_dt.diagnosis import diagnose
from ccat_dt.notify import Delivery, Problem, channels, current_problems, reconcile
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Notification, utcnow
from ccat_dt.overview import overview
from ccat_dt.stages import Stage
from sensors.overview import metadata
from sensors.reattempt import history as reattempt_history
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    REPO,
    archived_everywhere,
    deployment,
    observe,
    package_names,
)
from tests.faults.retrying import operator_retry
from tests.notify_servers import Mailbox, Receiver, certificate, free_port, mail_server


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
        # Each run copied and archived in one; the copy failed, the archiving never began:
        # no failed attempt of it (or the one full disk is escalated and told twice).
        assert reattempt_history(instance, Stage.LTA_COPY, package, "cologne") == []
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
        assert len(webhook_receiver.posts) == 4, [t.splitlines()[0] for t in webhook_receiver.texts]
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


# --- refused for good vs for now --------------------------------------------------------------

# How a mail server refuses for good, and what `status` then names: recipient or server, reply.
FOR_GOOD = {
    "no-such-mailbox": ({"ops@example.org": "550 5.1.1 mailbox unavailable"}, None,
                        "ops@example.org: 550 5.1.1 mailbox unavailable"),
    "bad-address": ({"ops@example.org": "553 5.1.3 bad destination address"}, None,
                    "ops@example.org: 553 5.1.3 bad destination address"),
    "transaction-failed": ({"DATA": "554 5.7.1 transaction failed"}, None,
                           "554 5.7.1 transaction failed"),
    "authentication-failed": ({}, "the right one", "535 5.7.8 Authentication credentials "
                                                   "invalid"),
    "starttls-required": ({"MAIL": "530 5.7.0 Must issue a STARTTLS command first"}, None,
                          "(from) at server 127.0.0.1:"),
}


def _with_smtp(config: Config, **smtp: object) -> Config:
    """The same deployment with other mail settings (the operator edited them)."""
    settings = config.settings.notifications
    assert settings.smtp is not None
    changed = settings.smtp.model_copy(update=smtp)
    return Config(config.settings.model_copy(update={
        "notifications": settings.model_copy(update={"smtp": changed})}), config.path)


def _tick(config: Config, opsdb: OpsDB, at: datetime, logs: list[str]) -> Delivery:
    """One notification tick, as the sensor runs it, with PROBLEM open."""
    with opsdb.session() as session:
        problems = [PROBLEM, *current_problems(session, config, at)]
    return reconcile(opsdb, problems, channels(config), at, remind_after=timedelta(hours=1),
                     log=logs.append)


def _status(opsdb: OpsDB, config: Config, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    print_status(opsdb, config)
    return capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("how", FOR_GOOD)
def test_a_mail_server_refusing_for_good_is_told_once_and_its_messages_go_once_fixed(
        how: str, tmp_path: Path, webhook_receiver: Receiver,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5xx reply (no such mailbox, a bad address, the transaction or the login refused, TLS
    required) is refused again at every attempt. It is tried once, logged once, `status`
    and the other channel name it (recipient or server, and the reply), and its messages wait;
    once the settings are fixed they go, once each, and the other channel hears it resolved.
    Before, it was retried at every tick for ever like a 451, and nobody was told."""
    refuse, password, reason = FOR_GOOD[how]
    monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "a wrong one")
    logs: list[str] = []
    now = utcnow()
    with mail_server(refuse=refuse, password=password) as refusing:
        config = _notified(tmp_path, refusing.port, webhook_receiver.url)
        if password is not None:
            config = _with_smtp(config, username="ccat")
        opsdb = OpsDB(config.opsdb_url)
        ticks = [_tick(config, opsdb, now, logs)]
        tried = refusing.refusals  # a login is refused once per mechanism smtplib tries
        ticks += [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(1, 4)]
        assert tried and refusing.refusals == tried  # tried once, not at every tick
        assert refusing.messages == []
    assert ticks[0].failed == ["smtp problem quarantined:pkg-a"]
    assert ticks[-1].held == ["smtp problem quarantined:pkg-a"] and not ticks[-1].failed
    [logged] = logs
    assert reason in logged and "notifications over smtp undeliverable" in logged
    shown = _status(opsdb, config, capsys)
    assert "notifications undeliverable: " in shown and reason in shown, shown
    assert "problem [smtp] package pkg-a quarantined: not yet delivered (held: " in shown
    with opsdb.session() as session:  # and the operator's overview in the UI
        figures = metadata(overview(session, config, now))
    assert "Notifications undeliverable" in str(figures["overview"].value)
    assert reason in str(figures["overview"].value)
    undeliverable = [t for t in webhook_receiver.texts if "undeliverable" in t]
    assert len(undeliverable) == 1 and reason in undeliverable[0]  # the other channel tells
    assert "Fix notifications.smtp" in undeliverable[0]

    with mail_server() as fixed:  # the operator gives another server (or address, login)
        config = _with_smtp(config, port=fixed.port, username=None)
        for minute in range(5, 8):
            _tick(config, opsdb, now + timedelta(minutes=minute), logs)
    assert fixed.subjects == ["[ccat-dt] package pkg-a quarantined"]  # what waited, once
    assert len(logs) == 1
    assert "undeliverable" not in _status(opsdb, config, capsys)
    assert webhook_receiver.texts[-1].startswith(
        "[ccat-dt] RESOLVED: notifications over smtp undeliverable")
    opsdb.dispose()


def test_a_mail_server_with_an_unknown_name_is_held_not_tried_every_tick(
        tmp_path: Path, webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    """A host name that does not resolve (a typo) is a setting to fix, not a server down. Held,
    it is still tried once per `remind_after_hours` (a fix made elsewhere is found), quietly."""
    config = _with_smtp(_notified(tmp_path, 25, webhook_receiver.url),
                        host="smtp.example.invalid")
    opsdb = OpsDB(config.opsdb_url)
    logs: list[str] = []
    now = utcnow()
    ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(3)]
    [logged] = logs  # before: one "failed (tried again later)" per tick
    assert "smtp.example.invalid:25: unknown host" in logged
    assert ticks[0].failed and ticks[-1].held and not ticks[-1].failed
    hour_later = _tick(config, opsdb, now + timedelta(minutes=61), logs)
    assert hour_later.failed and not hour_later.held and len(logs) == 1
    assert _tick(config, opsdb, now + timedelta(minutes=62), logs).held
    assert "notifications undeliverable: server smtp.example.invalid:25: unknown host" in (
        _status(opsdb, config, capsys))
    opsdb.dispose()


def test_one_recipient_refused_for_good_is_told_and_the_others_still_get_every_message(
        tmp_path: Path, webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    """One address of two is refused (550) while the other takes the message: smtplib
    reports that as a success, so before, nobody ever learnt that one person heard nothing.
    Now it is logged once and named by `status` and the other channel; the other recipient
    gets every message (nothing held); a delivery to all once the address is fixed clears it."""
    logs: list[str] = []
    now = utcnow()
    with mail_server(refuse={"boss@example.org": "550 5.1.1 mailbox unavailable"}) as box:
        config = _with_smtp(_notified(tmp_path, box.port, webhook_receiver.url),
                            to=["ops@example.org", "boss@example.org"])
        opsdb = OpsDB(config.opsdb_url)
        ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(3)]
        assert box.recipients[0] == ["ops@example.org"]
        [logged] = logs
        assert "boss@example.org: 550 5.1.1 mailbox unavailable" in logged
        assert "notifications undeliverable: boss@example.org: 550 5.1.1 mailbox unavailable" \
            in _status(opsdb, config, capsys)
        assert not any(t.held or t.failed for t in ticks)
        # a new problem still goes to the other recipient, and it hears of the refusal too
        assert box.subjects == ["[ccat-dt] package pkg-a quarantined",
                                "[ccat-dt] notifications over smtp undeliverable: "
                                "boss@example.org: 550 5.1.1 mailbox unavailable"]
        assert any("boss@example.org: 550" in t for t in webhook_receiver.texts)

        config = _with_smtp(config, to=["ops@example.org", "chief@example.org"])  # fixed
        later = Problem("quarantined:pkg-b", "quarantined", "package pkg-b quarantined", "x")
        reconcile(opsdb, [PROBLEM, later], channels(config), now + timedelta(minutes=5),
                  remind_after=timedelta(hours=1), log=logs.append)
    assert box.recipients[-1] == ["ops@example.org", "chief@example.org"]
    assert "undeliverable" not in _status(opsdb, config, capsys) and len(logs) == 1
    opsdb.dispose()


@pytest.mark.parametrize("refuse", [{"MAIL": "421 4.3.2 service shutting down"},
                                    {"ops@example.org": "450 4.2.1 mailbox busy"},
                                    {"DATA": "451 4.3.0 local error, try again later"}],
                         ids=["421", "450", "451"])
def test_a_refusal_for_now_is_tried_at_every_tick_and_delivered_once_when_it_passes(
        refuse: dict[str, str], tmp_path: Path) -> None:
    """A 4xx reply is for now: nothing is held, the next ticks try again by themselves, and
    the message arrives once when the server takes it."""
    logs: list[str] = []
    now = utcnow()
    with mail_server(refuse=refuse) as box:
        config = deployment(tmp_path / "smtp-only", notifications={
            "smtp": {"host": "127.0.0.1", "port": box.port, "from": "ccat-dt@example.org",
                     "to": ["ops@example.org"], "timeout_s": 2}})
        opsdb = OpsDB(config.opsdb_url)
        for minute in range(3):
            assert _tick(config, opsdb, now + timedelta(minutes=minute), logs).failed
        assert box.refusals == 3 and not any("undeliverable" in line for line in logs)
        box.refuse.clear()  # the server takes mail again
        for minute in range(3, 6):
            _tick(config, opsdb, now + timedelta(minutes=minute), logs)
    assert box.subjects == ["[ccat-dt] package pkg-a quarantined"]
    opsdb.dispose()


def test_a_mail_relay_failing_for_now_past_the_horizon_is_told_over_the_webhook(
        tmp_path: Path, webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str]) -> None:
    """The relay answers 421 at every tick for longer than `remind_after_hours` (1 h here):
    still tried at every tick, and now told once over the webhook, naming the channel and its
    last reply, and by `status`. Once the relay takes mail again, what waited is delivered
    once and the webhook hears it resolved. Before, a failure for now was only logged, for
    ever: nobody heard that no e-mail had gone for days."""
    logs: list[str] = []
    start = utcnow() - timedelta(hours=3)  # `status` reads the clock: past the horizon then
    refusal = "421 4.3.2 service shutting down"
    with mail_server(refuse={"MAIL": refusal}) as box:
        config = _notified(tmp_path, box.port, webhook_receiver.url)
        opsdb = OpsDB(config.opsdb_url)
        for minute in (0, 1, 30, 59):  # within the horizon: a failure for now, not told
            assert _tick(config, opsdb, start + timedelta(minutes=minute), logs).failed
        assert not any("failing" in text for text in webhook_receiver.texts)
        for minute in (61, 62, 90):  # past it, still refused: told once, over the webhook
            tick = _tick(config, opsdb, start + timedelta(minutes=minute), logs)
            assert tick.failed == ["smtp problem quarantined:pkg-a"], tick  # tried every tick
        assert box.refusals == 7 and box.messages == []
        [told] = [text for text in webhook_receiver.texts if "failing" in text]
        where = f"server 127.0.0.1:{box.port}: {refusal}"
        assert told.startswith(f"[ccat-dt] notifications over smtp failing since "
                               f"{start:%Y-%m-%d %H:%M} UTC: {where}"), told
        assert "tried again at every tick" in told
        shown = _status(opsdb, config, capsys)
        assert f"notifications failing: {where} (over smtp: nothing delivered since " \
            f"{start:%Y-%m-%d %H:%M} UTC" in shown, shown
        assert "problem [webhook] notifications over smtp failing" in shown
        with opsdb.session() as session:  # and the operator's overview in the UI
            figures = metadata(overview(session, config, utcnow()))
        assert f"**Notifications failing**: smtp: {where}" in str(figures["overview"].value)

        box.refuse.clear()  # the relay takes mail again
        for minute in (91, 92, 93):
            _tick(config, opsdb, start + timedelta(minutes=minute), logs)
    assert box.subjects == ["[ccat-dt] package pkg-a quarantined"]  # what waited, once
    assert [text.partition("\n")[0] for text in webhook_receiver.texts
            if "failing" in text] == [told.partition("\n")[0], "[ccat-dt] RESOLVED: "
                                      + told.partition("\n")[0].removeprefix("[ccat-dt] ")]
    assert "failing" not in _status(opsdb, config, capsys)
    opsdb.dispose()


def test_a_mail_relay_failing_with_nothing_waiting_is_not_told(
        tmp_path: Path, webhook_receiver: Receiver) -> None:
    """The relay answers 421 while a problem is open; the problem clears before the relay
    takes mail (nothing was told over it: nothing to take back). Nothing waits over it any
    more, so it is not "failing" past the horizon: no message about it."""
    now = utcnow()
    with mail_server(refuse={"MAIL": "421 4.3.2 service shutting down"}) as box:
        config = _notified(tmp_path, box.port, webhook_receiver.url)
        opsdb = OpsDB(config.opsdb_url)
        assert reconcile(opsdb, [PROBLEM], channels(config), now,
                         remind_after=timedelta(hours=1)).failed
        for minute in (5, 120, 121):  # cleared; nothing over smtp from then on
            with opsdb.session() as session:
                problems = current_problems(session, config, now + timedelta(minutes=minute))
            reconcile(opsdb, problems, channels(config), now + timedelta(minutes=minute),
                      remind_after=timedelta(hours=1))
        assert box.refusals == 1 and box.messages == []
    assert [text.partition("\n")[0] for text in webhook_receiver.texts] == [
        "[ccat-dt] package pkg-a quarantined", "[ccat-dt] RESOLVED: package pkg-a quarantined"]
    opsdb.dispose()


def test_a_webhook_that_is_gone_is_held_until_its_url_changes(
        tmp_path: Path, smtp_server: Mailbox, webhook_receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A webhook answering 404 (revoked, mistyped) is refused for good like a 550: tried
    once, logged once, named by `status` (its host: the URL's path is a secret) and the mail;
    a new URL gets what waited."""
    webhook_receiver.status = 404
    config = _notified(tmp_path, smtp_server.port, webhook_receiver.url)
    opsdb = OpsDB(config.opsdb_url)
    logs: list[str] = []
    now = utcnow()
    ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(3)]
    [logged] = logs  # before: one "failed (tried again later)" per tick
    where = f"webhook at 127.0.0.1:{webhook_receiver.port}: 404 Not Found"
    assert where in logged and "/hooks/ccat" not in logged
    assert ticks[-1].held == ["webhook problem quarantined:pkg-a"]
    assert f"notifications undeliverable: {where}" in _status(opsdb, config, capsys)
    assert any(where in s for s in smtp_server.subjects)

    webhook_receiver.status = 200
    settings = config.settings.notifications
    assert settings.webhook is not None
    config = Config(config.settings.model_copy(update={"notifications": settings.model_copy(
        update={"webhook": settings.webhook.model_copy(
            update={"url": webhook_receiver.url + "/new"})})}), config.path)
    _tick(config, opsdb, now + timedelta(minutes=5), logs)
    assert webhook_receiver.texts[0].startswith("[ccat-dt] package pkg-a quarantined")
    opsdb.dispose()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_login_refused_for_good_goes_once_the_password_in_the_environment_is_fixed(
        tmp_path: Path, webhook_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 535 is fixed where the password lives, `$CCAT_DT_SMTP_PASSWORD`, not in the file:
    the held channel is tried at the next tick after that, not a day later."""
    monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "a wrong one")
    logs: list[str] = []
    now = utcnow()
    with mail_server(password="the right one") as server:
        config = _with_smtp(_notified(tmp_path, server.port, webhook_receiver.url),
                            username="ccat")
        opsdb = OpsDB(config.opsdb_url)
        _tick(config, opsdb, now, logs)
        assert _tick(config, opsdb, now + timedelta(minutes=1), logs).held
        monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "the right one")
        fixed = _tick(config, opsdb, now + timedelta(minutes=2), logs)
    assert fixed.sent and not fixed.held, fixed
    assert server.subjects == ["[ccat-dt] package pkg-a quarantined"]
    opsdb.dispose()


# --- the relay's certificate ------------------------------------------------------------------


def _smtp_in_file(config: Config, **smtp: object) -> Config:
    """The operator edits notifications.smtp in the configuration file; it is loaded again."""
    data = yaml.safe_load(config.path.read_text())
    data["notifications"]["smtp"].update(smtp)
    config.path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(config.path)


def test_a_relay_whose_certificate_is_not_trusted_gets_no_password_until_its_ca_is_given(
        tmp_path: Path, webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """STARTTLS verifies the relay's certificate. One that no CA vouches for (anybody on the
    path can present one) is refused for good before the login: the server never receives
    AUTH, nothing is sent, the channel is held, and `status` and the other channel name the
    server, say the certificate was not trusted and what to do. Once its CA is in `ca_file`
    (a site-internal CA: here the certificate itself, added to the site's bundle) it is
    trusted, and what waited goes. Before, starttls() checked nothing: the password and every
    alert went to whoever answered."""
    monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "the right one")
    logs: list[str] = []
    now = utcnow()
    deploy = tmp_path / "deploy"
    relay_tls = certificate(deploy / "tls")
    with mail_server(password="the right one", tls=relay_tls) as relay:
        config = _smtp_in_file(_notified(tmp_path, relay.port, webhook_receiver.url),
                               starttls=True, username="ccat")
        opsdb = OpsDB(config.opsdb_url)
        ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(2)]
        assert relay.auths == [] and relay.messages == []  # on the server's side: no login
        assert ticks[0].failed == ["smtp problem quarantined:pkg-a"]
        assert ticks[1].held == ["smtp problem quarantined:pkg-a"]
        reason = f"server 127.0.0.1:{relay.port}: TLS certificate not trusted (self"
        [logged] = logs
        assert reason in logged and "no password either" in logged
        assert "set notifications.smtp.ca_file" in logged
        assert reason in _status(opsdb, config, capsys)
        [told] = [t for t in webhook_receiver.texts if "undeliverable" in t]
        assert reason in told and "fix the relay's certificate" in told

        # The site's CA bundle, without the CA of this relay: tried again (new settings),
        # refused again; the relay's CA added to the same file: tried at the next tick.
        bundle, _ = certificate(deploy / "site-ca")
        config = _smtp_in_file(config, ca_file="site-ca/relay.pem")  # relative to the file
        assert _tick(config, opsdb, now + timedelta(minutes=2), logs).failed
        assert _tick(config, opsdb, now + timedelta(minutes=3), logs).held
        assert relay.auths == [] and len(logs) == 2 and str(bundle) in logs[1]
        bundle.write_text(bundle.read_text() + relay_tls[0].read_text())
        fixed = _tick(config, opsdb, now + timedelta(minutes=4), logs)
        _tick(config, opsdb, now + timedelta(minutes=5), logs)
    assert fixed.sent == ["smtp problem quarantined:pkg-a"], fixed
    assert relay.auths and relay.subjects == ["[ccat-dt] package pkg-a quarantined"]
    assert "undeliverable" not in _status(opsdb, config, capsys)
    assert webhook_receiver.texts[-1].startswith(
        "[ccat-dt] RESOLVED: notifications over smtp undeliverable")
    opsdb.dispose()


@pytest.mark.parametrize("tls", [{"starttls": True}, {"tls": "implicit"}],
                         ids=["starttls", "implicit"])
def test_a_relay_certificate_for_another_host_name_is_refused_before_the_login(
        tls: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A certificate signed by the CA given, but for another name than `host`: the host
    name is verified too, so it is refused for good, before the password is sent; over
    STARTTLS (as older configurations say it, `starttls: true`) and implicit TLS alike."""
    monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "the right one")
    logs: list[str] = []
    deploy = tmp_path / "deploy"
    with mail_server(password="the right one", implicit="tls" in tls,
                     tls=certificate(deploy / "tls", host="relay.example.org")) as relay:
        config = deployment(deploy, notifications={"smtp": {
            "host": "127.0.0.1", "port": relay.port, "from": "ccat-dt@example.org",
            "to": ["ops@example.org"], "timeout_s": 2, **tls, "username": "ccat",
            "ca_file": "tls/relay.pem"}})
        opsdb = OpsDB(config.opsdb_url)
        tick = _tick(config, opsdb, utcnow(), logs)
        opsdb.dispose()
    assert relay.auths == [] and relay.messages == [] and tick.failed
    [logged] = logs
    assert "TLS certificate not trusted (IP address mismatch" in logged, logged
    assert "undeliverable" in logged


# --- implicit TLS (SMTPS) -----------------------------------------------------------------------


def test_an_implicit_tls_relay_is_verified_as_starttls_is_then_gets_the_login_and_the_mail(
        tmp_path: Path, webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay that speaks TLS from the first byte (SMTPS, port 465: the only port many
    institutional relays take), with `tls: implicit`: its certificate and host name are
    verified as STARTTLS's are, before the login (one no CA vouches for is held, the server
    never receives AUTH); once its CA is in `ca_file`, the login and what waited go. Before,
    no setting spoke it: plain SMTP waited for a greeting that never came, a time-out at
    every tick for ever, and nobody was told."""
    monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "the right one")
    logs: list[str] = []
    now = utcnow()
    with mail_server(password="the right one", tls=certificate(tmp_path / "deploy" / "tls"),
                     implicit=True) as relay:
        config = _smtp_in_file(_notified(tmp_path, relay.port, webhook_receiver.url),
                               tls="implicit", username="ccat")
        opsdb = OpsDB(config.opsdb_url)
        ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(2)]
        assert relay.auths == [] and relay.messages == []
        assert ticks[1].held == ["smtp problem quarantined:pkg-a"]
        [logged] = logs
        reason = f"server 127.0.0.1:{relay.port}: TLS certificate not trusted (self"
        assert reason in logged and "no password either" in logged
        assert reason in _status(opsdb, config, capsys)

        config = _smtp_in_file(config, ca_file="tls/relay.pem")
        fixed = _tick(config, opsdb, now + timedelta(minutes=2), logs)
        _tick(config, opsdb, now + timedelta(minutes=3), logs)  # tells it resolved
    assert fixed.sent == ["smtp problem quarantined:pkg-a"], fixed
    assert relay.auths and relay.subjects == ["[ccat-dt] package pkg-a quarantined"]
    assert "undeliverable" not in _status(opsdb, config, capsys)
    opsdb.dispose()


# (the server speaks TLS from the first byte, the TLS mode configured, what the log says)
MISMATCHED_TLS = {
    "plain-at-an-implicit-tls-port": (True, None, "no SMTP greeting within 1 s, and a TLS "
                                      "handshake there succeeds: an implicit-TLS (SMTPS) port; "
                                      "set notifications.smtp.tls: implicit"),
    "implicit-tls-at-a-plain-port": (False, "implicit", "answered in plain text, not TLS: not "
                                     "an implicit-TLS (SMTPS) port; set notifications.smtp.tls: "
                                     "starttls"),
}


@pytest.mark.parametrize("how", MISMATCHED_TLS)
def test_a_tls_mode_that_does_not_match_the_relay_is_held_saying_which_to_set(
        how: str, tmp_path: Path, webhook_receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Plain SMTP pointed at an SMTPS port (it waits for the client's TLS handshake, the client
    for its greeting), or `tls: implicit` at a port that speaks plain SMTP: refused again at
    every attempt, so held at once, logged once, named by `status` and the other channel with
    the setting to change; nothing was sent (no greeting, no mail). With the right mode the
    message goes. Before, the first was a time-out at every tick for ever, nobody told."""
    implicit_server, mode, reason = MISMATCHED_TLS[how]
    logs: list[str] = []
    now = utcnow()
    with mail_server(tls=certificate(tmp_path / "deploy" / "tls"),
                     implicit=implicit_server) as relay:
        config = _smtp_in_file(_notified(tmp_path, relay.port, webhook_receiver.url),
                               timeout_s=1, **({"tls": mode} if mode else {}))  # default: none
        opsdb = OpsDB(config.opsdb_url)
        ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(3)]
        assert relay.messages == [] and ticks[-1].held and not ticks[-1].failed
        [logged] = logs
        assert f"server 127.0.0.1:{relay.port}: {reason}" in logged, logged
        assert reason in _status(opsdb, config, capsys)
        assert any(reason in text for text in webhook_receiver.texts)

        config = _smtp_in_file(config, tls="implicit" if implicit_server else "starttls",
                               ca_file="tls/relay.pem")
        fixed = _tick(config, opsdb, now + timedelta(minutes=4), logs)
    assert fixed.sent == ["smtp problem quarantined:pkg-a"], fixed
    assert relay.subjects == ["[ccat-dt] package pkg-a quarantined"]
    opsdb.dispose()


# --- the password's environment variable ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_login_whose_password_variable_is_not_in_the_environment_says_so_and_sends_none(
        tmp_path: Path, webhook_receiver: Receiver, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`username` set, `$CCAT_DT_SMTP_PASSWORD` missing from the environment of the process
    that sends (a systemd unit or a shell without it): held at once, nothing sent to the relay
    (no login with an empty password), and the log, `status` and the other channel say what it
    is. Before, it logged in with an empty password and the channel was held as "535
    authentication failed", which sent the operator to the relay. Once the variable is there
    (the process restarted with it), what waited goes at the next tick."""
    monkeypatch.delenv("CCAT_DT_SMTP_PASSWORD", raising=False)
    logs: list[str] = []
    now = utcnow()
    with mail_server(password="the right one") as relay:
        config = _with_smtp(_notified(tmp_path, relay.port, webhook_receiver.url),
                            username="ccat")
        opsdb = OpsDB(config.opsdb_url)
        ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(2)]
        assert relay.auths == [] and relay.refusals == 0 and relay.messages == []
        assert ticks[-1].held == ["smtp problem quarantined:pkg-a"]
        reason = ("notifications.smtp.username is set but $CCAT_DT_SMTP_PASSWORD is not set in "
                  "this process's environment")
        [logged] = logs
        assert reason in logged and "535" not in logged
        shown = _status(opsdb, config, capsys)
        assert f"notifications undeliverable: {reason}" in shown, shown
        [told] = [t for t in webhook_receiver.texts if "undeliverable" in t]
        assert reason in told

        monkeypatch.setenv("CCAT_DT_SMTP_PASSWORD", "the right one")
        fixed = _tick(config, opsdb, now + timedelta(minutes=2), logs)
        _tick(config, opsdb, now + timedelta(minutes=3), logs)  # tells it resolved
    assert fixed.sent == ["smtp problem quarantined:pkg-a"], fixed
    assert relay.subjects == ["[ccat-dt] package pkg-a quarantined"]
    assert "undeliverable" not in _status(opsdb, config, capsys)
    opsdb.dispose()


# --- a webhook that redirects -----------------------------------------------------------------


@pytest.mark.parametrize("status", [302, 308], ids=["302-to-a-sign-in-page", "308-to-https"])
def test_a_webhook_that_redirects_is_held_not_followed(
        status: int, tmp_path: Path, smtp_server: Mailbox, webhook_receiver: Receiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A webhook URL answered with a redirect: a sign-in page in front of the chat server
    (302), or http:// moved to https:// (308). A POST redirected is not the message delivered
    (after a 302 urllib asked the new address with a GET, without the message, and took the
    sign-in page's 200 for a delivery: recorded sent, nobody told; a 308 was retried at every
    tick for ever). Now it is not followed: held, logged once, and `status` and the mail
    name where it points (its host only: a hook's path is a secret)."""
    webhook_receiver.status = status
    target = f"127.0.0.1:{webhook_receiver.port}"
    webhook_receiver.location = (f"http://{target}/login?next=/hooks/ccat" if status == 302
                                 else f"https://{target}/hooks/ccat")
    config = _notified(tmp_path, smtp_server.port, webhook_receiver.url)
    opsdb = OpsDB(config.opsdb_url)
    logs: list[str] = []
    now = utcnow()
    ticks = [_tick(config, opsdb, now + timedelta(minutes=m), logs) for m in range(2)]
    assert webhook_receiver.gets == [] and webhook_receiver.posts == []
    assert ticks[0].failed == ["webhook problem quarantined:pkg-a"]
    assert ticks[1].held == ["webhook problem quarantined:pkg-a"]
    [logged] = logs
    scheme = "http" if status == 302 else "https"
    where = f"webhook at {target}: {status} "
    assert where in logged and f"redirected to {scheme}://{target}, not followed" in logged
    assert "/hooks/ccat" not in logged and "/login" not in logged
    assert where in _status(opsdb, config, capsys)
    assert any(where in s for s in smtp_server.subjects)
    opsdb.dispose()


AT_ONCE = """
import sys, time
from datetime import datetime, timedelta
from ccat_dt.config import load_config
from ccat_dt.notify import Problem, channels, reconcile
from ccat_dt.opsdb.database import OpsDB
config = load_config(sys.argv[1])
problems = [Problem(f"quarantined:pkg-{i}", "quarantined", f"package pkg-{i} quarantined",
                    "restore the file") for i in range(6)]
opsdb = OpsDB(config.opsdb_url)
with opsdb.session() as session:  # connected and warm before the start
    pass
while time.time() < float(sys.argv[3]):  # both start their tick at the same moment
    time.sleep(0.001)
delivery = reconcile(opsdb, problems, channels(config), datetime.fromisoformat(sys.argv[2]),
                     remind_after=timedelta(hours=1))
print(len(delivery.sent), repr(delivery.busy))
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_ticks_at_once_send_each_notice_once(tmp_path: Path, database: str,
                                                 request: pytest.FixtureRequest) -> None:
    """The daemon's tick of the notification sensor and the UI's "Test sensor" on it (or a
    drive's tick) at the same moment, two processes, on SQLite and PostgreSQL: the mail
    server receives each notice once. Before, both read the same open rows and both sent
    every notice due (12 messages for 6 problems)."""
    url = {"opsdb_url": request.getfixturevalue("postgres_url")} if database == "postgresql" \
        else {}
    now = utcnow()
    with mail_server(delay_s=0.2) as box:
        config = deployment(tmp_path / "deploy", notifications={
            "smtp": {"host": "127.0.0.1", "port": box.port, "from": "ccat-dt@example.org",
                     "to": ["ops@example.org"], "timeout_s": 5}}, **url)
        start = time.time() + 3
        ticks = [subprocess.Popen([sys.executable, "-c", AT_ONCE, str(config.path),
                                   now.isoformat(), str(start)],
                                  env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [tick.communicate(timeout=120)[0] for tick in ticks]
        assert all(tick.returncode == 0 for tick in ticks), outputs
        sent = sorted(int(out.split()[0]) for out in outputs)
        assert sent == [0, 6], outputs  # one sent them all, the other none
        assert "another process" in "".join(outputs), outputs

        opsdb = OpsDB(config.opsdb_url)
        later = reconcile(opsdb, SIX, channels(config), now + timedelta(minutes=1),
                          remind_after=timedelta(hours=1))  # the next tick: nothing more
    assert later.sent == [] and later.busy == "", later
    assert Counter(box.subjects) == Counter(f"[ccat-dt] {p.subject}" for p in SIX), box.subjects
    with opsdb.session() as session:
        rows = session.scalars(select(Notification)).all()
        assert len(rows) == len(SIX) and all(r.sends == 1 for r in rows)
    opsdb.dispose()
