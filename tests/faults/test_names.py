"""Awkward file names through the whole lifecycle over a real sshd: filed with `ccat-dt file`,
packaged, copied to the archive hosts and between them (rsync; bbcp when installed), verified,
renamed and removed over ssh, purged at the source, staged back, audited. Each name must stay
that name, byte for byte, and no remote command may act on another path (a glob, an option,
a substitution). The local transport's lifecycle is tests/faults/test_source_faults.py."""

from __future__ import annotations

import os
import shutil
import tarfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_assets.definitions import build_definitions
from ccat_assets.driver import drive
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.filing import MAX_PATH_BYTES
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, LocationType, PackageCopy, utcnow
from ccat_dt.staging import Selection, request_staging
from ccat_dt.storage import files_under
from ccat_dt.tarball import read_manifest
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import archived_everywhere, package_names
from tests.helpers import run_cli
from tests.sshd import SshServer
from tests.test_multisite import multisite

MODULE = "primecam/f280"
CANARY = "ccat-canary"
# What a shell, rsync, bbcp, rm, mv or xxhsum could read as something else than one file name.
NAMES = ["-rf", "--help", "~tilde", "host:path.dat", "localhost:x", "a b  'q' \"dq\";.dat",
         f"$(touch {CANARY}) `touch {CANARY}` $HOME.dat", "*?[g].dat", "ünï-日本.dat",
         "tab\there", "line\nbreak", "n" * 255]
PREFIX = f"obs-0/{MODULE}/"


def deep(length: int) -> str:
    """A relative path of `length` bytes, in directories of 200."""
    parts = []
    while length > 255:
        parts.append("d" * 200)
        length -= 201
    return "/".join([*parts, "f" * length])


# Left by someone else beside the archive hosts' copies: a glob, `-rf` or a split word of a
# remote `rm`/`mv` would reach them.
DECOYS = ["-rf", "*", "g.dat", "~tilde", "obs-0_primecam-f280_p00"]


@pytest.mark.parametrize("transport", [
    "rsync",
    pytest.param("bbcp", marks=pytest.mark.skipif(
        shutil.which("bbcp") is None, reason="bbcp is not installed"))])
def test_awkward_names_travel_over_ssh_and_come_back_staged_byte_for_byte(
        tmp_path: Path, sshd: SshServer, instance: DagsterInstance, transport: str) -> None:
    config = multisite(tmp_path, sshd, transport)
    opsdb = OpsDB(config.opsdb_url)
    source = config.resolve_root("sites/ccat/instruments")
    directory = source / "obs-0" / MODULE
    written = {}
    longest = deep(MAX_PATH_BYTES - len(PREFIX))  # the longest path filing takes stages too
    for i, name in enumerate([*NAMES, longest]):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1000 + i))
        written[PREFIX + name] = path.read_bytes()
    assert len((PREFIX + longest).encode()) == MAX_PATH_BYTES
    decoys = _decoys(config)
    config_file = str(config.path)
    assert run_cli("--config", config_file, "observation", "start", "obs-0") == 0
    assert run_cli("--config", config_file, "file", "--observation", "obs-0", "--module",
                   MODULE, "--directory", f"obs-0/{MODULE}") == 0
    assert run_cli("--config", config_file, "observation", "finish", "obs-0") == 0

    defs = build_definitions(config)
    assert drive(defs, instance).failed == []

    archived_everywhere(config, opsdb)
    assert files_under(source) == []  # each source file purged by its own name, and only it
    for path, data in decoys.items():
        assert path.read_bytes() == data, path
    with opsdb.session() as session:
        tars = [Path(c.location.root) / c.relative_path for c in session.scalars(
            select(PackageCopy).join(PackageCopy.location).where(
                DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE))]
        [package] = package_names(opsdb)
        assert diagnose(session, config, package, utcnow())  # `why` can say it
    assert len(tars) == 2
    for tar in tars:  # each archive's tar holds every name with its bytes
        assert {e.path for e in read_manifest(tar)} == set(written)
        assert _members(tar) == written

    name = request_staging(opsdb, location="ramses/processing",
                           selection=Selection(observation="obs-0"),
                           expires_in=timedelta(hours=1))
    assert drive(defs, instance).failed == []
    staged = config.resolve_root("sites/ramses/processing") / name / package
    assert {str(p.relative_to(staged)): p.read_bytes() for p in files_under(staged)} == written

    assert_safe(config, opsdb, expected_findings=[("dark", decoy) for decoy in DECOYS])
    assert not list(tmp_path.rglob(CANARY)) and not list(sshd.root.rglob(CANARY))
    assert not (Path.home() / CANARY).exists() and not (Path.cwd() / CANARY).exists()


def _decoys(config: Config) -> dict[Path, bytes]:
    """Files OpsDB does not know, beside where each archive host's buffer copy will be."""
    written = {}
    for site in ("cologne", "us"):
        root = Path(config.location(site, "buffer").root)
        for name in DECOYS:
            path = root / "obs-0" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            data = uuid.uuid4().bytes
            path.write_bytes(data)
            written[path] = data
    return written


def _members(tar: Path) -> dict[str, bytes]:
    """Every data member of the tar with its bytes, as tar reads it (not our manifest)."""
    with tarfile.open(tar) as archive:
        return {m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
                for m in archive.getmembers() if m.isreg() and m.name != "MANIFEST.json"}
