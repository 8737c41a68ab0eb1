"""The back-off across runs (ccat_dt/reattempt.py): grows per attempt, a new key per attempt,
escalated past the horizon, a success or an operator's retry starts afresh."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ccat_dt.reattempt import Backoff, RunOutcome, State, decide

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
