from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import tarfile
import zlib
from collections import Counter
from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest

from ccat_dt import tarball
from ccat_dt.checksums import CHUNK_SIZE, ChecksumMismatch, hash_file
from ccat_dt.tarball import (
    MANIFEST_NAME,
    PackageMember,
    PackagingError,
    build_package,
    extract_package,
    read_manifest,
    split_into_packages,
)
from ccat_dt.transports.base import Identity

TREE = {
    "a/b/c.dat": 1234,
    "a/b/d.dat": 5000,
    "a/empty.dat": 0,
    "top.dat": 777,
    "big/large.dat": CHUNK_SIZE + 4321,  # crosses a read-chunk boundary
}


def make_tree(root: Path, sizes: dict[str, int] = TREE) -> list[PackageMember]:
    members = []
    for arcname, size in sizes.items():
        path = root / arcname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        members.append(PackageMember(path, arcname, size, hash_file(path)[0]))
    return members


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_round_trip_restores_tree_and_reports_tar_checksums(tmp_path: Path) -> None:
    members = make_tree(tmp_path / "src")
    tar_path = tmp_path / "out" / "pkg-0001.tar"

    built = build_package(members, tar_path, package_name="pkg-0001")

    tar_bytes = tar_path.read_bytes()
    assert built.path == tar_path
    assert built.size == len(tar_bytes)
    assert built.checksum == hash_file(tar_path)[0]
    assert built.adler32 == f"{zlib.adler32(tar_bytes):08x}"
    assert {e.path: (e.size, e.checksum) for e in built.manifest} == {
        m.arcname: (m.size, hash_file(m.source)[0]) for m in members
    }
    assert read_manifest(tar_path) == sorted(built.manifest, key=lambda e: e.path)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    assert names == sorted(TREE) + [MANIFEST_NAME]
    assert files_under(tmp_path / "out") == {"pkg-0001.tar"}

    restored = tmp_path / "restored"
    manifest = extract_package(tar_path, restored)

    assert manifest == read_manifest(tar_path)
    assert files_under(restored) == set(TREE)
    for m in members:
        assert (restored / m.arcname).read_bytes() == m.source.read_bytes()


class _CountingFile:
    def __init__(self, raw: Any, record: Counter[str], key: str) -> None:
        self._raw, self._record, self._key = raw, record, key

    def read(self, *args: Any) -> Any:
        data = self._raw.read(*args)
        self._record[self._key] += len(data)
        return data

    def readinto(self, buffer: Any) -> Any:
        n = self._raw.readinto(buffer)
        self._record[self._key] += n or 0
        return n

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def test_each_source_is_read_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = make_tree(tmp_path / "src")
    sources = {str(m.source.resolve()) for m in members}
    opens: Counter[str] = Counter()
    bytes_read: Counter[str] = Counter()
    real_open, real_os_open = builtins.open, os.open
    opened: dict[int, str] = {}  # descriptor -> the path os.open opened it at

    def recording_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_os_open(path, flags, *args, **kwargs)
        opened[fd] = os.path.realpath(path) if "dir_fd" not in kwargs else ""
        return fd

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        key = (opened.pop(file, "") if isinstance(file, int)
               else os.path.realpath(file) if isinstance(file, str | os.PathLike) else "")
        if key in sources:
            opens[key] += 1
            return _CountingFile(handle, bytes_read, key)
        return handle

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # Path.open / read_bytes go through io.open
    monkeypatch.setattr(os, "open", recording_os_open)  # a source opened as a descriptor
    build_package(members, tmp_path / "pkg.tar", package_name="pkg")
    monkeypatch.undo()

    assert opens == Counter(sources)
    assert bytes_read == Counter({str(m.source.resolve()): m.size for m in members if m.size})


