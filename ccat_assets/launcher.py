"""The embedded instance's run launcher: Dagster's DefaultRunLauncher, which also answers the
UI's Terminate for a run `ccat-dt drive` executes.

Terminate (not "Force termination") of a STARTED run asks the run launcher to stop it. The
DefaultRunLauncher tells the code server that launched the run's worker; the drive's runs
have none (they execute in the drive's forked children: runpool.py), so it marked the run
CANCELING and answered False, and the UI showed "Unable to terminate run ..." for a run that
was stopped: the drive interrupts each of its runs that is CANCELING within a second
(RunPool.cancel_terminated). Here such a run, one a live drive's pool executes
(inflight.in_a_live_drives_pool), is marked CANCELING and answered for; any other run is the
DefaultRunLauncher's, as before. Configured in the repository's dagster.yaml, which
`ccat-dt init` writes into the embedded instance; an instance written before keeps the
DefaultRunLauncher (runs are stopped the same, the UI answers as before) until `init` runs
again. Production (deploy/dagster.yaml: the daemon's runs, Celery) does not use it."""

from __future__ import annotations

from dagster import DefaultRunLauncher

from ccat_assets.tags import DRIVE_TAG


class DriveRunLauncher(DefaultRunLauncher):
    def terminate(self, run_id: str) -> bool:
        from ccat_assets.inflight import in_a_live_drives_pool  # loads the code's modules

        run = self._instance.get_run_by_id(run_id) if self.has_instance else None
        if run is None or run.is_finished or not in_a_live_drives_pool(self._instance, run):
            return super().terminate(run_id)
        self._instance.report_run_canceling(
            run, message=f"Sending run termination request to ccat-dt drive "
                         f"{run.tags[DRIVE_TAG]}, which executes it.")
        return True
