"""Filing raw files: good input is recorded, bad input is rejected and changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from ccat_dt.checksums import ALGORITHM, hash_file
from ccat_dt.config import Config
from ccat_dt.filing import (
    MAX_PATH_BYTES,
    FileSpec,
    FilingError,
    FilingResult,
    file_directory,
    file_raw_files,
    finish_observation,
    read_manifest_file,
    start_observation,
)
from ccat_dt.marker import MARKER
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    ExecutedObsUnit,
    ObservationStatus,
    RawDataFile,
    RawDataFileCopy,
)
from tests.helpers import write

OBS = "obs-1"
MODULE = "primecam/f280"


@pytest.fixture
def root(config: Config) -> Path:
    path = config.resolve_root("sites/ccat/instruments")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def obs(opsdb: OpsDB) -> str:
    return start_observation(opsdb, OBS)


def snapshot(opsdb: OpsDB) -> dict[str, Any]:
    """Every filing-related row plus the source tree, to prove a rejected call changed nothing."""
    state: dict[str, Any] = {}
    with opsdb.session() as session:
        for table in ("raw_data_files", "physical_copies", "executed_obs_units"):
            state[table] = [tuple(row) for row in
                            session.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
        roots = session.execute(text(
            "SELECT root FROM data_locations WHERE location_type = 'source'")).scalars().all()
    for source in roots:
        tree = []
        for dirpath, dirs, files in os.walk(source):
            for name in sorted(dirs + files):
                info = os.lstat(os.path.join(dirpath, name))
                tree.append((os.path.relpath(os.path.join(dirpath, name), source),
                             info.st_size, info.st_mtime_ns, info.st_mode))
        state[f"tree:{source}"] = sorted(tree)
    return state


def rejected(opsdb: OpsDB, match: str, call: Any = file_raw_files, **kwargs: Any) -> str:
    """Call, expect FilingError matching `match`, and check nothing changed; returns the message."""
    kwargs.setdefault("observation", OBS)
    kwargs.setdefault("module", MODULE)
    before = snapshot(opsdb)
    with pytest.raises(FilingError, match=match) as info:
        call(opsdb, **kwargs)
    assert snapshot(opsdb) == before
    return str(info.value)


def files_in(opsdb: OpsDB) -> list[RawDataFile]:
    with opsdb.session() as session:
        return list(session.scalars(select(RawDataFile).order_by(RawDataFile.relative_path)))


# --- good input ----------------------------------------------------------------------------------

def test_single_file_is_filed_with_computed_checksum_and_verified_source_copy(
        opsdb: OpsDB, root: Path, obs: str) -> None:
    checksum, _ = hash_file(write(root / "obs-1" / "a.dat", b"x" * 12))
    before = snapshot(opsdb)
    assert before[f"tree:{root}"][-1][0] == "obs-1/a.dat"  # the snapshot sees the source tree
    result = file_raw_files(opsdb, observation=OBS, module=MODULE, files=[FileSpec("obs-1/a.dat")])
    assert result == FilingResult(filed=1, unchanged=0, bytes=12)
    after = snapshot(opsdb)
    assert after[f"tree:{root}"] == before[f"tree:{root}"]  # filing never touches the files
    assert len(after["raw_data_files"]) == len(after["physical_copies"]) == 1
    with opsdb.session() as session:
        raw = session.scalars(select(RawDataFile)).one()
        assert (raw.relative_path, raw.size, raw.checksum_algorithm, raw.checksum) == (
            "obs-1/a.dat", 12, ALGORITHM, checksum)
        assert raw.observation.uuid == obs and raw.module.label == MODULE
        assert raw.source_location.label == "ccat/instruments"
        copy = session.scalars(select(RawDataFileCopy)).one()
        assert copy.raw_data_file_id == raw.id and copy.location_id == raw.source_location_id
        assert (copy.relative_path, copy.size, copy.checksum) == ("obs-1/a.dat", 12, checksum)
        assert copy.status == CopyStatus.PRESENT and copy.is_verified


def test_declared_correct_size_and_checksum_are_accepted(
        opsdb: OpsDB, root: Path, obs: str) -> None:
    checksum, _ = hash_file(write(root / "a.dat", b"hello"))
    result = file_raw_files(opsdb, observation=OBS, module=MODULE, site="ccat",
                            location="instruments",
                            files=[FileSpec("./a.dat", size=5, checksum=checksum.upper())])
    assert result == FilingResult(1, 0, 5)
    assert [(f.relative_path, f.checksum) for f in files_in(opsdb)] == [("a.dat", checksum)]


def test_directory_is_filed_recursively_and_sorted(opsdb: OpsDB, root: Path, obs: str,
                                                   tmp_path: Path) -> None:
    write(root / "obs-1" / "z.dat", b"1")
    write(root / "obs-1" / "sub" / "b.dat", b"22")
    write(root / "obs-1" / "sub" / "deeper" / "a.dat", b"333")
    write(root / "other" / "not-this.dat", b"4444")
    (root / "obs-1" / "link.dat").symlink_to(write(tmp_path / "elsewhere.dat", b"!"))
    os.mkfifo(root / "obs-1" / "sub" / "pipe")
    result = file_directory(opsdb, observation=OBS, module=MODULE, directory="obs-1")
    assert result == FilingResult(filed=3, unchanged=0, bytes=6,
                                  skipped=["obs-1/link.dat", "obs-1/sub/pipe"])  # told, not filed
    assert [f.relative_path for f in files_in(opsdb)] == [
        "obs-1/sub/b.dat", "obs-1/sub/deeper/a.dat", "obs-1/z.dat"]  # symlinks are not followed
    again = file_directory(opsdb, observation=OBS, module=MODULE, directory="obs-1/")
    assert again.filed == 0 and again.unchanged == 3


def test_the_location_marker_is_never_filed(opsdb: OpsDB, root: Path, obs: str) -> None:
    """It says the disk is mounted: filed, it would be packaged and then purged, and every later
    deletion there would find the root unmounted."""
    assert (root / MARKER).is_file()
    write(root / "a.dat", b"1")
    result = file_directory(opsdb, observation=OBS, module=MODULE, directory=".")
    assert (result.filed, result.skipped) == (1, [])
    assert [f.relative_path for f in files_in(opsdb)] == ["a.dat"]
    rejected(opsdb, r"'\.ccat-dt-location' is the location marker", files=[FileSpec(MARKER)])
    rejected(opsdb, r"is the location marker", files=[FileSpec(f"./{MARKER}")])


def test_directory_outside_or_missing_is_rejected(opsdb: OpsDB, root: Path, obs: str) -> None:
    rejected(opsdb, r"directory '\.\./buffer' is outside source location ccat/instruments",
             call=file_directory, directory="../buffer")
    rejected(opsdb, r"directory 'nope' does not exist under", call=file_directory, directory="nope")


def test_manifest_json_lines_and_list(opsdb: OpsDB, root: Path, obs: str, tmp_path: Path) -> None:
    checksum, _ = hash_file(write(root / "m" / "a.dat", b"abc"))
    write(root / "m" / "b.dat", b"defg")
    lines = tmp_path / "manifest.jsonl"
    lines.write_text(json.dumps({"path": "m/a.dat", "size": 3, "checksum": checksum}) + "\n\n"
                     + json.dumps({"path": "m/b.dat"}) + "\n")
    specs = read_manifest_file(lines)
    assert specs == [FileSpec("m/a.dat", 3, checksum), FileSpec("m/b.dat")]
    listed = tmp_path / "manifest.json"
    listed.write_text(json.dumps([{"path": "m/a.dat", "size": 3, "checksum": checksum},
                                  {"path": "m/b.dat"}], indent=2))
    assert read_manifest_file(listed) == specs
    result = file_raw_files(opsdb, observation=OBS, module=MODULE, files=specs)
    assert result == FilingResult(filed=2, unchanged=0, bytes=7)


@pytest.mark.parametrize(("content", "match"), [
    ('{"path": "a"}\n{"path": "b",\n', r"manifest\.jsonl, line 2: not valid JSON"),
    ('{"path": "a"}\n{"path": "b", "cheksum": "00"}\n', r"line 2: unknown key\(s\) cheksum;"),
    ('{"path": "a", "size": "12"}\n', r"line 1: 'size' of 'a' must be a non-negative integer"),
    ('{"size": 3}\n', r"line 1: 'path' must be a non-empty string"),
    ('[{"path": "a"}, 7]', r"entry 2: expected an object"),
    ('[{"path": "a"},\n {"path": }]', r"line 2: not valid JSON"),
])
def test_bad_manifest_names_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(content)
    with pytest.raises(FilingError, match=match) as info:
        read_manifest_file(manifest)
    assert str(manifest) in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FilingError, match=r"manifest .*nope\.jsonl: cannot read it"):
        read_manifest_file(tmp_path / "nope.jsonl")


def test_identical_refiling_is_a_no_op(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "a.dat", b"data")
    file_raw_files(opsdb, observation=OBS, module=MODULE, files=[FileSpec("a.dat")])
    before = snapshot(opsdb)
    result = file_raw_files(opsdb, observation=OBS, module=MODULE, files=[FileSpec("a.dat", 4)])
    assert result == FilingResult(filed=0, unchanged=1, bytes=0)
    assert snapshot(opsdb) == before


def test_empty_batch_files_nothing(opsdb: OpsDB, root: Path, obs: str) -> None:
    assert file_raw_files(opsdb, observation=OBS, module=MODULE, files=[]) == FilingResult(0, 0, 0)


# --- bad input: rejected with a clear message, nothing changed -----------------------------------

def test_dotdot_path(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root.parent / "outside.dat", b"secret")
    rejected(opsdb, r"observation 'obs-1': path '\.\./outside\.dat' is outside source location "
             r"ccat/instruments \(root .*instruments\)", files=[FileSpec("../outside.dat")])
    rejected(opsdb, r"path 'a/\.\./\.\./outside\.dat' is outside",
             files=[FileSpec("a/../../outside.dat")])


def test_absolute_path(opsdb: OpsDB, root: Path, obs: str) -> None:
    inside = write(root / "a.dat", b"data")  # absolute is refused even when it points inside
    rejected(opsdb, rf"path '{inside}' is absolute; give it relative to the root of source "
             "location ccat/instruments", files=[FileSpec(str(inside))])


@pytest.mark.parametrize("path", ["", " ", ".", "./"])
def test_empty_path(opsdb: OpsDB, root: Path, obs: str, path: str) -> None:
    rejected(opsdb, "is empty or invalid", files=[FileSpec(path)])


def deep_path(length: int) -> str:
    """A relative path of `length` UTF-8 bytes, in components of up to 254 bytes ('é' is 2)."""
    parts = []
    while length > 255:
        parts.append("é" * 127)
        length -= 255
    return "/".join([*parts, "f" * length])


def test_a_path_too_long_to_stage_is_refused(opsdb: OpsDB, root: Path, obs: str) -> None:
    """Before, filed and archived, then every staging of it failed: 'File name too long'."""
    too_long = deep_path(MAX_PATH_BYTES + 1)
    assert len(too_long) < MAX_PATH_BYTES  # counted in bytes, not characters
    write(root / too_long, b"deep")
    message = rejected(opsdb, rf"is {MAX_PATH_BYTES + 1} bytes long, more than "
                       rf"{MAX_PATH_BYTES}: it could be archived but never staged",
                       call=file_directory, directory=".")
    assert too_long[-40:] in message
    os.remove(root / too_long)
    write(root / deep_path(MAX_PATH_BYTES), b"deep")
    assert file_directory(opsdb, observation=OBS, module=MODULE, directory=".").filed == 1


def test_symlink_escaping_the_root(opsdb: OpsDB, root: Path, obs: str, tmp_path: Path) -> None:
    (root / "link.dat").symlink_to(write(tmp_path / "secret.dat", b"secret"))
    rejected(opsdb, r"path 'link\.dat' is outside source location ccat/instruments",
             files=[FileSpec("link.dat")])
    (root / "dirlink").symlink_to(tmp_path)
    rejected(opsdb, r"path 'dirlink/secret\.dat' is outside",
             files=[FileSpec("dirlink/secret.dat")])


def test_a_symlinked_directory_inside_the_root_is_refused(opsdb: OpsDB, root: Path,
                                                         obs: str) -> None:
    """Filed through a symlink, one observation's purge could delete another's file."""
    write(root / "obs-2" / "a.dat", b"another observation's data")
    (root / "obs-1").symlink_to(root / "obs-2")
    message = rejected(opsdb, r"path 'obs-1/a\.dat' passes through a symlink",
                       files=[FileSpec("obs-1/a.dat")])
    assert "obs-2/a.dat" in message  # says which real path to file instead


def test_missing_file_and_not_a_regular_file(opsdb: OpsDB, root: Path, obs: str) -> None:
    rejected(opsdb, rf"file 'a/b\.dat' does not exist under {root}", files=[FileSpec("a/b.dat")])
    (root / "adir").mkdir()
    rejected(opsdb, r"'adir' is not a regular file", files=[FileSpec("adir")])


def test_size_mismatch(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "a.dat", b"x" * 12)
    rejected(opsdb, r"observation 'obs-1': size mismatch for 'a\.dat': declared 10, on disk 12",
             files=[FileSpec("a.dat", size=10)])


def test_checksum_mismatch(opsdb: OpsDB, root: Path, obs: str) -> None:
    actual, _ = hash_file(write(root / "a.dat", b"data"))
    rejected(opsdb, rf"checksum mismatch for 'a\.dat': declared {'0' * 32}, computed {actual}",
             files=[FileSpec("a.dat", checksum="0" * 32)])
    rejected(opsdb, r"checksum of 'a\.dat' is not 32 hex digits \(xxh3_128\): 'abc'",
             files=[FileSpec("a.dat", checksum="abc")])


def test_unknown_site_or_location(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "a.dat", b"data")
    rejected(opsdb, r"unknown location 'ccat/nowhere'; source locations: ccat/instruments",
             location="nowhere", files=[FileSpec("a.dat")])
    rejected(opsdb, r"site 'mars' has no source location", site="mars", files=[FileSpec("a.dat")])
    rejected(opsdb, r"--site ccat and --location cologne/lta name two sites", site="ccat",
             location="cologne/lta", files=[FileSpec("a.dat")])


@pytest.mark.parametrize(("site", "location", "label"), [
    (None, "buffer", "ccat/buffer"), ("ccat", "buffer", "ccat/buffer"),
    ("cologne", "lta", "cologne/lta"), (None, "ccat/buffer", "ccat/buffer"),
    (None, "cologne/lta", "cologne/lta"), ("cologne", "cologne/lta", "cologne/lta")])
def test_location_must_be_a_source(opsdb: OpsDB, root: Path, obs: str, site: str | None,
                                   location: str, label: str) -> None:
    write(root / "a.dat", b"data")
    rejected(opsdb, rf"location {label} is a .*, raw files are filed at a source location",
             site=site, location=location, files=[FileSpec("a.dat")])


@pytest.mark.parametrize("module", ["primecam/f999", "primecam", "nope/f280", ""])
def test_unknown_module(opsdb: OpsDB, root: Path, obs: str, module: str) -> None:
    write(root / "a.dat", b"data")
    rejected(opsdb, rf"unknown module '{module}'; known modules: chai/hfa, chai/lfa, "
             "primecam/f280, primecam/f350", module=module, files=[FileSpec("a.dat")])


def test_unknown_or_finished_observation(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "a.dat", b"data")
    rejected(opsdb, r"observation 'nope' is unknown", observation="nope",
             files=[FileSpec("a.dat")])
    start_observation(opsdb, "obs-done")
    finish_observation(opsdb, "obs-done")
    rejected(opsdb, r"observation 'obs-done' finished at", observation="obs-done",
             files=[FileSpec("a.dat")])
    rejected(opsdb, r"observation 'obs-done' finished at", call=file_directory,
             observation="obs-done", directory=".")


def test_same_path_twice_in_one_call(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "a.dat", b"data")
    rejected(opsdb, r"path 'a\.dat' is listed twice \(as 'a\.dat' and '\./a\.dat'\)",
             files=[FileSpec("a.dat"), FileSpec("./a.dat")])


def test_refiling_with_different_content_is_refused(opsdb: OpsDB, root: Path, obs: str) -> None:
    old, _ = hash_file(write(root / "a.dat", b"data"))
    file_raw_files(opsdb, observation=OBS, module=MODULE, files=[FileSpec("a.dat")])
    new, _ = hash_file(write(root / "a.dat", b"DATA"))  # same size, other bytes
    rejected(opsdb, rf"'a\.dat' is already filed with checksum {old}; refusing to re-file it "
             rf"with checksum {new}", files=[FileSpec("a.dat")])
    rejected(opsdb, r"checksum mismatch for 'a\.dat'", files=[FileSpec("a.dat", checksum=old)])
    assert [f.checksum for f in files_in(opsdb)] == [old]


def test_refiling_under_another_observation_or_module_is_refused(
        opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "a.dat", b"data")
    file_raw_files(opsdb, observation=OBS, module=MODULE, files=[FileSpec("a.dat")])
    start_observation(opsdb, "obs-2")
    rejected(opsdb, r"'a\.dat' is already filed under observation 'obs-1', module primecam/f280",
             observation="obs-2", files=[FileSpec("a.dat")])
    rejected(opsdb, r"'a\.dat' is already filed under observation 'obs-1', module primecam/f280",
             module="chai/lfa", files=[FileSpec("a.dat")])


def test_all_or_nothing(opsdb: OpsDB, root: Path, obs: str) -> None:
    write(root / "good.dat", b"good")
    write(root / "bad.dat", b"bad")
    message = rejected(opsdb, r"2 of 3 files rejected, nothing was filed",
                       files=[FileSpec("good.dat"), FileSpec("bad.dat", size=99),
                              FileSpec("missing.dat")])
    assert "size mismatch for 'bad.dat'" in message and "'missing.dat' does not exist" in message
    rejected(opsdb, r"size mismatch for 'bad\.dat'.*; nothing was filed",
             files=[FileSpec("good.dat"), FileSpec("bad.dat", size=99)])
    # A conflict only found against OpsDB also rolls back the good file of the batch.
    write(root / "taken.dat", b"taken")
    file_raw_files(opsdb, observation=OBS, module=MODULE, files=[FileSpec("taken.dat")])
    write(root / "taken.dat", b"TAKEN")
    rejected(opsdb, r"'taken\.dat' is already filed with checksum",
             files=[FileSpec("good.dat"), FileSpec("taken.dat")])
    assert [f.relative_path for f in files_in(opsdb)] == ["taken.dat"]


# --- observations --------------------------------------------------------------------------------

def test_start_is_idempotent_while_open(opsdb: OpsDB) -> None:
    uuid = start_observation(opsdb, "obs.2024-01_a")
    assert start_observation(opsdb, "obs.2024-01_a") == uuid
    with opsdb.session() as session:
        row = session.scalars(select(ExecutedObsUnit)).one()
        assert (row.uuid, row.status, row.finished_at) == (uuid, ObservationStatus.OPEN, None)


@pytest.mark.parametrize("name", ["", "-x", ".x", "a b", "a/b", "x" * 129, "obs\n", "ö"])
def test_invalid_observation_name(opsdb: OpsDB, name: str) -> None:
    rejected(opsdb, "invalid observation name", call=lambda db, **_: start_observation(db, name))


def test_finish(opsdb: OpsDB) -> None:
    start_observation(opsdb, OBS)
    finish_observation(opsdb, OBS)
    with opsdb.session() as session:
        row = session.scalars(select(ExecutedObsUnit)).one()
        assert row.status == ObservationStatus.FINISHED and row.finished_at is not None
    before = snapshot(opsdb)
    finish_observation(opsdb, OBS)  # twice: no-op, finished_at kept
    assert snapshot(opsdb) == before
    rejected(opsdb, r"observation 'obs-1' already finished at .*use a new name",
             call=lambda db, **_: start_observation(db, OBS))
    rejected(opsdb, r"observation 'nope' is unknown; nothing to finish",
             call=lambda db, **_: finish_observation(db, "nope"))


def test_missing_source_root(opsdb: OpsDB, config: Config, obs: str) -> None:
    config.resolve_root("sites/ccat/instruments").rename(config.directory / "unmounted")
    rejected(opsdb, r"root .*instruments of source location ccat/instruments is missing",
             files=[FileSpec("a.dat")])
