"""The embedded default's transport: a verified, durable copy between local directories."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ccat_dt.checksums import hash_file
from ccat_dt.health import location_failure
from ccat_dt.transports import local
from ccat_dt.transports.base import TransferError
from ccat_dt.transports.local import LocalTransport

SIZE = 3 * 1024 * 1024 + 12345  # several slices below, the last one short


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(local, "SLICE_SIZE", 1024 * 1024)
    path = tmp_path / "src" / "package.tar"
    path.parent.mkdir()
    path.write_bytes(os.urandom(SIZE))
    return path


def test_copy_in_slices_lands_every_byte_and_reports_what_landed(
        source: Path, tmp_path: Path) -> None:
    expected, _ = hash_file(source)
    destination = tmp_path / "lta" / "obs" / "package.tar"

    result = LocalTransport().copy_file(source, destination, expected)

    assert destination.read_bytes() == source.read_bytes()
    assert (result.bytes, result.checksum) == (SIZE, expected)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["package.tar"]


def test_file_systems_that_refuse_kernel_copies_get_a_plain_copy(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(local.os, "copy_file_range", refuse)
    expected, _ = hash_file(source)
    destination = tmp_path / "other-fs" / "package.tar"

    result = LocalTransport().copy_file(source, destination, expected)

    assert destination.read_bytes() == source.read_bytes()
    assert result.checksum == expected


def test_a_slice_damaged_after_landing_is_caught_and_never_renamed(
        source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slices: list[int] = []

    def damage_second_slice(self: LocalTransport, temporary: Path) -> None:
        slices.append(temporary.stat().st_size)
        if len(slices) == 2:
            with open(temporary, "r+b") as stream:
                stream.seek(local.SLICE_SIZE + 7)
                byte = stream.read(1)
                stream.seek(local.SLICE_SIZE + 7)
                stream.write(bytes([byte[0] ^ 0x01]))

    monkeypatch.setattr(LocalTransport, "_landed", damage_second_slice)
    expected, _ = hash_file(source)
    destination = tmp_path / "lta" / "package.tar"

    with pytest.raises(TransferError, match="checksum mismatch on arrival") as caught:
        LocalTransport().copy_file(source, destination, expected)

    assert caught.value.retryable
    assert len(slices) == 4  # every slice was handed over, and read back, one at a time
    assert list(destination.parent.iterdir()) == []  # no final file, no temporary left


@pytest.mark.parametrize("depth", ["directory", "above"])
def test_a_file_where_the_packages_directory_should_be_is_named_and_not_retried(
        source: Path, tmp_path: Path, depth: str) -> None:
    """A regular file where the package's directory (or one above it) should be: the copy
    fails naming it, not retried within the run, not the location's failure (other packages
    still go there), nothing written, the file left as it is. Before: "[Errno 17] File exists"
    (or "[Errno 20] Not a directory"), retryable, a location failure."""
    expected, _ = hash_file(source)
    root = tmp_path / "lta"
    root.mkdir()
    blocker = root / "obs"
    blocker.write_bytes(b"a file, not a directory")
    destination = blocker / ("package.tar" if depth == "directory" else "sub/package.tar")

    with pytest.raises(TransferError) as caught:
        LocalTransport().copy_file(source, destination, expected)

    message = str(caught.value)
    assert not caught.value.retryable, message
    assert f"{blocker} is not a directory (a file is there): move it away" in message, message
    assert not location_failure(caught.value), message
    assert blocker.read_bytes() == b"a file, not a directory"
    assert [p.name for p in root.iterdir()] == ["obs"]
