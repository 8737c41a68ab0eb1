"""The back-off across runs (ccat_dt/reattempt.py): grows per attempt, a new key per attempt,
escalated past the horizon, a success or an operator's retry starts afresh; an operator's
cancel is no failed attempt."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.notify import current_problems
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Reattempt, utcnow
from ccat_dt.reattempt import Backoff, RunOutcome, State, decide
from ccat_dt.tarball import _TarWriter
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import REPO, archived_everywhere, deployment, observe, package_names
from tests.faults.storage_truth import lost_filed_files

T0 = datetime(2026, 11, 1, tzinfo=UTC)
POLICY = Backoff(first=timedelta(minutes=1), longest=timedelta(hours=6),
                 horizon=timedelta(hours=72))


def failed(minutes: float, run_id: str = "", operator: bool = False) -> RunOutcome:
    return RunOutcome(run_id or f"run{minutes}", in_flight=False, failed=True,
                      ended_at=T0 + timedelta(minutes=minutes), operator=operator)


def test_the_back_off_doubles_per_attempt_up_to_the_longest() -> None:
    assert [POLICY.delay(n) for n in (1, 2, 3, 4)] == [
        timedelta(minutes=m) for m in (1, 2, 4, 8)]
    assert POLICY.delay(30) == timedelta(hours=6)


def test_due_after_the_back_off_with_a_new_key_per_attempt() -> None:
    history = [failed(0, "aaaaaaaa-1")]
    waiting = decide(history, POLICY, T0 + timedelta(seconds=30))
    assert waiting.state == State.WAITING and waiting.next_at == T0 + timedelta(minutes=1)
    due = decide(history, POLICY, T0 + timedelta(minutes=1))
    assert due.state == State.DUE
    assert due.run_key("site_copy", "p|us") == "reattempt:site_copy:p|us:aaaaaaaa:2"
    second = decide([*history, failed(1)], POLICY, T0 + timedelta(minutes=2))
    assert second.state == State.WAITING and second.next_at == T0 + timedelta(minutes=3)
    assert second.run_key("site_copy", "p|us").endswith(":3")


def test_escalated_past_the_horizon() -> None:
    history, minute = [], 0.0
    while True:
        history.append(failed(minute))
        decision = decide(history, POLICY, T0 + timedelta(minutes=minute))
        if decision.state == State.ESCALATED:
            break
        assert decision.next_at is not None
        minute = (decision.next_at - T0).total_seconds() / 60
    assert decision.failures == len(history) and 15 <= len(history) <= 25
    assert decision.first_failed_at == T0


def test_in_flight_success_and_operator_retry() -> None:
    running = RunOutcome("r", in_flight=True, failed=False, ended_at=None)
    assert decide([failed(0), running], POLICY, T0).state == State.IN_FLIGHT
    success = RunOutcome("s", in_flight=False, failed=False, ended_at=T0)
    assert decide([failed(0), success], POLICY, T0).state == State.NONE
    assert decide([], POLICY, T0).state == State.NONE
    # Escalated work an operator retried (and that failed again) starts a new episode.
    later = decide([failed(0), failed(1), failed(5000, "bbbbbbbb-x", operator=True)],
                   POLICY, T0 + timedelta(minutes=5000))
    assert later.state == State.WAITING and later.failures == 1
    assert later.episode == "bbbbbbbb-x"


def asked_again(minutes: float, failed: bool = False) -> RunOutcome:
    return RunOutcome(f"again{minutes}", in_flight=False, failed=failed,
                      ended_at=T0 + timedelta(minutes=minutes), again=True)


def test_runs_asked_again_that_leave_the_work_undone_are_escalated() -> None:
    """Work still due after a run of it succeeded is asked for again (the sweep, a purge
    planned again); when those runs succeed too and leave it undone, asking forever would
    hide it: the second such run escalates it, and an operator's retry starts afresh."""
    done = RunOutcome("first", in_flight=False, failed=False, ended_at=T0)
    assert decide([done, asked_again(60)], POLICY, T0 + timedelta(minutes=61)).state == \
        State.NONE
    idle = decide([done, asked_again(60), asked_again(120)], POLICY, T0 + timedelta(hours=3))
    assert (idle.state, idle.idle, idle.failures) == (State.ESCALATED, True, 2)
    assert idle.first_failed_at == T0 + timedelta(minutes=60)
    retried = RunOutcome("retry", in_flight=False, failed=False, ended_at=T0, operator=True)
    assert decide([done, asked_again(60), asked_again(120), retried], POLICY,
                  T0 + timedelta(hours=3)).state == State.NONE
    # One that failed is a failure (its back-off), not a run that did nothing.
    assert decide([done, asked_again(60, failed=True), asked_again(120)], POLICY,
                  T0 + timedelta(hours=3)).state == State.NONE


