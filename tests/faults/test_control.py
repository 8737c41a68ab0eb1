"""Control: with no fault injected the pipeline converges and every invariant holds, so a
fault test that fails is about its fault."""

from __future__ import annotations

from dagster import DagsterInstance

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, observe, run


def test_no_fault_converges_and_keeps_every_invariant(config: Config, opsdb: OpsDB,
                                                      instance: DagsterInstance) -> None:
    observe(config, opsdb)
    assert_safe(config, opsdb)  # also before anything ran

    assert run(config, instance).failed == []

    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)
    assert run(config, instance).launched == []  # idle: a replayed drive launches nothing
