"""Acceptance (issue 13): the real rsync-over-ssh transport through a TCP relay that is cut
and restored at random moments while several packages travel. The pipeline ends with every
package archived in every LTA and verified, the sources purged, no operator's retry, no
duplicate copy, and not a single notification (every fault here is transient)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import yaml
from dagster import DagsterInstance, RunsFilter
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import IN_FLIGHT, RETRY_TAG, drive
from ccat_dt.config import load_config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import Notification, PackageCopy, RawDataPackage
from ccat_dt.report import disagreements
from ccat_dt.transports.factory import ssh_settings
from tests.faults.invariants import assert_safe
from tests.faults.link import Link
from tests.faults.pipeline import archived_everywhere, observe
from tests.notify_servers import Receiver
from tests.sshd import SshServer
from tests.test_multisite import multisite

MB = 1_000_000
SEED = 13


def _chaos(link: Link, stop: threading.Event, rng: random.Random) -> None:
    """Until stopped: every 0.2-1.2 s either cut what is open or take the link down for a
    moment (refusing new connections), then restore it."""
    while not stop.wait(rng.uniform(0.2, 1.2)):
        if rng.random() < 0.5:
            link.cut_all()
        else:
            link.down = True
            stop.wait(rng.uniform(0.1, 0.8))
            link.down = False


def test_random_link_cuts_converge_without_a_person(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance,
        webhook_receiver: Receiver) -> None:
    link = Link(sshd.port)
    config = multisite(tmp_path, link.through(sshd, tmp_path), max_attempts=3,
                       retry_backoff_first_s=0.3, retry_backoff_max_hours=2 / 3600)
    raw = yaml.safe_load(config.path.read_text())
    raw["notifications"] = {"webhook": {"url": webhook_receiver.url, "timeout_s": 2}}
    config.path.write_text(yaml.safe_dump(raw))
    config = load_config(config.path)
    opsdb = OpsDB(config.opsdb_url)
    stop = threading.Event()
    chaos = threading.Thread(target=_chaos, args=(link, stop, random.Random(SEED)),
                             daemon=True)
    try:
        for i in range(3):
            observe(config, opsdb, name=f"obs-{i}", files=2, size=MB)
        chaos.start()
        defs = build_definitions(config)
        deadline = time.monotonic() + 150
        drives = 0
        while time.monotonic() < deadline:  # what the daemon does: tick, again and again
            drives += 1
            drive(defs, instance, wait_s=5)
            if _all_archived(opsdb):
                break
        stop.set()
        chaos.join(timeout=5)
        drive(defs, instance, wait_s=5)  # the purges and anything left, on a quiet link

        assert link.cuts + link.refused > 0, "the chaos never hit a transfer"
        archived_everywhere(config, opsdb)
        assert_safe(config, opsdb)
        assert disagreements(opsdb, ssh_settings(config)) == []
        with opsdb.session() as session:
            copies = Counter((c.package_id, c.location_id)
                             for c in session.scalars(select(PackageCopy)))
            assert [k for k, n in copies.items() if n > 1] == []
            assert session.scalars(select(Notification)).all() == []
        assert webhook_receiver.posts == []
        assert not [r for r in instance.get_runs() if RETRY_TAG in r.tags]
        assert instance.get_runs(RunsFilter(statuses=IN_FLIGHT)) == []
    finally:
        stop.set()
        link.close()
        opsdb.dispose()


def _all_archived(opsdb: OpsDB) -> bool:
    from ccat_dt.opsdb.models import PackageState

    with opsdb.session() as session:
        states = session.scalars(select(RawDataPackage.state)).all()
    return bool(states) and all(s == PackageState.ARCHIVED for s in states)