def canceled(minutes: float, run_id: str = "") -> RunOutcome:
    return RunOutcome(run_id or f"cancel{minutes}", in_flight=False, failed=False,
                      ended_at=T0 + timedelta(minutes=minutes), canceled=True)


def test_an_operators_cancel_is_no_failed_attempt_yet_its_work_comes_back_after_the_back_off(
        ) -> None:
    """A run an operator canceled (the UI's Terminate) is not a failure of its work: no
    attempt counted, never escalated, however often; yet the work is not dropped: asked for
    again after the back-off, which each cancel doubles as a failure does (not relaunched at
    once, in a loop, against the operator), with a new run key each time. Before, a cancel
    counted as a failed attempt: cancels used up the horizon and escalated the work."""
    once = [canceled(0, "cccccccc-1")]
    waiting = decide(once, POLICY, T0 + timedelta(seconds=30))
    assert (waiting.state, waiting.failures, waiting.canceled) == (State.WAITING, 0, 1)
    assert waiting.next_at == T0 + timedelta(minutes=1)
    due = decide(once, POLICY, T0 + timedelta(minutes=1))
    assert due.state == State.DUE
    assert due.run_key("site_copy", "p|us") == "reattempt:site_copy:p|us:cccccccc:2"

    history, minute = [], 0.0
    for _ in range(40):  # canceled each time it comes back, for weeks: never given up
        history.append(canceled(minute))
        decision = decide(history, POLICY, T0 + timedelta(minutes=minute))
        assert decision.state == State.WAITING and decision.failures == 0, decision
        assert decision.next_at is not None
        minute = (decision.next_at - T0).total_seconds() / 60
    assert decision.next_at - history[-1].ended_at == POLICY.longest  # type: ignore[operator]
    assert minute > 72 * 60 * 2  # far past the horizon

    # Failures around a cancel are counted, the cancel is not; its key is used all the same.
    mixed = decide([failed(0, "ffffffff-1"), canceled(1), failed(3)], POLICY,
                   T0 + timedelta(minutes=3))
    assert (mixed.failures, mixed.canceled, mixed.state) == (2, 1, State.WAITING)
    assert mixed.next_at == T0 + timedelta(minutes=3 + 4)
    assert mixed.run_key("lta_copy", "p|us") == "reattempt:lta_copy:p|us:ffffffff:4"
    # The horizon is the failed attempts': one failure and cancels days later: not escalated.
    later = decide([failed(0), canceled(5000)], POLICY, T0 + timedelta(minutes=5000))
    assert (later.state, later.failures) == (State.WAITING, 1), later
    assert later.first_failed_at == T0


def stopped(minutes: float, run_id: str = "", operator: bool = False) -> RunOutcome:
    """A run canceled with no person's doing: its drive stopped (a timeout, a shutdown)."""
    return RunOutcome(run_id or f"stop{minutes}", in_flight=False, failed=False,
                      ended_at=T0 + timedelta(minutes=minutes), canceled=True, stopped=True,
                      operator=operator)


