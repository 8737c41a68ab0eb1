"""Random interleavings of lifecycle steps and storage faults, on real files and a real OpsDB:
no step of ours ever loses a filed byte, whatever happened to the storage before it.

The steps are the domain functions the Dagster assets call (build, copy to a site buffer,
archive, verify, audit and repair marking, purge); the faults are what disks and people do
(remove, truncate, flip a byte, replace a file, replace a directory with a symlink). After every
step the storage alone is read (tests/faults/storage_truth.py): the filed files whose bytes are
in no good copy may grow after a fault, never after a step of ours.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccat_dt.audit import audit
from ccat_dt.checksums import ChecksumMismatch
from ccat_dt.config import Config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.marker import MARKER
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import PackageBuildFailed, build, plan_packages
from ccat_dt.reaper import purge_package
from ccat_dt.replicas import NotReady, place, plan_placement, verify
from ccat_dt.tarball import PackagingError
from ccat_dt.transports.base import TransferError
from tests.faults.pipeline import deployment, source_root
from tests.faults.storage_truth import good_archive_sites, lost_filed_files

SITES = ("cologne", "us")
REQUIRED = 2  # the embedded default: both archive sites
EXPECTED = (NotReady, TransferError, PackageBuildFailed, PackagingError, ChecksumMismatch,
            OSError, LookupError)


class Lifecycle:
    """One embedded deployment (retention 0), two observations filed, their packages planned."""

    def __init__(self, root: Path) -> None:
        self.config: Config = deployment(root / "deploy")
        self.opsdb = OpsDB(self.config.opsdb_url)
        for n in range(2):
            name = f"obs-{n}"
            directory = source_root(self.config) / name / "primecam" / "f280"
            directory.mkdir(parents=True)
            for i in range(2):
                (directory / f"scan-{i}.dat").write_bytes(os.urandom(3000 + 17 * i + n))
            start_observation(self.opsdb, name)
            file_directory(self.opsdb, observation=name, module="primecam/f280",
                           directory=f"{name}/primecam/f280")
            finish_observation(self.opsdb, name)
        with self.opsdb.session() as session:
            self.packages = [p.name for p in plan_packages(session, self.config)]

    # -- our steps ------------------------------------------------------------------------

    def step(self, action: str, index: int, site_index: int) -> None:
        if action == "converge":  # every package one hop further, as the sensors would
            for which_package in range(len(self.packages)):
                for _ in SITES:  # the second site is served from the first one's archive
                    for stage in ("build", "copy", "archive"):
                        for which_site in range(len(SITES)):
                            self.step(stage, which_package, which_site)
            return
        package = self.packages[index % len(self.packages)]
        site = SITES[site_index % len(SITES)]
        try:
            if action == "build":
                build(self.opsdb, self.config, package)
            elif action in ("copy", "archive"):
                kind = LocationType.BUFFER if action == "copy" else LocationType.LONG_TERM_ARCHIVE
                place(self.opsdb, self.config,
                      plan_placement(self.opsdb, self.config, package, site, kind), kind)
            elif action == "verify":
                verify(self.opsdb, self.config, package, site, LocationType.LONG_TERM_ARCHIVE)
            elif action == "audit":
                audit(self.opsdb, checksums=True, repair=True, config=self.config)
            elif action == "purge":
                purge_package(self.opsdb, self.config, package)
        except EXPECTED:
            pass  # refusing to act is always allowed; acting wrongly is not

    # -- faults ---------------------------------------------------------------------------

    def files(self) -> list[Path]:
        roots = [self.config.resolve_root(loc.root) for site in self.config.settings.sites
                 for loc in site.locations]
        return sorted(p for root in roots for p in root.rglob("*")
                      if p.is_file() and not p.is_symlink() and p.name != MARKER)

    def fault(self, how: str, pick: int) -> None:
        files = self.files()
        if not files:
            return
        victim = files[pick % len(files)]
        if how == "remove":
            victim.unlink()
        elif how == "truncate":
            with victim.open("r+b") as stream:
                stream.truncate(victim.stat().st_size // 2)
        elif how == "flip":
            data = bytearray(victim.read_bytes())
            if data:
                data[pick % len(data)] ^= 0x40
                victim.write_bytes(bytes(data))
        elif how == "replace":
            replacement = victim.with_name(victim.name + ".new")
            replacement.write_bytes(os.urandom(victim.stat().st_size))
            replacement.replace(victim)  # same size, new inode, new bytes
        elif how == "symlink_dir":
            directory = victim.parent
            others = sorted({p.parent for p in files if p.parent != directory
                             and p.parent.parent == directory.parent})
            if not others:
                return
            shutil.rmtree(directory)
            directory.symlink_to(others[pick % len(others)])


STEP = st.tuples(st.sampled_from(["build", "copy", "archive", "verify", "audit", "purge",
                                  "purge", "converge", "converge"]),
                 st.integers(0, 3), st.integers(0, 1))
FAULT = st.tuples(st.just("fault"), st.sampled_from(
    ["remove", "truncate", "flip", "replace", "symlink_dir"]), st.integers(0, 10_000))
EVENTS = st.lists(st.one_of(STEP, STEP, STEP, FAULT), min_size=8, max_size=30)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS)
def test_no_step_loses_a_filed_byte_whatever_the_storage_did(events: list[Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        life = Lifecycle(Path(tmp))
        try:
            lost = set(lost_filed_files(life.config, life.opsdb))
            for event in events:
                if event[0] == "fault":
                    life.fault(event[1], event[2])
                    lost = set(lost_filed_files(life.config, life.opsdb))
                    continue
                before = {str(p) for p in life.files()}
                archived = good_archive_sites(life.config, life.opsdb)
                life.step(*event)
                now = set(lost_filed_files(life.config, life.opsdb))
                assert now <= lost, f"{event} lost {sorted(now - lost)}"
                lost = now
                # a source file deleted by this step had its required good archive copies
                gone = before - {str(p) for p in life.files()}
                for source in gone & set(archived):
                    assert len(archived[source]) >= REQUIRED, (
                        f"{event} deleted {source} with good archive copies only at "
                        f"{sorted(archived[source])}")
        finally:
            life.opsdb.dispose()
