"""Two runs of one partition at once (a retried run overlapping the original, a daemon and an
operator): one verified copy, one record, and the loser either finds that copy or fails
retryably. Each racer is a process of its own doing what the asset (and its IO manager) does;
they meet at a barrier so that both are past the "is it done already?" check."""

from __future__ import annotations

import time
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from dagster import AssetCheckEvaluation, DagsterEventType, DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.partitions import package_site_key
from ccat_dt import replicas
from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    RawDataPackage,
)
from ccat_dt.packages import build
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    archived_everywhere,
    child,
    child_argv,
    finish,
    observe,
    operations,
    plan,
    run,
    spawn,
)
from tests.faults.test_deletion_faults import (  # noqa: F401 - kept: a fixture
    archived_with_sources,
    kept,
    retention,
)
from tests.test_operator_actions import by_hand, check_status


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


CHECK_OF = {"packages": "package_checksum", "site_copies": "site_copy_checksum"}


def _arrived(gate: Path, process: Popen[str], timeout: float = 60) -> None:
    """Until the child is waiting at the barrier `gate` (its party file there)."""
    deadline = time.monotonic() + timeout
    while not (gate.is_dir() and any(gate.iterdir())):
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"child exited {process.returncode} early: {stderr[-2000:]}")
        assert time.monotonic() < deadline, "the purge never reached the copy"
        time.sleep(0.01)


def _copies_at(opsdb: OpsDB, package: str, label: str) -> list[CopyStatus]:
    with opsdb.session() as session:
        return [c.status for c in session.scalars(select(PackageCopy).join(RawDataPackage).where(
            RawDataPackage.name == package).order_by(PackageCopy.id)) if c.location.label == label]


def _last_evaluation(dagster: DagsterInstance) -> AssetCheckEvaluation:
    [last] = dagster.get_runs(limit=1)
    [evaluation] = [r.dagster_event.event_specific_data for r in dagster.all_logs(
        last.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION) if r.dagster_event]
    assert isinstance(evaluation, AssetCheckEvaluation)
    return evaluation


# A purge deleting a buffer copy after archiving (certificate committed, DELETION_IN_PROGRESS)
# while an operator clicks "Materialize" on that copy's partition (or a backfill runs it):
# the run is green and says the copy is purged after archiving, and nothing travels. Before,
# the package's check found "no copy of P at ccat buffer" and failed the run (red on a
# partition where nothing is wrong), and a site copy was planned again from the other
# archive: its file, still there, taken as a new PRESENT copy that the purge then unlinked
# (OpsDB recording a copy that is gone), or, once unlinked, sent again and the purge undone.
@pytest.mark.parametrize(("asset", "where", "at"), [("packages", "ccat/buffer", "claim"),
                                                    ("packages", "ccat/buffer", "record"),
                                                    ("site_copies", "cologne/buffer", "claim"),
                                                    ("site_copies", "cologne/buffer", "record")])
def test_materialize_while_the_purge_deletes_that_copy_is_green_and_sends_nothing(
        kept: Config, instance: DagsterInstance, tmp_path: Path,  # noqa: F811
        asset: str, where: str, at: str) -> None:
    opsdb, package, _ = archived_with_sources(kept, instance)
    config = retention(kept, 0)  # the purge may now delete the buffers
    site = where.split("/")[0]
    partition = package if asset == "packages" else str(package_site_key(package, site))
    defs = build_definitions(config)
    sent = operations(opsdb, OperationType.TRANSFER, package)
    gate = tmp_path / "gate"
    purge = spawn(child_argv(config, "purge", package, barrier=str(gate), parties=2, at=at,
                             copy_at=where))
    try:
        _arrived(gate, purge)  # certified and marked; about to unlink, or unlinked
        assert _copies_at(opsdb, package, where) == [CopyStatus.DELETION_IN_PROGRESS]
        materialized = by_hand(defs, instance, asset, partition)
        evaluation = _last_evaluation(instance)
    finally:
        (gate / "operator").touch()  # the purge goes on
        purged = finish(purge)
    assert purged.returncode == 0, purged.stderr[-2000:]
    assert purged.result["result"]["failures"] == [], purged.result

    assert evaluation.passed, evaluation.description
    assert "purged after archiving" in (evaluation.description or ""), evaluation.description
    assert materialized
    assert check_status(instance, asset, CHECK_OF[asset])[partition] == "passed"
    assert operations(opsdb, OperationType.TRANSFER, package) == sent  # nothing travelled
    assert _copies_at(opsdb, package, where) == [CopyStatus.DELETED]  # the purge stands
    assert_safe(config, opsdb)

    # "Materialize" again, the copy recorded deleted: the same answer, still nothing sent
    assert by_hand(defs, instance, asset, partition)
    assert _last_evaluation(instance).passed
    assert operations(opsdb, OperationType.TRANSFER, package) == sent
    assert run(config, instance).failed == []
    assert operations(opsdb, OperationType.TRANSFER, package) == sent
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


# The other order: the run reads the copy (PRESENT when it looked), and the purge takes it
# while it is read (certified, unlinked, not yet recorded). Before, the read found the path
# empty and the check failed the run ("missing"), and a materialisation of a site copy sent
# the package there again.
@pytest.mark.parametrize(("asset", "where"), [("packages", "ccat/buffer"),
                                              ("site_copies", "cologne/buffer")])
def test_a_purge_taking_the_copy_while_the_run_reads_it_leaves_the_run_green(
        kept: Config, instance: DagsterInstance, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, asset: str, where: str) -> None:
    opsdb, package, _ = archived_with_sources(kept, instance)
    config = retention(kept, 0)
    site = where.split("/")[0]
    partition = package if asset == "packages" else str(package_site_key(package, site))
    defs = build_definitions(config)
    sent = operations(opsdb, OperationType.TRANSFER, package)
    gate = tmp_path / "gate"
    purges: list[Popen[str]] = []
    real = replicas.reread

    def reread(opsdb: OpsDB, config: Config, copy_id: int, **kwargs: Any) -> Any:
        if not purges:  # the first read: of the buffer copy, PRESENT when the run looked
            purges.append(spawn(child_argv(config, "purge", package, barrier=str(gate),
                                           parties=2, at="record", copy_at=where)))
            _arrived(gate, purges[0])  # unlinked, not yet recorded
        return real(opsdb, config, copy_id, **kwargs)

    monkeypatch.setattr(replicas, "reread", reread)
    try:
        materialized = by_hand(defs, instance, asset, partition)
        evaluation = _last_evaluation(instance)
    finally:
        (gate / "operator").touch()
        purged = [finish(p) for p in purges]
    assert [p.returncode for p in purged] == [0], [p.stderr[-2000:] for p in purged]
    assert evaluation.passed, evaluation.description
    assert "being purged after archiving" in (evaluation.description or "")
    assert materialized
    assert operations(opsdb, OperationType.TRANSFER, package) == sent
    assert _copies_at(opsdb, package, where) == [CopyStatus.DELETED]
    monkeypatch.undo()
    assert run(config, instance).failed == []
    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