def test_work_stopped_by_no_person_past_the_horizon_is_told_and_still_re_attempted() -> None:
    """Runs stopped with no person's doing (a drive under `timeout`, shorter than the
    transfer) again and again: past the horizon, from the first stop to the newest, a person
    is told, yet the work stays automatic (never escalated: still due after the back-off).
    One stop, or stops within the horizon, tell nobody; an operator's Terminate, a failure or
    an operator's retry starts a new series."""
    assert not decide([stopped(0)], POLICY, T0 + timedelta(days=30)).stopped_told
    history, minute = [], 0.0
    while True:  # stopped each time it comes back
        history.append(stopped(minute))
        decision = decide(history, POLICY, T0 + timedelta(minutes=minute))
        assert decision.state == State.WAITING and decision.failures == 0, decision
        if decision.stopped_told:
            break
        assert decision.next_at is not None
        minute = (decision.next_at - T0).total_seconds() / 60
    assert minute > 72 * 60 and (decision.stopped, decision.stopped_since) == (len(history), T0)
    assert decide(history, POLICY, decision.next_at).state == State.DUE  # type: ignore[arg-type]
    later = T0 + timedelta(minutes=minute + 1)
    # an operator's Terminate (no STOPPED_TAG) newest: a person stopped it, a new series
    assert not decide([*history, canceled(minute + 1)], POLICY, later).stopped_told
    assert not decide([*history, failed(minute + 1)], POLICY, later).stopped_told
    retried = decide([*history, stopped(minute + 1, operator=True)], POLICY, later)
    assert (retried.stopped, retried.stopped_told) == (1, False)
    # the series is the newest stops: those before an operator's Terminate do not count
    assert decide([stopped(0), canceled(1), stopped(5000)], POLICY,
                  T0 + timedelta(minutes=5000)).stopped == 1
    told = decide([stopped(0), stopped(5000)], POLICY, T0 + timedelta(minutes=5000))
    assert told.stopped_told and told.state == State.WAITING


