"""The operator's overview in the UI: the `operator_overview` asset, materialised by this
sensor whenever the figures change, with per-site counts as numeric metadata (the asset's
Plots tab draws them over time) and the stuck packages with their reasons."""

import hashlib
import json
from collections.abc import Mapping

from dagster import (
    AssetMaterialization,
    AssetSpec,
    DefaultSensorStatus,
    MetadataValue,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from ccat_dt.opsdb.models import utcnow
from ccat_dt.overview import Overview, overview
from resources.deployment import Deployment

OVERVIEW = AssetSpec("operator_overview", group_name="operations", kinds={"opsdb"},
                     description="Per-site copy counts (present, verified, quarantined, lost) "
                     "and the packages that are stuck, with the reason; refreshed by "
                     "overview_sensor from OpsDB.")


def metadata(view: Overview) -> dict[str, MetadataValue]:
    out: dict[str, MetadataValue] = {}
    for s in view.sites:
        for name in ("present", "verified", "quarantined", "lost"):
            out[f"{s.site} {name}"] = MetadataValue.int(getattr(s, name))
    out["packages lost"] = MetadataValue.int(view.lost)
    out["packages at risk"] = MetadataValue.int(view.at_risk)
    out["packages stuck"] = MetadataValue.int(view.stuck_total)
    for state, n in sorted(view.packages.items()):
        out[f"packages {state}"] = MetadataValue.int(n)
    table = ["| site | present | verified | quarantined | lost |", "|---|---|---|---|---|"]
    table += [f"| {s.site} | {s.present} | {s.verified} | {s.quarantined} | {s.lost} |"
              for s in view.sites]
    stuck = ["| package | stage | reason |", "|---|---|---|"]
    stuck += [f"| {s.package} | {s.stage} | {s.reason.replace('|', '/')} |"
              for s in view.stuck]
    out["overview"] = MetadataValue.md(
        "\n".join(table) + "\n\n**Stuck packages** "
        + (f"({view.stuck_total}, first {len(view.stuck)})\n\n" + "\n".join(stuck)
           if view.stuck else "\n\nnone")
        + "".join(f"\n\n**Notifications undeliverable**: {line}" for line in view.undeliverable)
        + "".join(f"\n\n**Notifications failing**: {line}" for line in view.failing))
    return out


def digest(figures: Mapping[str, MetadataValue]) -> str:
    return hashlib.sha1(json.dumps({k: str(v.value) for k, v in figures.items()},
                                   sort_keys=True).encode()).hexdigest()


@sensor(minimum_interval_seconds=300, default_status=DefaultSensorStatus.RUNNING)
def overview_sensor(context: SensorEvaluationContext, deployment: Deployment) -> SensorResult:
    """Materializes the overview when its figures differ from those the latest
    materialization shows: compared with what the UI shows, not with the cursor, which the
    UI's "Test sensor" -> "Commit tick result" stores without the materialization (the dialog
    lists no asset events): the overview stayed stale until the figures changed again."""
    with deployment.opsdb.session() as session:
        view = overview(session, deployment.config, utcnow())
    figures = metadata(view)
    now = digest(figures)
    latest = context.instance.get_latest_materialization_event(OVERVIEW.key)
    shown = latest.asset_materialization if latest is not None else None
    if shown is not None and digest(shown.metadata) == now:
        return SensorResult(cursor=now, skip_reason="the overview has not changed")
    return SensorResult(cursor=now, asset_events=[
        AssetMaterialization(asset_key=OVERVIEW.key, metadata=figures,
                             description=f"{view.lost} lost, {view.at_risk} at risk, "
                                         f"{view.stuck_total} stuck")])
