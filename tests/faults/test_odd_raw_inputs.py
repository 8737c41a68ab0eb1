"""Bad or odd raw input in an instrument's directory: special files (a FIFO, a socket,
symlinks dangling, out of the root or in a loop, a hard link, a zero-byte file, a directory
ccat-dt's user cannot read) through filing, the lifecycle and staging; a FIFO put at a raw
file's name while it is hashed or packed; a package whose tar names paths outside where it is
unpacked.

Awkward names (shell metacharacters, a leading dash, a newline, 255 bytes, unicode) are tested
end to end over ssh in tests/faults/test_names.py and locally in
tests/faults/test_source_faults.py, with a name that is not UTF-8 and symlinks out of the root."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt import tarball
from ccat_dt.checksums import ALGORITHM, hash_file
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.filing import (
    FileSpec,
    FilingError,
    file_raw_files,
    finish_observation,
    start_observation,
)
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import PackageState, RawDataFile, utcnow
from ccat_dt.staging import Selection, request_staging
from ccat_dt.storage import files_under
from ccat_dt.tarball import MANIFEST_NAME, PackagingError, extract_package
from tests.faults.invariants import assert_safe
from tests.faults.pipeline import (
    MODULE,
    archived_everywhere,
    observe,
    package_names,
    package_state,
    run,
    source_root,
)
from tests.faults.retrying import operator_retry
from tests.helpers import checksum

HANG_S = 60  # far longer than any of these steps takes; a wait past it is a hang
SLOW_ROUNDS = 5  # a loaded machine's drive can take longer (seen in a CI run: nobody was
# reading the FIFO at 60 s); only a reader waiting on the FIFO is a hang


def _unless_hung(work: Callable[[], object], fifo: Path) -> object:
    """`work()`'s result, in a thread; if it is still at work after HANG_S it is taken as
    waiting for a writer of `fifo`: one is opened (and closed) so the thread ends, and the
    test fails."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    for _ in range(SLOW_ROUNDS):
        thread.join(HANG_S)
        if not thread.is_alive():
            return result[0] if result else None
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader sees end of file
        except OSError as exc:  # ENXIO: nobody has it open for reading: slow, not hung on it
            if exc.errno != errno.ENXIO:
                raise
            continue
        thread.join(HANG_S)
        pytest.fail(f"hung on the FIFO {fifo} for {HANG_S} s")
    pytest.fail(f"still at work after {HANG_S * SLOW_ROUNDS} s, not reading the FIFO")


def _fifo_in_place_of(path: Path) -> bytes:
    """An instrument puts a FIFO where a raw file was: returns the file's bytes."""
    data = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    return data


