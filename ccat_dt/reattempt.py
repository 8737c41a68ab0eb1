"""Automatic re-attempts across runs: work whose run failed (or died with its process) is
requested again after a back-off that doubles per failed attempt, for a horizon after its
first failure; then it is escalated (a person is told, `ccat-dt retry` resumes it).

What counts as one piece of work is a stage x partition. Its history is the list of its runs
(the Dagster layer reads them); an episode is the failed and canceled runs since its last
success or since an operator's retry. A run an operator canceled (the UI's Terminate or Force
termination, a backfill's Cancel) is what a person asked for, not a failed attempt: it uses
none of the attempts' budget (not counted, not toward the horizon, so cancels alone never
escalate the work or tell a person), yet the work is not dropped: it is requested again after
the back-off, which each run of the episode, failed or canceled, doubles (a run canceled again
and again comes back less and less often, not in a loop). To hold the work, stop its sensor.
Permanent failures never come here: a FAILED package (a source file that changed after
filing) is not stalled work, so nothing re-requests it.

A cancel with no person behind it is another matter when it comes again and again: a drive
run from cron under `timeout`, by a service manager with a run-time limit, or stopped by the
host's nightly shutdown, that lives less long than one package's transfer, stops that run at
every drive (the drive tags it stopped: `stopped`, tags.STOPPED_TAG), and the next drive starts
it again from zero, for ever, the data never leaving. So the newest runs of the work that were
all stopped so (no success, no failure, no operator's Terminate in between; an operator's
`ccat-dt retry` run begins a new series, as it begins an episode), the first and the newest
further apart than the horizon the failed attempts use, are told to a person, once
(`Decision.stopped_told`; the notification closes when the work is done): the horizon, so that
one Ctrl-C, or a few over a day, tell nobody, and the same horizon, so that a person is told
of stalled work in the same time whether its runs fail or are stopped. It is still not a
failed attempt: the work is still asked for again automatically (a longer-lived drive does
it), and it is never escalated for it.

The state (attempts, next attempt, escalation) is kept in OpsDB, for `why`, `status` and the
notifications, which read it through `unsettled`: a row whose work OpsDB shows done, by
whatever did it, is not read, whether or not the sensor has ticked since to forget it."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ccat_dt import retry
from ccat_dt.config import Config
from ccat_dt.opsdb.database import insert_absent
from ccat_dt.opsdb.models import Reattempt, _aware
from ccat_dt.stages import Stage


class State(StrEnum):
    NONE = "none"  # no failure in the episode: nothing to re-attempt
    IN_FLIGHT = "in_flight"  # a run is going on
    DUE = "due"  # request the next attempt now
    WAITING = "waiting"  # back-off not over
    ESCALATED = "escalated"  # past the horizon: no automatic attempt any more


@dataclass(frozen=True)
class RunOutcome:
    """One run of the work, as the orchestrator recorded it."""

    run_id: str
    in_flight: bool
    failed: bool  # failed (a dead process's run is marked failed)
    ended_at: datetime | None
    operator: bool = False  # launched by `ccat-dt retry`
    again: bool = False  # asked for again although a run of the work had succeeded
    canceled: bool = False  # canceled by an operator: not a failed attempt
    stopped: bool = False  # canceled with no person's doing (its drive or process stopped)


@dataclass(frozen=True)
class Backoff:
    first: timedelta
    longest: timedelta
    horizon: timedelta

    @classmethod
    def of(cls, config: Config) -> Backoff:
        policies = config.settings.policies
        return cls(timedelta(seconds=policies.retry_backoff_first_s),
                   timedelta(hours=policies.retry_backoff_max_hours),
                   timedelta(hours=policies.retry_horizon_hours))

    def delay(self, failures: int) -> timedelta:
        """Wait after the n-th failed attempt (n >= 1): first, 2 x first, 4 x first, ..."""
        return min(self.first * 2 ** min(max(failures - 1, 0), 40), self.longest)


@dataclass(frozen=True)
class Decision:
    state: State
    failures: int = 0  # failed attempts in the episode
    episode: str = ""  # run id of the episode's first run (names its attempts)
    first_failed_at: datetime | None = None  # its first failed run's end (of a canceled
    # one's, when none failed)
    last_failed_at: datetime | None = None  # its newest run's end, failed or canceled
    next_at: datetime | None = None
    idle: bool = False  # escalated: runs asked for again succeeded and left the work undone
    canceled: int = 0  # runs of the episode an operator canceled (not failures)
    stopped: int = 0  # the newest runs in a row stopped with no person's doing
    stopped_since: datetime | None = None  # the first of those's end
    stopped_told: bool = False  # those span more than the horizon: a person is told

    @property
    def runs(self) -> int:
        """The episode's runs, failed or canceled."""
        return self.failures + self.canceled

    def run_key(self, stage: str, partition: str) -> str:
        """A new key per run asked for (the orchestrator skips a key it has seen): one
        canceled took its key without using an attempt."""
        return f"reattempt:{stage}:{partition}:{self.episode[:8]}:{self.runs + 1}"