def test_the_tar_is_read_back_once_as_it_lies_in_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build's read-back is the tar's verification (its check reports it): every byte of
    the file, read once, slice by slice while it is written."""
    monkeypatch.setattr(tarball, "READ_BACK_SLICE", 4096)
    read_back: list[tuple[int, int]] = []
    real = os.preadv

    def counted(fd: int, buffers: list[bytearray], offset: int) -> int:
        count = real(fd, buffers, offset)
        read_back.append((offset, count))
        return count

    monkeypatch.setattr(os, "preadv", counted)
    built = build_package(make_tree(tmp_path / "src"), tmp_path / "pkg.tar", package_name="pkg")
    monkeypatch.undo()

    ranges = [(offset, count) for offset, count in read_back if count]
    assert len(ranges) > 2  # read while written, not only at the end
    assert [offset for offset, _ in ranges] == [0, *accumulate(c for _, c in ranges)][:-1]
    assert sum(count for _, count in ranges) == built.size == (tmp_path / "pkg.tar").stat().st_size
    assert hash_file(tmp_path / "pkg.tar")[0] == built.checksum


@pytest.mark.parametrize("damage", ["flipped", "appended"])
def test_a_tar_that_does_not_read_back_as_written_is_never_renamed_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    """A disk that does not keep what was written (a flipped bit, bytes another writer put past
    the end): the build fails with EIO, retryably, its part file removed, the destination as
    it was."""
    members = make_tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    destination = out / "pkg.tar"
    destination.write_bytes(b"previous package")
    part = out / ".pkg.tar.part"
    monkeypatch.setattr(tarball, "READ_BACK_SLICE", 4096)
    real = tarball._TarWriter.read_back
    calls = []

    def damaged(self: tarball._TarWriter) -> None:
        calls.append(self.size)
        if len(calls) == 2:
            with open(part, "r+b") as landed:
                if damage == "flipped":  # in the slice about to be read back
                    landed.seek(self.landed.size + 100)
                    byte = landed.read(1)
                    landed.seek(self.landed.size + 100)
                    landed.write(bytes([byte[0] ^ 1]))
                else:
                    landed.seek(0, os.SEEK_END)
                    landed.write(b"x" * 512)
        real(self)

    monkeypatch.setattr(tarball._TarWriter, "read_back", damaged)
    with pytest.raises(OSError) as info:
        build_package(members, destination, package_name="pkg")

    assert info.value.errno == errno.EIO
    assert "checksum mismatch on read-back" in str(info.value)
    assert destination.read_bytes() == b"previous package"
    assert files_under(out) == {"pkg.tar"}


def test_wrong_filed_checksum_fails_and_leaves_destination_untouched(tmp_path: Path) -> None:
    members = make_tree(tmp_path / "src", {"a/x.dat": 100, "b/y.dat": 200, "c/z.dat": 300})
    bad = members[1]
    members[1] = PackageMember(bad.source, bad.arcname, bad.size, "0" * 32)
    out = tmp_path / "out"
    out.mkdir()
    destination = out / "pkg.tar"
    destination.write_bytes(b"previous package")

    with pytest.raises(ChecksumMismatch) as info:
        build_package(members, destination, package_name="pkg")

    assert info.value.path == str(bad.source)
    assert info.value.actual == bad.checksum
    assert destination.read_bytes() == b"previous package"
    assert files_under(out) == {"pkg.tar"}


@pytest.mark.parametrize("what", ["directory", "symlink"])
def test_a_directory_or_symlink_at_the_packages_path_is_named_and_left_alone(
        tmp_path: Path, what: str) -> None:
    """Not a raw IsADirectoryError: the same "move it away" error as for foreign bytes, which
    the packaging step does not retry within its run."""
    members = make_tree(tmp_path / "src", {"a/x.dat": 100})
    out = tmp_path / "out"
    out.mkdir()
    destination = out / "pkg.tar"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    destination.mkdir() if what == "directory" else destination.symlink_to(elsewhere)

    with pytest.raises(FileExistsError, match="does not record there .not a regular file"):
        build_package(members, destination, package_name="pkg")
    assert destination.is_dir() and list(destination.iterdir()) == []
    assert files_under(out) == set()  # no scratch left either


def test_a_build_never_renames_its_tar_over_other_bytes_and_keeps_the_same_bytes(
        tmp_path: Path) -> None:
    """Another file at the package's path is left as it is (FileExistsError naming it); the
    same bytes there (an earlier build whose recording was cut short, a concurrent one) are
    kept as the build, untouched; only a rebuild replaces, and only the quarantined tar it
    found there (`replaces`), still there at the moment of the rename."""
    members = make_tree(tmp_path / "src", {"a/x.dat": 100, "b/y.dat": 200})
    out = tmp_path / "out"
    out.mkdir()
    destination = out / "pkg.tar"
    destination.write_bytes(b"someone else's tar")

    with pytest.raises(FileExistsError, match="does not record there"):
        build_package(members, destination, package_name="pkg")
    assert destination.read_bytes() == b"someone else's tar"
    assert files_under(out) == {"pkg.tar"}

    quarantined = Identity.of(destination.stat())
    (out / "other").write_bytes(b"a file put there since")
    (out / "other").rename(destination)
    with pytest.raises(FileExistsError):
        build_package(members, destination, package_name="pkg", replaces=quarantined)
    assert destination.read_bytes() == b"a file put there since"

    replaced = build_package(members, destination, package_name="pkg",
                             replaces=Identity.of(destination.stat()))
    assert hash_file(destination)[0] == replaced.checksum
    inode = destination.stat().st_ino
    again = build_package(members, destination, package_name="pkg")
    assert again.checksum == replaced.checksum and again.manifest == replaced.manifest
    assert destination.stat().st_ino == inode  # the file there was kept, not replaced
    assert files_under(out) == {"pkg.tar"}


@pytest.mark.parametrize("problem", ["size", "missing", "directory"])
def test_bad_source_raises_packaging_error_and_leaves_nothing(tmp_path: Path, problem: str) -> None:
    members = make_tree(tmp_path / "src", {"a.dat": 10, "b.dat": 20})
    src = members[1].source
    if problem == "size":
        members[1] = PackageMember(src, "b.dat", 21, members[1].checksum)
    elif problem == "missing":
        src.unlink()
    else:
        src.unlink()
        src.mkdir()
    out = tmp_path / "out"

    with pytest.raises(PackagingError, match=str(src)) as info:
        build_package(members, out / "pkg.tar", package_name="pkg")

    if problem == "size":
        assert "20" in str(info.value) and "21" in str(info.value)
    assert not out.exists() or files_under(out) == set()


def test_corrupted_tar_data_is_detected_on_extract(tmp_path: Path) -> None:
    members = make_tree(tmp_path / "src", {"a/b/c.dat": 5000, "top.dat": 3000})
    tar_path = tmp_path / "pkg.tar"
    build_package(members, tar_path, package_name="pkg")
    with tarfile.open(tar_path) as tar:
        offset = tar.getmember("a/b/c.dat").offset_data + 1234
    with open(tar_path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(ChecksumMismatch) as info:
        extract_package(tar_path, tmp_path / "restored")

    assert info.value.path == str(tmp_path / "restored" / "a/b/c.dat")


def test_extract_rejects_member_not_in_manifest(tmp_path: Path) -> None:
    members = make_tree(tmp_path / "src", {"a.dat": 10})
    tar_path = tmp_path / "pkg.tar"
    build_package(members, tar_path, package_name="pkg")
    smuggled = tmp_path / "evil.dat"
    smuggled.write_bytes(b"not archived data")
    with tarfile.open(tar_path, "a") as tar:
        tar.add(smuggled, arcname="evil.dat")

    with pytest.raises(PackagingError, match="evil.dat"):
        extract_package(tar_path, tmp_path / "restored")
    assert not (tmp_path / "restored" / "evil.dat").exists()


def test_read_manifest_of_tar_without_manifest_fails(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        tar.addfile(tarfile.TarInfo("x.dat"), io.BytesIO(b""))
    with pytest.raises(PackagingError, match="plain.tar"):
        read_manifest(plain)


def _m(arcname: str, size: int) -> PackageMember:
    return PackageMember(Path("/data") / arcname, arcname, size, "0" * 32)


def test_split_into_packages_respects_limit_and_keeps_every_member_once() -> None:
    members = [_m("e", 4), _m("a", 3), _m("d", 25), _m("b", 5), _m("c", 2), _m("f", 0)]

    groups = split_into_packages(members, 10)

    assert [[m.arcname for m in g] for g in groups] == [["a", "b", "c"], ["d"], ["e", "f"]]
    assert split_into_packages(list(reversed(members)), 10) == groups
    flat = [m for g in groups for m in g]
    assert sorted(flat, key=lambda m: m.arcname) == sorted(members, key=lambda m: m.arcname)
    assert len(flat) == len(members)
    for g in groups:
        assert len(g) == 1 or sum(m.size for m in g) <= 10
    assert split_into_packages([], 10) == []
    with pytest.raises(ValueError):
        split_into_packages(members, 0)


@pytest.mark.parametrize(
    "arcname", ["", "/etc/passwd", "../escape.dat", "a/../../b", "./a.dat", "a//b", MANIFEST_NAME]
)
def test_unsafe_arcnames_are_rejected(tmp_path: Path, arcname: str) -> None:
    (member,) = make_tree(tmp_path / "src", {"a.dat": 10})
    bad = PackageMember(member.source, arcname, member.size, member.checksum)
    out = tmp_path / "out"

    with pytest.raises(PackagingError):
        build_package([bad], out / "pkg.tar", package_name="pkg")
    assert not out.exists()


def test_duplicate_arcnames_are_rejected(tmp_path: Path) -> None:
    (member,) = make_tree(tmp_path / "src", {"a.dat": 10})
    with pytest.raises(PackagingError, match="duplicate"):
        build_package([member, member], tmp_path / "pkg.tar", package_name="pkg")


def test_gnu_tar_restores_a_package_without_warnings(tmp_path: Path) -> None:
    """Operators restore packages with plain `tar -xf`, not only with ccat-dt."""
    members = make_tree(tmp_path / "src")
    tar_path = tmp_path / "pkg.tar"
    build_package(members, tar_path, package_name="pkg")
    restored = tmp_path / "restored"
    restored.mkdir()

    done = subprocess.run(["tar", "-xf", str(tar_path), "-C", str(restored)],
                          capture_output=True, text=True, check=False)

    assert (done.returncode, done.stderr) == (0, "")
    assert files_under(restored) == set(TREE) | {MANIFEST_NAME}
    for m in members:
        assert (restored / m.arcname).read_bytes() == m.source.read_bytes()
    assert tar_path.stat().st_size % tarfile.RECORDSIZE == 0