def test_a_fifo_put_at_a_raw_files_name_while_its_package_is_built_fails_the_build_not_hangs(
        config: Config, opsdb: OpsDB, instance: DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The build looks at every source before it writes (a FIFO found then fails it), but it
    reads them one after the other, minutes apart for a large package: a FIFO put at a later
    file's name meanwhile was opened for reading, which waits for a writer that never comes,
    and the packaging run hung for ever, its package never built nor failed. Now the build
    fails naming the file, as for a source changed since filing (quarantined, not retried by
    itself), leaves nothing at the buffer, and the FIFO is left as it is."""
    written = observe(config, opsdb)
    fifo = written[1]
    looked_at = tarball._stat_source
    swapped: list[bytes] = []

    def then_a_fifo(member: tarball.PackageMember) -> os.stat_result:
        found = looked_at(member)
        if member.source == written[-1] and not swapped:  # every source looked at
            swapped.append(_fifo_in_place_of(fifo))
        return found

    monkeypatch.setattr(tarball, "_stat_source", then_a_fifo)

    report = _unless_hung(lambda: run(config, instance, wait_s=0, in_process=True), fifo)

    assert swapped
    [package] = package_names(opsdb)
    assert report is not None and report.failed  # type: ignore[attr-defined]
    with opsdb.session() as session:
        packaging = next(s for s in diagnose(session, config, package, utcnow())
                         if s.stage == "packaging")
    assert packaging.state == "failed", packaging
    assert f"{fifo}: not a regular file" in packaging.detail, packaging.detail
    assert package_state(opsdb, package) == PackageState.FAILED
    buffer = config.resolve_root("sites/ccat/buffer")
    assert [p for p in buffer.rglob("*") if p.is_file() and p.name != ".ccat-dt-location"] == []
    assert os.path.exists(fifo) and not fifo.is_file()  # never read, replaced or removed
    for path in (written[0], written[2]):
        assert path.is_file()

    # As for a changed source: the instrument team puts the file back, the operator rebuilds.
    monkeypatch.undo()
    fifo.unlink()
    fifo.write_bytes(swapped[0])
    assert operator_retry(config, instance, opsdb, rebuild_failed=True) == [
        ("packaging", package, "")]

    archived_everywhere(config, opsdb)
    assert_safe(config, opsdb)


def test_a_fifo_put_at_a_name_while_its_batch_is_checksummed_is_refused_not_hung_on(
        config: Config, opsdb: OpsDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filing looks at every file of a batch (lstat) before it hashes any: a FIFO put at a
    name in between was opened for reading and `ccat-dt file` (or the filing service's request)
    waited for ever. Now the batch is refused naming the file, and nothing is filed."""
    directory = source_root(config) / "obs-0" / MODULE
    directory.mkdir(parents=True)
    names = [f"obs-0/{MODULE}/scan-{i}.dat" for i in range(3)]
    for name in names:
        (source_root(config) / name).write_bytes(os.urandom(2000))
    fifo = source_root(config) / names[1]
    start_observation(opsdb, "obs-0")
    from ccat_dt import filing

    inspect = filing._inspect
    swapped: list[bytes] = []

    def then_a_fifo(spec: FileSpec, *args: object, **kwargs: object) -> object:
        found = inspect(spec, *args, **kwargs)  # type: ignore[arg-type]
        if spec.path == names[-1]:  # every file looked at, none hashed yet
            swapped.append(_fifo_in_place_of(fifo))
        return found

    monkeypatch.setattr(filing, "_inspect", then_a_fifo)

    def file() -> object:
        try:
            return file_raw_files(opsdb, observation="obs-0", module=MODULE,
                                  files=[FileSpec(n) for n in names])
        except FilingError as exc:
            return exc

    refused = _unless_hung(file, fifo)

    assert swapped
    assert isinstance(refused, FilingError), refused
    assert "not a regular file" in str(refused) and names[1] in str(refused), refused
    with opsdb.session() as session:
        assert session.scalars(select(RawDataFile)).all() == []
    assert os.path.exists(fifo) and not fifo.is_file()


def _file_directory_command(config: Config, directory: str) -> list[str]:
    """`ccat-dt file --directory` as ccat-dt's own user would run it: as root, file modes stop
    nothing, so it runs without the capabilities that bypass them (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH)."""
    command = [str(Path(sys.executable).parent / "ccat-dt"), "--config", str(config.path),
               "file", "--observation", "obs-0", "--module", MODULE, "--directory", directory]
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run ccat-dt without root's capabilities")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]


def _as_mode(path: Path, mode: int, command: list[str]) -> subprocess.CompletedProcess[str]:
    """`command` run while `path` has `mode`."""
    os.chmod(path, mode)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(path, 0o755)


def _refused_naming(refused: subprocess.CompletedProcess[str], directory: str,
                    shown: str) -> None:
    assert refused.returncode == 2, (refused.returncode, refused.stdout, refused.stderr)
    said = refused.stderr
    assert f"'{directory}" in said and shown in said, said
    assert "make it readable by the user running ccat-dt" in said, said
    assert "nothing was filed" in said, said


def test_a_raw_directory_of_odd_entries_is_filed_told_and_purged_as_filed_and_no_further(
        config: Config, opsdb: OpsDB, instance: DagsterInstance, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An instrument's directory holding a FIFO, a socket, a dangling symlink, a symlink out of
    the source root, a symlink loop, a hard link of a raw file, a zero-byte file and a
    subdirectory ccat-dt's user cannot list (mode 0000).

    `ccat-dt file --directory` walked past the subdirectory without a word: the files in it
    were never filed, `file` exited 0, and once the observation was finished they could never
    be filed. Now it is refused naming that directory, its owner and mode and whom to make it
    readable by, nothing filed; once readable, the same command files every regular file and
    names the entries it passed over. None of those hangs it or is followed; the lifecycle
    archives, purges and stages back exactly the filed files, and nothing else is touched."""
    outside = tmp_path / "outside" / "not-raw-data.txt"
    outside.parent.mkdir()
    outside.write_bytes(b"the target of a symlink out of the source root")
    directory = source_root(config) / "obs-0" / MODULE
    (directory / "sub").mkdir(parents=True)
    raw = {"a.dat": os.urandom(3000), "zero.dat": b"", "sub/b.dat": os.urandom(2000)}
    for name, data in raw.items():
        (directory / name).write_bytes(data)
    os.link(directory / "a.dat", directory / "hard.dat")
    raw["hard.dat"] = raw["a.dat"]
    os.mkfifo(directory / "fifo")
    monkeypatch.chdir(directory)  # a socket's path must fit in 108 bytes
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind("socket")
    (directory / "dangling").symlink_to(directory / "gone.dat")
    (directory / "out").symlink_to(outside)
    (directory / "loop-1").symlink_to(directory / "loop-2")
    (directory / "loop-2").symlink_to(directory / "loop-1")
    odd = ["dangling", "fifo", "loop-1", "loop-2", "out", "socket"]
    start_observation(opsdb, "obs-0")
    command = _file_directory_command(config, f"obs-0/{MODULE}")

    refused = _as_mode(directory / "sub", 0o000, command)

    _refused_naming(refused, f"obs-0/{MODULE}/sub", "mode 0000")
    with opsdb.session() as session:
        assert session.scalars(select(RawDataFile)).all() == []

    filed = _unless_hung(lambda: subprocess.run(command, capture_output=True, text=True,
                                                timeout=HANG_S), directory / "fifo")

    assert isinstance(filed, subprocess.CompletedProcess)
    assert filed.returncode == 0, filed.stderr
    assert f"skipped {len(odd)} entries that are not regular files" in filed.stderr
    with opsdb.session() as session:
        assert sorted(session.scalars(select(RawDataFile.relative_path))) == sorted(
            f"obs-0/{MODULE}/{name}" for name in raw)
    finish_observation(opsdb, "obs-0")

    assert run(config, instance).failed == []

    archived_everywhere(config, opsdb)
    assert sorted(os.listdir(directory)) == odd  # each filed file purged, and only they
    assert outside.read_bytes() == b"the target of a symlink out of the source root"
    assert_safe(config, opsdb, expected_findings=[("dark", f"{MODULE}/{name}") for name in odd])
    request = request_staging(opsdb, location="ramses/processing",
                              selection=Selection(observation="obs-0"),
                              expires_in=timedelta(hours=1))
    assert run(config, instance).failed == []
    [package] = package_names(opsdb)
    staged = config.resolve_root("sites/ramses/processing") / request / package / "obs-0" / MODULE
    assert {str(p.relative_to(staged)): p.read_bytes() for p in files_under(staged)} == raw


@pytest.mark.parametrize(("mode", "shown"), [
    (0o100, "'obs-0/primecam/f280/sub' under"),  # entered, not listed: passed over before
    (0o600, "its directory"),  # listed, not entered: a bare "Permission denied" before
])
def test_a_subdirectory_that_cannot_be_listed_or_entered_refuses_file_directory(
        config: Config, opsdb: OpsDB, mode: int, shown: str) -> None:
    """As above for the other two ways a directory is unreadable: one that can be entered
    but not listed (0100) was passed over without a word; one that can be listed but not
    entered (0600) stopped the command with "ccat-dt: error: Permission denied (PATH)"."""
    directory = source_root(config) / "obs-0" / MODULE
    (directory / "sub").mkdir(parents=True)
    (directory / "a.dat").write_bytes(b"readable")
    (directory / "sub" / "b.dat").write_bytes(b"in a directory ccat-dt cannot read")
    start_observation(opsdb, "obs-0")

    refused = _as_mode(directory / "sub", mode,
                       _file_directory_command(config, f"obs-0/{MODULE}"))

    _refused_naming(refused, f"obs-0/{MODULE}/sub", f"mode 0{mode:o}")
    assert shown in refused.stderr, refused.stderr
    with opsdb.session() as session:
        assert session.scalars(select(RawDataFile)).all() == []
    assert (directory / "sub" / "b.dat").read_bytes() == b"in a directory ccat-dt cannot read"


def _altered_package(tar_path: Path, members: dict[str, bytes]) -> None:
    """A package tar as someone with write access to an archive could make it: each member
    listed in its manifest with its true size and checksum, whatever its name."""
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        manifest = json.dumps({"package": "p", "algorithm": ALGORITHM, "files": [
            {"path": name, "size": len(data), "checksum": checksum(data)}
            for name, data in members.items()]}).encode()
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))


@pytest.mark.parametrize("where", ["an existing file", "a new file"])
def test_a_package_naming_an_absolute_path_is_refused_before_anything_is_unpacked(
        tmp_path: Path, where: str) -> None:
    """A member with an absolute name was unpacked below the destination (tarfile's data
    filter strips the slash), but its manifest entry was then looked for at the absolute path
    itself: a file already there outside the destination, with the member's bytes, was
    vouched for as unpacked and verified, and returned as the entry whose file the caller
    moves into place and records (to be purged once its request is released). Now a package
    whose manifest names any path that is not a plain relative one is refused before anything
    is written, and nothing outside is read, written or vouched for."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.dat"
    data = b"a file of someone else's, outside the processing area"
    if where == "an existing file":
        victim.write_bytes(data)
    package = tmp_path / "altered.tar"
    _altered_package(package, {"obs-0/fine.dat": b"raw", str(victim): data})
    destination = tmp_path / "processing" / "request"

    with pytest.raises(PackagingError, match="unsafe"):
        extract_package(package, destination)

    assert not destination.exists() or list(destination.rglob("*")) == []
    assert [p.name for p in outside.iterdir()] == (
        ["victim.dat"] if where == "an existing file" else [])
    if where == "an existing file":
        assert hash_file(victim)[0] == checksum(data)