def decide(history: Sequence[RunOutcome], backoff: Backoff, now: datetime) -> Decision:
    """`history` oldest first."""
    if any(run.in_flight for run in history):
        return Decision(State.IN_FLIGHT)
    episode: list[RunOutcome] = []
    for run in reversed(history):
        if not (run.failed or run.canceled):
            break
        episode.append(run)
        if run.operator:
            break
    if not episode:
        return _idle(history)
    episode.reverse()
    failed = [run for run in episode if run.failed]
    last = _aware(episode[-1].ended_at or now)
    next_at = last + backoff.delay(len(episode))  # canceled runs wait too: not in a loop
    first = _aware((failed or episode)[0].ended_at or now)
    common = dict(failures=len(failed), canceled=len(episode) - len(failed),
                  episode=episode[0].run_id, first_failed_at=first, last_failed_at=last,
                  **_stopped(episode, backoff))
    # The horizon is the failed attempts' alone: an operator's cancels never escalate.
    if failed and (_aware(failed[-1].ended_at or now) + backoff.delay(len(failed)) - first
                   > backoff.horizon):
        return Decision(State.ESCALATED, **common)  # type: ignore[arg-type]
    state = State.DUE if now >= next_at else State.WAITING
    return Decision(state, next_at=next_at, **common)  # type: ignore[arg-type]


def _stopped(episode: Sequence[RunOutcome], backoff: Backoff) -> dict[str, object]:
    """The newest runs of `episode` in a row that were stopped with no person's doing (a
    failed run or an operator's cancel ends the series; an operator's retry run begins it):
    how many, since when, and whether the first and the newest ended further apart than the
    horizon (a person is told; see the module's docstring)."""
    series: list[RunOutcome] = []
    for run in reversed(episode):
        if not (run.canceled and run.stopped):
            break
        series.append(run)
        if run.operator:
            break
    if not series:
        return {}
    first = _aware(series[-1].ended_at) if series[-1].ended_at else None
    last = _aware(series[0].ended_at) if series[0].ended_at else None
    told = first is not None and last is not None and last - first > backoff.horizon
    return {"stopped": len(series), "stopped_since": first, "stopped_told": told}


def as_recorded(row: Reattempt, now: datetime) -> Decision:
    """The decision OpsDB recorded for the work (its row, written by `record`)."""
    first, last = _aware(row.first_failed_at), _aware(row.last_failed_at)
    next_at = _aware(row.next_attempt_at) if row.next_attempt_at else last
    state = (State.ESCALATED if row.escalated_at is not None
             else State.DUE if now >= next_at else State.WAITING)
    # The episode's first run is gone: the row names the attempts (their run keys) instead.
    return Decision(state, failures=row.attempts, episode=f"opsdb{row.id:03d}",
                    first_failed_at=first, last_failed_at=last,
                    next_at=None if state == State.ESCALATED else next_at)


