"""The location marker: the file `ccat-dt init` writes at every location root.

An unmounted disk's empty mount point has none, so nothing is written, counted or deleted
there; and the marker is never raw data to file, package or purge. Kept apart from storage.py
(which pulls in the ssh transports) so that filing stays light."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

MARKER = ".ccat-dt-location"
MARKER_TEXT = "ccat-dt location root: written by `ccat-dt init`; do not delete\n"


def write_marker(root: Path) -> None:
    """Mark a location root as the one configured (done by `ccat-dt init` on a mounted disk)."""
    marker = root / MARKER
    if not marker.exists():
        marker.write_text(MARKER_TEXT, encoding="utf-8")


def root_problem(root: Path) -> str | None:
    """Why `root` cannot be trusted as the configured location root, or None."""
    if not root.is_dir():
        return f"location root {root} does not exist (is the disk mounted?)"
    if not (root / MARKER).is_file():
        return (f"location root {root} has no {MARKER} marker: not the disk `ccat-dt init` "
                "prepared (is it mounted?); run `ccat-dt init` once the right disk is there")
    return None


def is_marker(relative_path: str) -> bool:
    """Whether a path relative to a location root names the root's marker."""
    return PurePosixPath(relative_path).parts == (MARKER,)
