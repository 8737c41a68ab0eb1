"""Helpers several test modules share (fixtures are in conftest.py): raw files observed and
filed as instruments do, files written and damaged on disk, the CLI run in-process, and the
LTA copies OpsDB records at a site."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from sqlalchemy import select

from ccat_assets.instance import embedded_storage
from ccat_dt.checksums import new_hasher
from ccat_dt.config import Config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, LocationType, PackageCopy, Site


def observe(config: Config, opsdb: OpsDB, observations: int = 2, files: int = 3) -> Path:
    """Write random raw files at the observatory source and file them as instruments do."""
    source = config.resolve_root("sites/ccat/instruments")
    for n in range(observations):
        name = f"obs-{n}"
        start_observation(opsdb, name)
        for module in ("primecam/f280", "chai/lfa"):
            for i in range(files):
                path = source / name / module / f"sub/scan-{i}.dat"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(os.urandom(50_000 + i))
            file_directory(opsdb, observation=name, module=module, directory=f"{name}/{module}")
        finish_observation(opsdb, name)
    return source


def first_caller(marker: Path, note: str = "") -> bool:
    """True only for the first call with this `marker`, whichever process makes it (a drive
    executes its runs in forked children, so a test's flag in memory is not seen across
    them): that call creates the file, holding `note`."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(note)
    return True


def run_cli(*argv: str) -> int:
    """`ccat-dt ARGV` in this process; its exit status (0 when main returns normally)."""
    from ccat_assets.cli import main  # the CLI imports Dagster: only for tests that use it

    try:
        main(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def write(path: Path, data: bytes = b"raw bytes") -> Path:
    """`data` at `path`, its directories made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def checksum(data: bytes) -> str:
    """What ccat_dt.checksums computes for a file holding `data`."""
    hasher = new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


def flip_byte(path: Path, offset: int = 100, mask: int = 0x01) -> None:
    """Bit rot in place: the byte at `offset` XOR `mask`, size and name unchanged."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ mask]))


def rot_an_lta_copy(opsdb: OpsDB, site: str) -> PackageCopy:
    """Bit rot in the site's first LTA copy (a third into the file); returns that copy."""
    bad = lta_copies_at(opsdb, site)[0]
    path = Path(bad.location.root) / bad.relative_path
    flip_byte(path, path.stat().st_size // 3, 0x10)
    return bad


def lta_copies_at(opsdb: OpsDB, site: str) -> list[PackageCopy]:
    """The site's LTA copies in OpsDB, with what tests read of them loaded."""
    with opsdb.session() as session:
        copies = session.scalars(select(PackageCopy).join(DataLocation).join(Site).where(
            Site.short_name == site,
            DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE)
            .order_by(PackageCopy.id)).all()
        for copy in copies:
            _ = copy.location.root, copy.package.checksum
        return list(copies)


def instance_yaml(home: Path) -> str:
    """A test instance's dagster.yaml: the run and event storage `ccat-dt init` configures."""
    return yaml.safe_dump({"telemetry": {"enabled": False}, **embedded_storage(home)})