def carried_over(decision: Decision, history: Sequence[RunOutcome],
                 recorded: Decision | None) -> Decision:
    """`decision` (decided from the work's runs, `history`), unless the failed runs OpsDB
    recorded for the work (`recorded`, as_recorded) are gone from the runs while no run came
    after them: an operator deleted them (Runs → Delete; a run's record and events go with it).
    Then the recorded state stands: the next attempt when its back-off ends, no automatic one
    when escalated (before: the failures were forgotten and the work waited for the sweep for
    unattended work, an hour)."""
    if (decision.state != State.NONE or decision.idle or recorded is None
            or recorded.failures < 1 or recorded.last_failed_at is None):
        return decision
    last = _aware(recorded.last_failed_at)
    if any(run.ended_at is not None and _aware(run.ended_at) >= last for run in history):
        return decision  # a run ended since the last recorded failure: the runs tell
    return recorded


IDLE_RUNS = 2  # runs asked for again that did nothing, before a person is told


def _idle(history: Sequence[RunOutcome]) -> Decision:
    """No failure: nothing to re-attempt, unless the newest runs were asked for again (the
    work still due after a run of it succeeded) and succeeded without doing it. Asking again
    forever would hide that OpsDB and the runs disagree: a person is told instead."""
    again: list[RunOutcome] = []
    for run in reversed(history):
        if not run.again or run.failed or run.canceled:
            break
        again.append(run)
    if len(again) < IDLE_RUNS:
        return Decision(State.NONE)
    again.reverse()
    return Decision(State.ESCALATED, failures=len(again), episode=again[0].run_id,
                    first_failed_at=again[0].ended_at, last_failed_at=again[-1].ended_at,
                    idle=True)


def idle_error(decision: Decision, reason: str) -> str:
    """What a person is told about work escalated by `_idle`."""
    since = f" since {decision.first_failed_at:%Y-%m-%d %H:%M} UTC" if (
        decision.first_failed_at) else ""
    return (f"{decision.failures} runs asked for again{since} succeeded and left it undone "
            f"({reason}): OpsDB still shows it due, so the runs and OpsDB disagree; no "
            "automatic run any more")


@dataclass(frozen=True)
class Work:
    stage: Stage
    partition: str
    package: str
    site: str
    decision: Decision
    error: str = ""


def record(session: Session, work: Iterable[Work], now: datetime,
           keep: Iterable[tuple[str, str]] = (),
           stages: Collection[Stage] | None = None) -> list[Reattempt]:
    """Write the state of every piece of work with failures; forget the rest (of `stages`, when
    given: each sensor keeps its own), except those in `keep` (in flight: their row stays as
    it was). Returns the rows newly escalated, or newly told as stopped again and again
    (`stopped_told_at` set: still re-attempted automatically)."""
    query = select(Reattempt)
    if stages is not None:
        query = query.where(Reattempt.stage.in_([str(s) for s in stages]))
    rows = {(r.stage, r.partition): r for r in session.scalars(query)}
    seen = set(keep)
    escalated = []
    for item in work:
        decision = item.decision
        if decision.state in (State.NONE, State.IN_FLIGHT):
            continue
        key = (str(item.stage), item.partition)
        seen.add(key)
        row = rows.get(key) or _row_for(session, item, now)
        row.attempts = decision.failures
        row.first_failed_at = decision.first_failed_at or now
        row.last_failed_at = decision.last_failed_at or now
        row.next_attempt_at = decision.next_at
        row.last_error = item.error[:2000] or row.last_error
        if decision.state == State.ESCALATED:
            if row.escalated_at is None:
                row.escalated_at = now
                escalated.append(row)
        else:
            row.escalated_at = None
        row.stopped_runs = decision.stopped
        row.stopped_since = decision.stopped_since
        if not decision.stopped_told:
            row.stopped_told_at = None  # a new series (its notice stays open until done)
        elif row.stopped_told_at is None:
            row.stopped_told_at = now
            if row not in escalated:
                escalated.append(row)
    gone = [key for key in rows if key not in seen]
    for stage, partition in gone:
        session.execute(delete(Reattempt).where(Reattempt.stage == stage,
                                                Reattempt.partition == partition))
    return escalated


