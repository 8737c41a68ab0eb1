"""Two runs of one partition at once (a retried run overlapping the original, a daemon and an
operator): one verified copy, one record, and the loser either finds that copy or fails
retryably. Each racer is a process of its own doing what the asset (and its IO manager) does;
they meet at a barrier so that both are past the "is it done already?" check."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import CopyStatus, Operation, OperationStatus, PackageCopy
from ccat_dt.packages import build
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    child,
    child_argv,
    finish,
    observe,
    plan,
    run,
    spawn,
)


# Two placements of one package at one place never both write or record: the second waits
# for the first's claim on the transfer (ccat_dt/claims.py), so they meet before claiming it.
@pytest.mark.parametrize(("step", "at"), [("place", "claim"),
                                          ("build", "write"), ("build", "record")])
def test_two_runs_of_one_partition_make_one_verified_copy(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path,
        step: str, at: str) -> None:
    observe(config, opsdb)
    package = plan(config, opsdb, instance)
    if step == "place":
        build(opsdb, config, package)
        arguments = ["place", package, "cologne", "buffer"]
    else:
        arguments = ["build", package]

    # Two builds of one package serialize on its lock in OpsDB (packages.lock_package): the
    # second waits for the first, so at "record" the first waits at the barrier in vain and
    # fails there, its tar in place but not recorded, as a run dying at that point would; a
    # short wait is enough to make that happen.
    timeout = 3 if (step, at) == ("build", "record") else 30
    racers = [spawn(child_argv(config, *arguments, barrier=str(tmp_path / "barrier"),
                               parties=2, at=at, barrier_timeout=timeout))
              for _ in range(2)]
    outcomes = [finish(process) for process in racers]

    # Under heavy load both racers can lose the temporary file to each other in turn: safe
    # (nothing recorded, both retryable), and the retry below must then make the one copy.
    assert sorted(o.returncode for o in outcomes) in ([0, 0], [0, 4], [4, 4]), \
        [o.stderr[-2000:] for o in outcomes]
    made = {o.result["result"] for o in outcomes if o.returncode == 0}
    if not made:
        retried = child(config, *arguments)
        assert retried.returncode == 0, retried.stderr[-2000:]
        made = {retried.result["result"]}
    assert len(made) == 1  # both winners (if two) return the same copy
    if step == "place":  # the second waited for the first's transfer and found its copy
        assert [o.returncode for o in outcomes] == [0, 0]
    for loser in [o for o in outcomes if o.returncode == 4]:  # lost the temporary file
        # lost the claim, or (the harness) waited at the barrier for a racer that had lost it
        assert ("another process is writing" in loser.result["error"]
                or "parties never arrived" in loser.result["error"]), loser.result
        assert loser.result.get("retryable", True)
        retried = child(config, *arguments)  # its retry finds the winner's copy
        assert retried.returncode == 0 and retried.result["result"] in made
    with opsdb.session() as session:
        copies = session.scalars(select(PackageCopy).where(
            PackageCopy.status == CopyStatus.PRESENT)).all()
        assert sorted(c.location.label for c in copies) == (
            ["ccat/buffer", "cologne/buffer"] if step == "place" else ["ccat/buffer"])
        assert not session.scalars(select(Operation).where(
            Operation.status == OperationStatus.IN_PROGRESS)).all()
    assert_safe(config, opsdb)

    assert run(config, instance).failed == []  # and the rest of the lifecycle is unaffected

    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
