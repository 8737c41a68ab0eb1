"""A sensor an operator stopped is ticked by neither the daemon nor `ccat-dt drive`: its
code runs only for the UI's "Test sensor" (a dry run). Such a run must change nothing: it
says what a tick would do, and does none of what a tick does besides asking for runs (a
package planned, a package re-routed past the failover horizon, a person notified, failing
work recorded). Before, testing a stopped sensor did it all the same: the failover an
operator held back by stopping `failover_sensor` was made, its package then sent to the
other archive site; a stopped `notification_sensor` sent its messages."""

from dagster import DagsterInvariantViolationError, SensorEvaluationContext
from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType

TICKED = {InstigatorStatus.RUNNING, InstigatorStatus.DECLARED_IN_CODE,
          InstigatorStatus.AUTOMATICALLY_RUNNING}


def held(context: SensorEvaluationContext, name: str) -> bool:
    """Whether the sensor `name` is stopped, so that this evaluation is a "Test sensor": a
    state of it STOPPED and none that the daemon ticks (the daemon records one, running or
    declared in code, before its first tick: a stopped state left by another code location
    of the same name never holds a sensor that is ticked)."""
    try:
        instance = context.instance
    except DagsterInvariantViolationError:  # a context built without one (unit tests)
        return False
    states = [state.status for state in instance.all_instigator_state(
        instigator_type=InstigatorType.SENSOR) if state.instigator_name == name]
    return InstigatorStatus.STOPPED in states and not TICKED.intersection(states)