def _row_for(session: Session, item: Work, now: datetime) -> Reattempt:
    """The row of `item`'s work, inserted unless another transaction has inserted it since
    `record` read the rows: two ticks of one sensor at once (the daemon's and the UI's "Test
    sensor", a replayed tick, two daemons) both write the work's row, and the one that
    commits second updates the first's row as it would its own (the same end state as one
    tick alone) instead of failing its tick on the unique (stage, partition)."""
    where = (Reattempt.stage == str(item.stage), Reattempt.partition == item.partition)
    for _ in range(3):  # the row deleted by another tick between the two statements: again
        insert_absent(session, Reattempt, {
            "stage": str(item.stage), "partition": item.partition, "package": item.package,
            "site": item.site, "attempts": 0,
            "first_failed_at": item.decision.first_failed_at or now,
            "last_failed_at": item.decision.last_failed_at or now}, ("stage", "partition"))
        if (row := session.scalars(select(Reattempt).where(*where)).one_or_none()) is not None:
            return row
    raise RuntimeError(f"the re-attempt row of {item.stage} {item.partition} is deleted "
                       "as often as it is inserted")


def waiting(session: Session, package: str | None = None) -> list[Reattempt]:
    """Every row, as recorded (the re-attempt sensor's: it forgets those whose work is done);
    what a person is shown reads `unsettled` instead."""
    query = select(Reattempt).order_by(Reattempt.id)
    if package is not None:
        query = query.where(Reattempt.package == package)
    return list(session.scalars(query))


def unsettled(session: Session, config: Config) -> list[Reattempt]:
    """The rows whose work OpsDB still shows possible and not done (retry.stalled_in, which
    looks at a staging request's files on the disk too), as the re-attempt sensor judges
    them: a row whose work was done by another path than its re-attempt (the UI's
    Materialize, `ccat-dt retry`, the daemon or another drive) is left out at once, not at
    the sensor's next tick, which may never come (a drive's last ticks are the periodic
    sensors', the sensor may be stopped): its notice, its line in `status`, resolve with the
    work. A purge's row likewise, while its package still has a copy the purge would delete
    (at the row's site; any, for a run over every site) or a deletion unfinished or refused
    (purges_due): a purge done by another path (`ccat-dt purge`, the UI's Materialize, another
    drive) leaves its deletion_denied or source_refused notice at once, not at the purge
    sensor's next tick."""
    rows = waiting(session)
    packages = sorted({row.package for row in rows if row.stage != Stage.PURGE})
    due = {(str(item.stage), item.package, item.site)
           for item in retry.stalled_in(session, config, packages=packages)} if packages else set()
    purges = sorted({row.package for row in rows if row.stage == Stage.PURGE})
    deleting = purges_due(session, config, purges) if purges else set()
    return [row for row in rows
            if ((row.package, row.site) in deleting if row.stage == Stage.PURGE
                else (row.stage, row.package, row.site) in due)]


def purges_due(session: Session, config: Config, packages: Collection[str],
               now: datetime | None = None) -> set[tuple[str, str]]:
    """(package, site) for every site where a package of `packages` has a copy the retention
    plan deletes (over the purge budget or not: still to do) or a deletion unfinished or
    refused, and (package, "") for each package with any such copy: the purge work OpsDB still
    shows to do."""
    from ccat_dt.opsdb.models import CopyStatus, RawDataPackage, utcnow
    from ccat_dt.retention import Action, live_copies, plan_deletions

    when = now or utcnow()
    out: set[tuple[str, str]] = set()
    for package in session.scalars(select(RawDataPackage).where(
            RawDataPackage.name.in_(sorted(packages)))):
        sites = {decision.site for decision in plan_deletions(session, config, package, when)
                 if decision.action == Action.DELETE}
        sites |= {copy.location.site.short_name for copy in live_copies(session, package)
                  if copy.status in (CopyStatus.DELETION_IN_PROGRESS,
                                     CopyStatus.DELETION_FAILED)}
        out |= {(package.name, site) for site in sites}
        if sites:
            out.add((package.name, ""))
    return out
