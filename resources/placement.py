"""IO managers that own physical placement: handing a Placement to them moves the package."""


import time

from dagster import ConfigurableIOManager, Failure, InputContext, OutputContext, ResourceDependency

from ccat_dt.checksums import ChecksumMismatch
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import get_package
from ccat_dt.references import CopyRef, Placement
from ccat_dt.replicas import NotReady, place, verified_copy
from ccat_dt.transports.base import TransferError
from resources.opsdb import Deployment


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
        try:
            ref = place(self.deployment.opsdb, self.deployment.config, obj, self.kind,
                        run_id=context.run_id, attempt=attempt)
        except TransferError as exc:
            if exc.retryable:
                raise
            raise Failure(str(exc), allow_retries=False) from exc
        except (NotReady, ChecksumMismatch) as exc:
            raise Failure(str(exc)) from exc
        seconds = time.monotonic() - started
        context.add_output_metadata({
            "path": ref.path, "size": ref.size, "checksum": ref.checksum,
            "from": f"{obj.source.site}/{obj.source.location}",
            "seconds": round(seconds, 3),
            "MB_per_s": round(ref.size / 1e6 / seconds, 2) if seconds > 0 else 0.0})

    def load_input(self, context: InputContext) -> CopyRef:
        keys = context.asset_partition_key.keys_by_dimension  # type: ignore[attr-defined]
        with self.deployment.opsdb.session() as session:
            copy = verified_copy(session, get_package(session, keys["package"]), keys["site"],
                                 self.kind)
            if copy is None:
                raise Failure(f"no verified {self.kind.value} copy of {keys['package']} at "
                              f"{keys['site']} (it failed its check or was never made)")
            return CopyRef.of(copy)
