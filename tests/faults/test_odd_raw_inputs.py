"""Bad or odd raw input in an instrument's directory: special files (a FIFO, a socket,
symlinks dangling, out of the root or in a loop, a hard link, a zero-byte file, a directory
ccat-dt's user cannot read) through filing, the lifecycle and staging; a FIFO put at a raw
file's name while it is hashed or packed; a package whose tar names paths outside where it is
unpacked.

Awkward names (shell metacharacters, a leading dash, a newline, 255 bytes, unicode) are tested
end to end over ssh in tests/faults/test_names.py and locally in
tests/faults/test_source_faults.py, with a name that is not UTF-8 and symlinks out of the root."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from ccat_dt import tarball
from ccat_dt.config import Config
from ccat_dt.diagnosis import diagnose
from ccat_dt.filing import (
    FileSpec,
    FilingError,
    file_raw_files,
    start_observation,
)
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import PackageState, RawDataFile, utcnow
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

HANG_S = 60  # far longer than any of these steps takes; a wait past it is a hang


def _unless_hung(work: Callable[[], object], fifo: Path) -> object:
    """`work()`'s result, in a thread; if it is still at work after HANG_S it is taken as
    waiting for a writer of `fifo`: one is opened (and closed) so the thread ends, and the
    test fails."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader sees end of file
        thread.join(HANG_S)
        pytest.fail(f"hung on the FIFO {fifo} for {HANG_S} s")
    return result[0] if result else None


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

    report = _unless_hung(lambda: run(config, instance, wait_s=0, workers=1), fifo)

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
