"""Long lists of files on a remote host, over a real sshd: a remote command travels as one
string, which Linux refuses over 128 KiB ("Argument list too long"), every time. A look at
thousands of a location's files (a purge's re-check of a package's raw files, an audit) and
a batch session of many small packages each stay within it."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from ccat_dt.checksums import hash_file
from ccat_dt.config import load_config
from ccat_dt.defaults import EMBEDDED_DEFAULT, write_default_config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import DataLocation, LocationType, RawDataPackage, Site
from ccat_dt.packages import ensure_built, package_path, plan_new_packages
from ccat_dt.replicas import place, plan_placement
from ccat_dt.storage import Wanted, look, mark_location_root
from ccat_dt.topology import prepare_opsdb
from tests.sshd import SshServer

# Relative paths of 150 characters: 1,000 of them make a look's remote command ~150 KiB.
DIRECTORY = "d" * 60
FILES = 1000


def test_a_look_at_a_thousand_remote_files_answers_each_as_it_is_on_disk(
        tmp_path: Path, sshd: SshServer) -> None:
    root = sshd.root / tmp_path.name
    assert mark_location_root(str(root), sshd.destination, sshd.ssh, "cologne/buffer") is None
    (root / DIRECTORY).mkdir()
    relatives = [f"{DIRECTORY}/{i:05d}-{'f' * 80}.dat" for i in range(FILES)]
    for i, relative in enumerate(relatives):
        if i % 7:  # every seventh file is not there
            (root / relative).write_bytes(f"file {i}".encode())
    wanted = [Wanted(relative, rehash=i % 10 == 0) for i, relative in enumerate(relatives)]
    assert sum(len(w.relative_path) + 3 for w in wanted) > 128 * 1024

    seen = look(str(root), sshd.destination, sshd.ssh, wanted, "cologne/buffer")

    assert [s.relative_path for s in seen] == relatives
    for i, (item, found) in enumerate(zip(wanted, seen, strict=True)):
        path = root / item.relative_path
        if not path.exists():
            assert found.missing, found
            continue
        info = path.stat()
        assert (found.problem, found.size, found.inode, found.mtime_ns) == (
            None, info.st_size, info.st_ino, info.st_mtime_ns), found
        assert found.checksum == (hash_file(path)[0] if i % 10 == 0 else None)


@pytest.mark.skipif(shutil.which("bbcp") is None, reason="bbcp is not installed")
def test_a_batch_of_many_small_packages_fits_one_remote_command_line(
        tmp_path: Path, sshd: SshServer) -> None:
    """200 packages of a few bytes, each its own package (package_max_bytes 1), of an
    observation with a long name, on a bbcp route whose byte budget takes them all: the batch
    takes as many as its session's one remote command carries (landing and final name,
    checksum, identity per file: ~150 KiB for 200 here), and each lands verified at the
    remote root. rsync's own command carries a landing name per file: 400 such would do."""
    settings = copy.deepcopy(EMBEDDED_DEFAULT)  # one archive site: every package goes there
    settings["sites"] = [s for s in settings["sites"] if s["short_name"] != "us"]  # type: ignore[attr-defined]
    settings["routes"] = [r for r in settings["routes"]  # type: ignore[attr-defined]
                          if "us" not in (r["origin"], r["destination"])]
    for site in settings["sites"]:  # type: ignore[attr-defined]
        if site["short_name"] == "cologne":
            for location in site["locations"]:
                location["host"] = sshd.destination
                location["root"] = str(sshd.root / tmp_path.name / location["name"])
    for route in settings["routes"]:  # type: ignore[attr-defined]
        route.update(transport="bbcp", batch_bytes=10**12)
    settings["policies"] = {**settings["policies"], "package_max_bytes": 1}  # type: ignore[dict-item]
    settings["ssh"] = {"port": sshd.ssh.port, "identity_file": sshd.ssh.identity_file,
                       "known_hosts_file": sshd.ssh.known_hosts_file}
    config = load_config(write_default_config(tmp_path / "deploy", overrides=settings))
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    observation = "o" * 128  # the longest names make the fewest packages overflow the limit
    start_observation(opsdb, observation)
    instruments = config.resolve_root("sites/ccat/instruments")
    for i in range(200):
        path = instruments / observation / "primecam/f280" / f"{i:03d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"raw {i}".encode())
    file_directory(opsdb, observation=observation, module="primecam/f280",
                   directory=f"{observation}/primecam/f280")
    finish_observation(opsdb, observation)
    names = plan_new_packages(opsdb, config)
    assert len(names) == 200
    for name in names:
        ensure_built(opsdb, config, name)
    with opsdb.session() as session:
        buffer = session.query(DataLocation).join(Site).filter(
            Site.short_name == "cologne", DataLocation.location_type == LocationType.BUFFER).one()
        remote_root = Path(buffer.root)
        built = {p.name: Path(c.location.root) / c.relative_path
                 for p in session.query(RawDataPackage) for c in p.copies}
        paths = {p.name: package_path(p) for p in session.query(RawDataPackage)}

    placed = place(opsdb, config, plan_placement(opsdb, config, names[0], "cologne",
                                                 LocationType.BUFFER), LocationType.BUFFER)

    moved = [names[0], *placed.batched_with]
    assert 1 < len(moved) < len(names)  # batched, but not all 200 in one command line
    for name in moved:  # at the remote root under its final name, its bytes
        assert hash_file(remote_root / paths[name]) == hash_file(built[name]), name
    assert sorted(p.name for p in (remote_root / observation).iterdir()) == sorted(
        Path(paths[name]).name for name in moved)  # nothing else landed, nothing left over
