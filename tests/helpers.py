"""Helpers several test modules share (fixtures are in conftest.py): raw files observed and
filed as instruments do, files written and damaged on disk, the CLI run in-process, the
LTA copies OpsDB records at a site, and new OpsDBs and Dagster instances made quickly."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy import select
from sqlalchemy.engine import make_url

from ccat_assets.instance import embedded_storage
from ccat_dt.checksums import new_hasher
from ccat_dt.config import Config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB, migrate
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


# A new OpsDB is migrated step by step by Alembic (0.35-0.5 s on a 2-core VM) and a new Dagster
# instance's storage is stamped after reading Dagster's migration scripts (0.7-1.5 s): several
# minutes of a suite where most tests start from both. Each test process makes each once and
# every test starts from a copy of those files. tests/test_migrations.py and the `ccat-dt init`
# tests make them for real.

@functools.cache
def _templates() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="ccat-test-templates-"))
    maker = os.getpid()  # a forked child leaving through sys.exit must not take them along

    @atexit.register
    def _remove() -> None:
        if os.getpid() == maker:
            shutil.rmtree(directory, ignore_errors=True)

    return directory


@functools.cache
def _empty_opsdb() -> Path:
    path = _templates() / "opsdb.sqlite"
    migrate(f"sqlite:///{path}")
    return _checkpointed(path)


@functools.cache
def _empty_instance_home() -> Path:
    home = _templates() / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(home))
    with DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
    for database in home.rglob("*.db"):
        _checkpointed(database)
    return home


def _checkpointed(path: Path) -> Path:
    """`path` with all of its WAL written into the main file, which is then copied alone."""
    with closing(sqlite3.connect(path)) as connection:
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, f"{path} is in use: a copy would miss what its WAL holds"
    return path


def new_opsdb(config: Config) -> None:
    """An empty OpsDB at the newest schema where `config` keeps its SQLite OpsDB (for another
    database: nothing). prepare_opsdb then finds it migrated and mirrors the topology."""
    url = make_url(config.opsdb_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return
    path = Path(url.database)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_opsdb(), path)


def new_instance_home(home: Path, template: Path | None = None) -> Path:
    """`home` as a new Dagster instance with the embedded default's storage: its dagster.yaml
    and empty storage files (or a copy of `template`'s, made by `instance_template`)."""
    shutil.copytree(template or _empty_instance_home(), home,
                    ignore=shutil.ignore_patterns("*-wal", "*-shm", "dagster.yaml"))
    (home / "dagster.yaml").write_text(instance_yaml(home))
    return home


def template_directory(name: str) -> Path:
    """A new directory among this test process's templates (removed as it exits)."""
    directory = _templates() / name
    directory.mkdir()
    return directory


def instance_template(home: Path) -> Path:
    """`home`, an instance closed by now, made a template of new_instance_home: each of its
    SQLite files checkpointed, so that the file alone holds it."""
    for database in home.rglob("*.db"):
        _checkpointed(database)
    return home


def driven_template(config: Config, opsdb: OpsDB) -> tuple[Path, Path]:
    """The deployment of `config` (in a `template_directory`, its work filed) driven to the end
    by the real lifecycle into a new instance beside it, made a template: its deployment
    directory and instance, for `copied_deployment`. `opsdb` is disposed of."""
    from ccat_assets.definitions import build_definitions
    from ccat_assets.driver import drive

    directory = config.path.parent
    home = new_instance_home(directory.parent / "dagster_home")
    with DagsterInstance.from_config(str(home)) as instance:
        assert drive(build_definitions(config), instance).failed == []
    opsdb.dispose()
    for database in directory.glob("*.sqlite"):
        _checkpointed(database)
    return directory, instance_template(home)


def copied_tree(source: Path, destination: Path) -> dict[int, int]:
    """`source` copied to `destination` (mtimes kept, SQLite's -wal and -shm left out); each
    regular file's inode there -> its copy's here."""
    shutil.copytree(source, destination, symlinks=True,
                    ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    inodes = {}
    for path in destination.rglob("*"):
        if path.is_file() and not path.is_symlink():
            inodes[(source / path.relative_to(destination)).stat().st_ino] = path.stat().st_ino
    return inodes


def reinoded(database: Path, inodes: dict[int, int]) -> None:
    """Every `inode` column of the SQLite `database` (what OpsDB records of a file as it was
    written, so that a changed file is never taken for it) made to name the copy's inode
    (copied_tree) where it named the original's."""
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("CREATE TEMP TABLE moved_inodes (old INTEGER PRIMARY KEY, new INTEGER)")
        connection.executemany("INSERT INTO moved_inodes VALUES (?, ?)", inodes.items())
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
        for table in tables:
            if "inode" in [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]:
                connection.execute(
                    f'UPDATE "{table}" SET inode = (SELECT new FROM moved_inodes '
                    f'WHERE old = "{table}".inode) WHERE inode IN (SELECT old FROM moved_inodes)')


def relocated(database: Path, old: str, new: str) -> None:
    """Every text in the SQLite `database` that holds the path `old` made to hold `new`
    instead: OpsDB records each location's root, Dagster's events the files they name, so a
    copy of a deployment made elsewhere only holds once they point at where it is now."""
    with closing(sqlite3.connect(database)) as connection, connection:
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
        for table in tables:
            for column in [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]:
                connection.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                   f'WHERE instr("{column}", ?) > 0', (old, new, old))


SHM = Path("/dev/shm")
SHM_NEEDED = 256 * 2**20  # the instance of one test writes a few MB


@contextmanager
def scratch_instance(tmp_path: Path, template: Path | None = None,
                     moved: Sequence[tuple[str, str]] = ()) -> Iterator[DagsterInstance]:
    """A new persistent instance (other processes can open it) with the embedded default's
    storage, on tmpfs when there is one: each run commits dozens of events, each an fsync on
    a real disk (~1.6 ms on the CI VM, more while other tests write). The OpsDB and every
    data location stay where the test put them. With `template` (instance_template), a copy
    of that instance, each path `old` its events name made `new` for each (old, new) in
    `moved` (`relocated`)."""
    home, scratch = tmp_path / "dagster_home", None
    try:
        if os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > SHM_NEEDED:
            scratch = Path(tempfile.mkdtemp(prefix="ccat-test-instance-", dir=SHM))
            home = scratch / "dagster_home"
    except OSError:
        pass
    new_instance_home(home, template)
    for database in home.rglob("*.db"):
        for old, new in moved:
            relocated(database, old, new)
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def copied_deployment(deploy: Path, home: Path, tmp_path: Path,
                      elsewhere: Sequence[tuple[Path, Path]] = ()) -> Iterator[DagsterInstance]:
    """tmp_path/deploy a copy of the deployment directory `deploy` (its SQLite OpsDB
    checkpointed) and the instance a copy of `home` (instance_template): a state a test
    process drove to once, for each test that starts from it. Each (source, destination) of
    `elsewhere`, a tree of the deployment's outside its directory (the roots of locations on
    an archive host), is copied there too, and its configuration made to name the copy. Every
    path and inode the copy's OpsDB and instance record of its files is made the copy's
    (relocated, reinoded)."""
    copy = tmp_path / "deploy"
    inodes = copied_tree(deploy, copy)
    moved = [(str(deploy), str(copy))]
    for source, destination in elsewhere:
        inodes.update(copied_tree(source, destination))
        moved.append((str(source), str(destination)))
        for settings in copy.glob("*.yaml"):
            settings.write_text(settings.read_text().replace(str(source), str(destination)))
    for database in copy.glob("*.sqlite"):
        for old, new in moved:
            relocated(database, old, new)
        reinoded(database, inodes)
    with scratch_instance(tmp_path, template=home, moved=moved) as instance:
        yield instance


def rehashes_before_unlink(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The relative paths the purge re-hashes before unlinking a local copy from now on (its
    look at the file is counted; the purge works as ever): a deletion trusting an unchanged
    identity reads nothing."""
    import ccat_dt.reaper as reaper

    reads: list[str] = []
    real = reaper.look_local

    def look_local(root, wanted):  # type: ignore[no-untyped-def]
        if wanted.rehash:
            reads.append(wanted.relative_path)
        return real(root, wanted)

    monkeypatch.setattr(reaper, "look_local", look_local)
    return reads
