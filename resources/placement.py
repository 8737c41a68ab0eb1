"""IO managers that own physical placement: handing a Placement to them moves the package."""


import time
from dataclasses import replace

from dagster import (
    AssetMaterialization,
    ConfigurableIOManager,
    DagsterEvent,
    Failure,
    InputContext,
    MetadataValue,
    OutputContext,
    ResourceDependency,
)

from ccat_assets.integrity import copy_check
from ccat_assets.interrupts import stops_when_interrupted
from ccat_assets.partitions import keep_partition, package_site_key
from ccat_dt.checksums import ChecksumMismatch
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import get_package
from ccat_dt.references import CopyRef, Placement
from ccat_dt.replicas import BadSource, NotReady, Placed, place, verified_copy
from ccat_dt.transports.base import TransferError
from resources.deployment import Deployment


class PlacementIOManager(ConfigurableIOManager):  # type: ignore[misc]
    """Puts the package at the partition's site (buffer or LTA) with the route's transport and
    verifies it there; downstream assets get a reference to that verified copy."""

    deployment: ResourceDependency[Deployment]
    location_type: str

    @property
    def kind(self) -> LocationType:
        return LocationType(self.location_type)

    def handle_output(self, context: OutputContext, obj: Placement) -> None:
        attempt = context.step_context.previous_attempt_count if context.step_context else 0
        started = time.monotonic()
        self.deployment.metrics.watch_progress()  # the transfer is seen while it runs
        instance = context.step_context.instance if context.step_context else None
        try:
            with stops_when_interrupted(instance, context.run_id):
                placed = place(self.deployment.opsdb, self.deployment.config, obj, self.kind,
                               run_id=context.run_id, attempt=attempt)
        except (TransferError, NotReady, ChecksumMismatch) as exc:
            self._report(obj, "failed", time.monotonic() - started, attempt, error=str(exc))
            if isinstance(exc, BadSource):
                self._bad_source(context, exc)
            if isinstance(exc, NotReady) or (isinstance(exc, TransferError)
                                             and not exc.retryable):
                raise Failure(str(exc), allow_retries=False) from exc  # once, cause as headline
            raise
        seconds = time.monotonic() - started
        ref = placed.ref
        obj = replace(obj, source=placed.source or obj.source)  # the copy sent, not the planned
        self._report(obj, "ok" if placed.transport else "unchanged", seconds, attempt,
                     size=ref.size, placed=placed)
        context.add_output_metadata({
            "path": ref.path, "size": ref.size, "checksum": ref.checksum,
            "from": (f"{obj.source.site}/{obj.source.location}" if placed.transport
                     else f"{ref.site}/{ref.location}"),
            "transport": placed.transport or "none", "streams": placed.streams,
            "outcome": placed.note or f"copied now from {obj.source.site}/{obj.source.location}",
            "attempts": attempt + 1, "seconds": round(seconds, 3),
            "MB_per_s": round(ref.size / 1e6 / seconds, 2) if seconds > 0 else 0.0,
            "log": placed.log_path or "", "batched_with": ", ".join(placed.batched_with),
            # a repair: the quarantined copy it replaced, when and by what found bad, and why
            **({"replaced": MetadataValue.json([r.evidence() for r in placed.replaced])}
               if placed.replaced else {})})
        for companion in placed.batched_with:
            # Its own partition: a run of it would now find the copy made and ask for nothing,
            # so the UI would show a copy that exists as never materialised.
            context.log_event(AssetMaterialization(
                asset_key=context.asset_key, partition=str(package_site_key(companion, obj.site)),
                metadata={"outcome": f"copied in the batched session of {obj.package}'s run",
                          "batched_with": obj.package, "transport": placed.transport or "none"}))
        keep_partition(context)  # deleted in the UI during the copy: the run's next step needs it

    def _bad_source(self, context: OutputContext, exc: BadSource) -> None:
        """The copy this step was sent from, found bad and quarantined: its stage's check says
        so now, in this run, on its partition's latest materialization. Its own check may have
        passed in this very run (a copy-and-archive run's site copy, on the transport's read of
        the landed bytes before it rotted): an evaluation of the same run, check and partition
        takes that one's place, so the UI shows it failed, not passed."""
        step = context.step_context
        if step is None:
            return
        found = exc.check
        DagsterEvent.asset_check_evaluation(step, copy_check(
            step.instance, exc.package, exc.site, exc.kind, exc.observatory, passed=False,
            description=f"{found.description}: found bad as the source of "
                        f"{context.asset_key.to_user_string()} {context.partition_key}; "
                        "quarantined, made again from intact data",
            metadata={"path": found.path or "", "copy_id": found.copy_id or 0,
                      **found.evidence}))

    def _report(self, obj: Placement, outcome: str, seconds: float, attempt: int, *,
                size: int = 0, placed: Placed | None = None, error: str = "") -> None:
        stage = "archive" if self.kind == LocationType.LONG_TERM_ARCHIVE else "transfer"
        self.deployment.report(stage, obj.package, obj.site, outcome, seconds,
                               attempt=attempt + 1, bytes=size, error=error)
        if placed is not None and not placed.transport:
            return  # nothing moved
        route = self.deployment.config.settings.route(obj.source.site, obj.site)
        self.deployment.metrics.transfer(
            route=f"{obj.source.site}->{obj.site}", origin=obj.source.site,
            destination=obj.site, transport=placed.transport if placed else (
                route.transport if route else "local"),
            bytes=size, seconds=seconds, streams=placed.streams if placed else 0,
            attempts=attempt + 1, outcome=outcome, package=obj.package)

    def load_input(self, context: InputContext) -> CopyRef:
        keys = context.asset_partition_key.keys_by_dimension  # type: ignore[attr-defined]
        with self.deployment.opsdb.session() as session:
            copy = verified_copy(session, get_package(session, keys["package"]), keys["site"],
                                 self.kind)
            if copy is None:  # no retry makes a copy appear: once, with the cause
                raise Failure(f"no verified {self.kind.value} copy of {keys['package']} at "
                              f"{keys['site']} (it failed its check, was purged after "
                              "archiving, or was never made)", allow_retries=False)
            return CopyRef.of(copy)
