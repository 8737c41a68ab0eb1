"""The location marker: the file `ccat-dt init` writes at every location root.

An unmounted disk's empty mount point has none, so nothing is written, counted or deleted
there; and the marker is never raw data to file, package or purge. Kept apart from storage.py
(which pulls in the ssh transports) so that filing stays light."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

MARKER = ".ccat-dt-location"
MARKER_TEXT = "ccat-dt location root: written by `ccat-dt init`; do not delete\n"


LABEL = "location: "


def marked_label(root: Path) -> str | None:
    """The location (SITE/NAME) a root's marker was written for; None: no marker, or one
    written before markers named their location."""
    try:
        return label_in((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def label_in(text: str) -> str | None:
    """The location a marker's text names (read from a disk, over ssh or from a bucket);
    None: a marker written before markers named their location."""
    return next((line[len(LABEL):].strip() for line in text.splitlines()
                 if line.startswith(LABEL)), None)


def marker_text(label: str | None) -> str:
    """What a marker of location `label` holds."""
    return MARKER_TEXT + (f"{LABEL}{label}\n" if label else "")


def write_marker(root: Path, label: str | None = None) -> None:
    """Mark a location root as the one configured (done by `ccat-dt init` on a mounted disk),
    naming the location it belongs to (an older marker without a name gets it; one naming a
    location no longer configured, a site renamed, gets the new name: `init` and `migrate`
    refuse a root marked for another configured location before they get here)."""
    marker = root / MARKER
    if not marker.exists() or (label is not None and marked_label(root) != label):
        marker.write_text(marker_text(label), encoding="utf-8")


def root_problem(root: Path, label: str | None = None) -> str | None:
    """Why `root` cannot be trusted as the configured location root (of location `label`,
    when given), or None."""
    if not root.is_dir():
        return f"location root {root} does not exist (is the disk mounted?)"
    if not (root / MARKER).is_file():
        return (f"location root {root} has no {MARKER} marker: not the disk `ccat-dt init` "
                "prepared (is it mounted?); run `ccat-dt init` once the right disk is there")
    return marked_for_another(root, label) if label is not None else None


def marked_for_another(root: Path, label: str) -> str | None:
    """Why `root`, configured for location `label`, is another location's disk, or None."""
    return another_location(str(root), label, marked_label(root))


DISKS_SWAPPED = "another location's disk is mounted there (disks swapped?)"


def another_location(where: str, label: str, marked: str | None,
                     why: str = DISKS_SWAPPED) -> str | None:
    """Why the root `where` (a local root, ROOT on HOST, s3://bucket/prefix) of location
    `label`, whose marker names location `marked`, is another location's, or None."""
    if marked is not None and marked != label:
        return f"location root {where} of {label} holds the marker of location {marked}: {why}"
    return None


def is_marker(relative_path: str) -> bool:
    """Whether a path relative to a location root names the root's marker."""
    return PurePosixPath(relative_path).parts == (MARKER,)
