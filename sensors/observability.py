"""Service-level figures for operators: how much is not yet safe in the archives, how full
each location is, and how long each buffer lasts; written as metrics, warned about when a
buffer will fill within the configured threshold."""

from datetime import timedelta

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

from ccat_dt.forecast import forecast_buffers
from ccat_dt.loss import Health, packages_in_danger
from ccat_dt.metrics import location_figures, service_level_figures
from ccat_dt.opsdb.models import utcnow
from resources.deployment import Deployment


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def service_level_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SkipReason:
    config = deployment.config
    now = utcnow()
    with deployment.opsdb.session() as session:
        level = service_level_figures(session, config.settings.required_lta_copies, now)
        locations = location_figures(session)
        danger = packages_in_danger(session, config)
        forecasts = forecast_buffers(session, now, window=timedelta(hours=6),
                                     warn_below_hours=config.settings.metrics.warn_below_hours)
    free = {f.location: f.free_bytes for f in forecasts}
    for figures in locations:
        deployment.metrics.location(figures.site, figures.location, figures.kind,
                                    used_bytes=None, free_bytes=free.get(figures.label),
                                    copies_by_status=figures.copies_by_status,
                                    present_bytes=figures.present_bytes)
    lost = [name for name, a in danger if a.health == Health.LOST]
    deployment.metrics.service_level(level.packages_unsafe, level.bytes_unsafe,
                                     level.oldest_unsafe_age_s,
                                     {f.location: f.hours_until_full for f in forecasts},
                                     packages_lost=len(lost),
                                     packages_at_risk=len(danger) - len(lost))
    for name, assessment in danger:
        context.log.error(f"{name}: {assessment.reason}")
    short = [f for f in forecasts if f.below_threshold]
    for forecast in short:
        context.log.warning(f"buffer {forecast.location} fills in "
                            f"{forecast.hours_until_full:.1f} h at the current rates "
                            f"(threshold {config.settings.metrics.warn_below_hours:g} h)")
    return SkipReason(f"{level.packages_unsafe} packages ({level.bytes_unsafe} bytes) not yet "
                      f"safe; {len(short)} buffer(s) below the forecast threshold")
