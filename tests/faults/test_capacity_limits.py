"""Destinations that refuse for a capacity reason other than plain full bytes, each on a real
limit: here, a raw file larger than the ustar format holds (8 GiB) packaged and unpacked again,
and a path longer than ustar's name field."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from ccat_dt.checksums import hash_file
from ccat_dt.tarball import MANIFEST_NAME, PackageMember, build_package, extract_package
from tests.services import unavailable

KB = 1024
GIB = 1 << 30


# -- members the ustar format cannot hold --------------------------------------------------

USTAR_MAX_SIZE = 8**11 - 1  # 11 octal digits: 8 GiB - 1 byte
BIG = 9 * GIB


def _sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes a few MiB of disk: random MiB at its start, across
    the ustar limit and at its end, holes between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.truncate(size)
        for offset in (0, USTAR_MAX_SIZE - KB * KB // 2, size - KB * KB):
            out.seek(offset)
            out.write(os.urandom(KB * KB))


def test_a_raw_file_over_8_gib_and_a_long_name_are_packaged_and_unpacked_byte_exact(
        tmp_path: Path) -> None:
    """A 9 GiB raw file (sparse here: only the packaging and the unpacking run at that size) is
    written with a pax size record, read back by ccat-dt's staging and by GNU tar with its
    size, and unpacked byte for byte; so is a file whose path is longer than ustar's 100-byte
    name field."""
    free = shutil.disk_usage(tmp_path).free
    if free < 2 * BIG + GIB:  # the tar, and the file unpacked from it
        unavailable("disk space", f"{free // GIB} GiB free at {tmp_path}, the test writes "
                    f"{2 * BIG // GIB} GiB")
    source, tar_path, unpacked = tmp_path / "src", tmp_path / "pkg.tar", tmp_path / "staged"
    huge, long_name = "obs-0/primecam/f280/huge.dat", f"obs-0/primecam/f280/{'d' * 90}/" \
        f"{'n' * 120}.dat"
    assert len(long_name.encode()) > 100
    _sparse(source / huge, BIG)
    (source / long_name).parent.mkdir(parents=True)
    (source / long_name).write_bytes(os.urandom(5000))
    members = [PackageMember(source / name, name, (source / name).stat().st_size,
                             hash_file(source / name)[0]) for name in (huge, long_name)]
    try:
        built = build_package(members, tar_path, package_name="pkg")

        assert built.size > BIG
        with tarfile.open(tar_path) as tar:
            found = {m.name: m for m in tar.getmembers()}
        assert set(found) == {huge, long_name, MANIFEST_NAME}
        assert found[huge].size == BIG and found[huge].pax_headers["size"] == str(BIG)
        assert found[long_name].pax_headers["path"] == long_name
        listing = subprocess.run(["tar", "-tvf", str(tar_path)], capture_output=True,
                                 text=True, check=False)
        assert (listing.returncode, listing.stderr) == (0, "")
        sizes = {line.split()[-1]: int(line.split()[2]) for line in listing.stdout.splitlines()}
        assert sizes[huge] == BIG and sizes[long_name] == 5000

        manifest = extract_package(tar_path, unpacked)  # what staging unpacks with

        assert sorted((e.path, e.size, e.checksum) for e in manifest) == sorted(
            (m.arcname, m.size, m.checksum) for m in members)
        for member in members:  # byte for byte, read on the disk
            assert hash_file(unpacked / member.arcname) == (member.checksum, member.size)
    finally:
        tar_path.unlink(missing_ok=True)
        shutil.rmtree(unpacked, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
