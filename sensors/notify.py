"""Tell a person when a person is needed (ccat_dt/notify.py): a package quarantined, lost or
at risk, work escalated past the re-attempt horizon, a buffer filling faster than it drains.
Sending runs in this sensor's tick, never in a pipeline run: a mail server that is down delays
nothing."""

from __future__ import annotations

from datetime import timedelta

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from ccat_dt.forecast import forecast_buffers
from ccat_dt.notify import channels, current_problems, reconcile
from ccat_dt.opsdb.models import utcnow
from resources.deployment import Deployment
from sensors.stopped import held


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def notification_sensor(context: SensorEvaluationContext,
                        deployment: Deployment) -> SkipReason:
    config = deployment.config
    targets = channels(config)
    if not targets:
        return SkipReason("no notification channel configured")
    now = utcnow()
    with deployment.opsdb.session() as session:
        forecasts = forecast_buffers(session, now, window=timedelta(hours=6),
                                     warn_below_hours=config.settings.metrics.warn_below_hours)
        filling = [(f.location, f.hours_until_full) for f in forecasts
                   if f.below_threshold and f.hours_until_full is not None]
        problems = current_problems(session, config, now, filling)
    if held(context, "notification_sensor"):
        return SkipReason(f"{len(problems)} open problem(s); nothing sent: the sensor is "
                          f"stopped ({', '.join(p.key for p in problems[:10])})")
    settings = config.settings.notifications
    delivery = reconcile(deployment.opsdb, problems, targets, now,
                         remind_after=timedelta(hours=settings.remind_after_hours),
                         prefix=settings.subject_prefix, log=context.log.warning)
    if delivery.busy:  # another tick sends now (the daemon's, "Test sensor"'s, a drive's)
        return SkipReason(f"{len(problems)} open problem(s); nothing sent here: "
                          f"{delivery.busy}")
    for line in delivery.sent:
        context.log.info(f"notified: {line}")
    later = (f", {len(delivery.deferred)} left for the next tick (this one's time was up)"
             if delivery.deferred else "")
    later += (f", {len(delivery.held)} held (a channel refused for good: `ccat-dt status`)"
              if delivery.held else "")
    return SkipReason(f"{len(problems)} open problem(s); {len(delivery.sent)} message(s) sent, "
                      f"{len(delivery.failed)} failed (retried next tick){later}")