@pytest.mark.slow
def test_a_packaging_terminated_by_an_operator_again_and_again_is_never_escalated_and_done(
        tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator terminates (the UI's Terminate) a package's packaging run mid-tar, then
    each automatic re-attempt of it, six times, with a re-attempt horizon shorter than the
    runs: each run ends CANCELED, the drive counts it as no failure, and so does the
    re-attempt sensor: no attempt recorded, never escalated, nobody told; the work is asked
    for again after the back-off each time, and the seventh run builds the package, which
    is then archived everywhere. Before, each cancel was a failed attempt: the work was
    escalated past the horizon ("still failing after N attempts", a person told, no
    automatic run any more) and the package was never built."""
    config = deployment(tmp_path / "deploy", policies={
        "max_attempts": 1, "retry_backoff_first_s": 0.01,
        "retry_horizon_hours": 0.2 / 3600})  # under one packaging run
    opsdb = OpsDB(config.opsdb_url)
    observe(config, opsdb)
    terminations, attempts_recorded = 6, list[list[int]]()
    add_file = _TarWriter.add_file

    def terminated_by_an_operator(self: _TarWriter, *args: Any, **kwargs: Any) -> Any:
        """Half way through the tar, the first `terminations` times: the operator's Terminate,
        then the interrupt the drive sends the run's process on it."""
        if len(attempts_recorded) < terminations:
            with opsdb.session() as session:  # as the re-attempt sensor left it
                attempts_recorded.append([row.attempts for row in session.scalars(
                    select(Reattempt))])
            [run] = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
            instance.run_coordinator.cancel_run(run.run_id)  # what the UI's Terminate calls
            raise KeyboardInterrupt
        return add_file(self, *args, **kwargs)

    monkeypatch.setattr(_TarWriter, "add_file", terminated_by_an_operator)

    report = drive(build_definitions(config), instance, wait_s=10, in_process=True)

    assert len(report.canceled) == terminations, report.canceled
    assert report.failed == [], report.failed
    # The first run, the package sensor's, had no row; each re-attempt's shows no failure.
    assert attempts_recorded == [[]] + [[0]] * (terminations - 1), attempts_recorded
    assert len([key for key in report.launched if key.startswith("reattempt:packaging:")]) \
        == terminations, report.launched
    with opsdb.session() as session:
        assert current_problems(session, config, utcnow()) == []
        assert session.scalars(select(Reattempt)).all() == []
    assert len(package_names(opsdb)) == 1
    archived_everywhere(config, opsdb)
    assert lost_filed_files(config, opsdb) == []
    assert_safe(config, opsdb)
    opsdb.dispose()


TWO_TICKS = """
import sys
from datetime import datetime, timedelta
from pathlib import Path
from ccat_dt.config import load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.reattempt import Decision, State, Work, record
from ccat_dt.stages import Stage
from tests.faults.child import barrier
config, now, gate = load_config(sys.argv[1]), datetime.fromisoformat(sys.argv[2]), sys.argv[3]
opsdb = OpsDB(config.opsdb_url)
with opsdb.session() as session:  # connected and warm before the race
    pass

def works():
    # Asked for by `record` once it has read the rows: both ticks are past their read
    # (neither saw the other's rows) before either writes one.
    barrier(Path(gate), 2)
    for i in range(4):
        failed = now - timedelta(minutes=10 - i)
        state = State.ESCALATED if i == 3 else State.WAITING
        yield Work(Stage.PACKAGING, f"pkg-{i}", f"pkg-{i}", "", Decision(
            state, failures=i + 1, episode=f"run-{i}", first_failed_at=failed - timedelta(hours=1),
            last_failed_at=failed,
            next_at=None if state == State.ESCALATED else failed + timedelta(minutes=i + 1)),
            f"error {i}")

with opsdb.session() as session:
    escalated = record(session, works(), now, stages=[Stage.PACKAGING])
    print(len(escalated))
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_two_ticks_at_once_both_succeed_and_leave_the_rows_of_one(
        tmp_path: Path, database: str, request: pytest.FixtureRequest) -> None:
    """Two ticks of the re-attempt sensor (or the purge sensor) at the same moment, two
    processes: the daemon's and the UI's "Test sensor", a replayed tick, two daemons. Both
    read the rows before either wrote (a barrier), both write the rows of the same failing
    work, on SQLite and PostgreSQL: both ticks succeed, and OpsDB holds the rows one tick
    alone leaves: one per work, updated, the stale one gone, escalated once. Before, the tick
    that committed second failed on the unique (stage, partition) (IntegrityError: a red
    failed tick in the UI, though nothing was wrong)."""
    url = {"opsdb_url": request.getfixturevalue("postgres_url")} if database == "postgresql" \
        else {}
    config = deployment(tmp_path / "deploy", **url)
    opsdb = OpsDB(config.opsdb_url)
    now = utcnow().replace(microsecond=0)
    with opsdb.session() as session:  # the previous tick's rows: one updated, one stale
        session.add_all([Reattempt(stage="packaging", partition=name, package=name, site="",
                                   attempts=1, first_failed_at=now - timedelta(hours=2),
                                   last_failed_at=now - timedelta(hours=2), last_error="old")
                         for name in ("pkg-0", "pkg-gone")])
    ticks = [subprocess.Popen([sys.executable, "-c", TWO_TICKS, str(config.path),
                               now.isoformat(), str(tmp_path / "gate")],
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [tick.communicate(timeout=120) for tick in ticks]
    assert [tick.returncode for tick in ticks] == [0, 0], [
        line for _, err in outputs for line in err.splitlines() if "Error" in line][-4:]
    assert sorted(out.strip() for out, _ in outputs) in (["0", "1"], ["1", "1"]), outputs

    def aware(moment: datetime | None) -> datetime | None:
        return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment

    with opsdb.session() as session:
        rows = session.scalars(select(Reattempt).order_by(Reattempt.partition)).all()
        got = [(r.stage, r.partition, r.package, r.attempts, aware(r.first_failed_at),
                aware(r.last_failed_at), aware(r.next_attempt_at), r.escalated_at is not None,
                r.last_error) for r in rows]
    expected = []
    for i in range(4):
        failed = now - timedelta(minutes=10 - i)
        expected.append(("packaging", f"pkg-{i}", f"pkg-{i}", i + 1,
                         failed - timedelta(hours=1), failed,
                         None if i == 3 else failed + timedelta(minutes=i + 1), i == 3,
                         f"error {i}"))
    assert got == expected
    opsdb.dispose()
