"""Filing: instruments declare raw files of an observation; OpsDB records them at the source.

Filing is how bytes enter the system, so it is strict: every file of a call is checked (path
inside the source root, size, xxh3-128 checksum, no conflicting earlier filing) before anything is
written, and then all rows go in one transaction. Bad input changes nothing, in OpsDB or on disk.
Hashing runs outside any transaction so a large batch never holds the database.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dt.checksums import ALGORITHM, hash_file
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    ExecutedObsUnit,
    InstrumentModule,
    LocationType,
    ObservationStatus,
    RawDataFile,
    RawDataFileCopy,
    utcnow,
)
from ccat_dt.topology import UnknownLocation, get_location, primary_location

OBSERVATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CHECKSUM = re.compile(r"[0-9a-f]{32}")
MAX_LISTED = 20  # problems spelled out in one error; the rest are counted
_IN_CHUNK = 500  # keeps IN (...) lists under SQLite's bound-parameter limit


class FilingError(Exception):
    """Input rejected, nothing filed; the message names the observation, file and problem."""


@dataclass(frozen=True)
class FileSpec:
    """What an instrument declares: a path relative to the source root, optionally size/checksum."""

    path: str
    size: int | None = None
    checksum: str | None = None


@dataclass(frozen=True)
class FilingResult:
    filed: int
    unchanged: int
    bytes: int


@dataclass(frozen=True)
class _Target:
    """Where a call files, resolved once so the slow checks need no open transaction."""

    observation_id: int
    module_id: int
    location_id: int
    label: str
    root: Path  # as configured, for messages
    real_root: Path  # symlinks resolved, for containment checks


@dataclass(frozen=True)
class _Checked:
    spec: FileSpec
    name: str  # normalised posix path relative to the root
    real: Path
    size: int
    checksum: str = ""
    inode: int | None = None  # identity before hashing; a deletion re-hashes if it changes
    mtime_ns: int | None = None


def start_observation(opsdb: OpsDB, name: str) -> str:
    """Open an observation (idempotent while open) and return its uuid."""
    if not OBSERVATION_NAME.fullmatch(name):
        raise FilingError(f"invalid observation name {name!r}: use 1-128 letters, digits, '_', "
                          "'.' or '-', starting with a letter or digit")
    for attempt in (1, 2):  # a concurrent start of the same name fails once, then is found
        try:
            with opsdb.session() as session:
                obs = session.scalar(select(ExecutedObsUnit).where(ExecutedObsUnit.name == name))
                if obs is None:
                    obs = ExecutedObsUnit(name=name)
                    session.add(obs)
                    session.flush()
                elif obs.status != ObservationStatus.OPEN:
                    raise FilingError(f"observation '{name}' already finished at "
                                      f"{obs.finished_at}; it cannot be restarted, use a new name")
                return obs.uuid
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def finish_observation(opsdb: OpsDB, name: str) -> None:
    """Close an observation so no more files can be filed against it (idempotent)."""
    with opsdb.session() as session:
        obs = session.scalar(select(ExecutedObsUnit).where(ExecutedObsUnit.name == name))
        if obs is None:
            raise FilingError(f"observation '{name}' is unknown; nothing to finish")
        if obs.status == ObservationStatus.OPEN:
            obs.status, obs.finished_at = ObservationStatus.FINISHED, utcnow()


def file_raw_files(opsdb: OpsDB, *, observation: str, module: str, files: Sequence[FileSpec],
                   site: str | None = None, location: str | None = None) -> FilingResult:
    """Check every file, then record all new ones (file row + verified source copy) at once."""
    prefix = f"observation '{observation}'"
    with opsdb.session() as session:
        target = _resolve(session, observation, module, site, location)
    checked: list[_Checked] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for spec in files:
        found = _inspect(spec, target)
        if isinstance(found, str):
            problems.append(found)
        elif found.name in seen:
            problems.append(f"path '{found.name}' is listed twice (as '{seen[found.name]}' and "
                            f"'{spec.path}')")
        else:
            seen[found.name] = spec.path
            checked.append(found)
    _raise_if(problems, prefix, len(files))
    hashed = [_hash(item) for item in checked]  # only once every cheap check has passed
    _raise_if([h for h in hashed if isinstance(h, str)], prefix, len(files))
    return _record(opsdb, target, [h for h in hashed if not isinstance(h, str)], prefix)


def file_directory(opsdb: OpsDB, *, observation: str, module: str, directory: str,
                   site: str | None = None, location: str | None = None) -> FilingResult:
    """File every regular file below a source directory (symlinks are not followed)."""
    prefix = f"observation '{observation}'"
    with opsdb.session() as session:
        target = _resolve(session, observation, module, site, location)
    rel = PurePosixPath(directory)
    base = (target.root / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not base.is_relative_to(target.real_root):
        raise FilingError(f"{prefix}: directory '{directory}' is outside source location "
                          f"{target.label} (root {target.root})")
    if not base.is_dir():
        raise FilingError(f"{prefix}: directory '{directory}' does not exist under {target.root}")
    specs = []
    for dirpath, _dirs, names in os.walk(base):
        for entry in names:
            path = Path(dirpath, entry)
            if not path.is_symlink() and path.is_file():
                specs.append(FileSpec(path.relative_to(target.real_root).as_posix()))
    return file_raw_files(opsdb, observation=observation, module=module, site=site,
                          location=location, files=sorted(specs, key=lambda s: s.path))


def read_manifest_file(path: Path) -> list[FileSpec]:
    """Parse an instrument manifest: JSON lines, or one JSON list, of {path, size?, checksum?}."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FilingError(f"manifest {path}: cannot read it: {exc}") from None
    if text.lstrip().startswith("["):
        entries = [(f"entry {i}", item) for i, item in enumerate(_json(path, text), 1)]
    else:
        entries = [(f"line {number}", _json(path, line, number))
                   for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [_spec(path, where, item) for where, item in entries]


def _json(manifest: Path, text: str, line: int | None = None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FilingError(f"manifest {manifest}, line {line or exc.lineno}: not valid JSON: "
                          f"{exc.msg}") from None


def _spec(manifest: Path, where: str, item: object) -> FileSpec:
    def bad(why: str) -> FilingError:
        return FilingError(f"manifest {manifest}, {where}: {why}")
    if not isinstance(item, dict):
        raise bad('expected an object like {"path": ..., "size": ..., "checksum": ...}')
    unknown = sorted(set(item) - {"path", "size", "checksum"})
    if unknown:
        raise bad(f"unknown key(s) {unknown}; allowed: path, size, checksum")
    path, size, checksum = item.get("path"), item.get("size"), item.get("checksum")
    if not isinstance(path, str) or not path:
        raise bad("'path' must be a non-empty string")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise bad(f"'size' of '{path}' must be a non-negative integer, not {size!r}")
    if checksum is not None and not isinstance(checksum, str):
        raise bad(f"'checksum' of '{path}' must be a string")
    return FileSpec(path, size, checksum)


def _resolve(session: Session, observation: str, module: str, site: str | None,
             location: str | None) -> _Target:
    prefix = f"observation '{observation}'"
    obs = session.scalar(select(ExecutedObsUnit).where(ExecutedObsUnit.name == observation))
    if obs is None:
        raise FilingError(f"{prefix} is unknown; start it first")
    if obs.status != ObservationStatus.OPEN:
        raise FilingError(f"{prefix} finished at {obs.finished_at}; no files can be added to it")
    instrument, _, name = module.partition("/")
    mod = session.scalar(select(InstrumentModule).where(
        InstrumentModule.instrument == instrument, InstrumentModule.name == name))
    if mod is None:
        modules = ", ".join(sorted(m.label for m in session.scalars(select(InstrumentModule))))
        raise FilingError(f"{prefix}: unknown module '{module}'; known modules: {modules}")
    sources = list(session.scalars(
        select(DataLocation).where(DataLocation.location_type == LocationType.SOURCE)
        .order_by(DataLocation.priority.desc(), DataLocation.id)))
    known = ", ".join(loc.label for loc in sources) or "none (is the topology synced?)"
    try:
        if site is None:
            if not sources:
                raise UnknownLocation("OpsDB has no source location")
            site = sources[0].site.short_name
        loc = (get_location(session, site, location) if location is not None
               else primary_location(session, site, LocationType.SOURCE))
    except UnknownLocation as exc:
        raise FilingError(f"{prefix}: {exc}; source locations: {known}") from None
    if loc.location_type != LocationType.SOURCE:
        kind = loc.location_type.value.replace("_", " ")
        raise FilingError(f"{prefix}: location {loc.label} is a {kind}, raw files are filed at "
                          f"a source location ({known})")
    root = Path(loc.root)
    if not root.is_dir():
        raise FilingError(f"{prefix}: root {root} of source location {loc.label} is missing")
    return _Target(obs.id, mod.id, loc.id, loc.label, root, root.resolve())


def _inspect(spec: FileSpec, target: _Target) -> _Checked | str:
    """Check one declared file without reading its bytes; a str is the problem found."""
    rel = PurePosixPath(spec.path)
    if not spec.path.strip() or not rel.parts or "\0" in spec.path:
        return f"path {spec.path!r} is empty or invalid"
    try:
        spec.path.encode("utf-8")
    except UnicodeEncodeError:
        return (f"path {spec.path!r} is not valid UTF-8: rename the file (OpsDB and the package "
                "manifest record names as UTF-8)")
    if "\\" in spec.path:
        return (f"path '{spec.path}' contains a backslash, which a package cannot carry: "
                "rename the file")
    outside = (f"path '{spec.path}' is outside source location {target.label} "
               f"(root {target.root})")
    if rel.is_absolute():
        return (f"path '{spec.path}' is absolute; give it relative to the root of source "
                f"location {target.label} ({target.root})")
    if ".." in rel.parts:
        return outside
    name = rel.as_posix()
    try:
        real = (target.root / name).resolve()
        if not real.is_relative_to(target.real_root):
            return outside
        if real != target.real_root / name:
            # A symlinked directory would let one observation's purge delete another's file
            # (and a symlinked file could be swapped): only real paths below the root are filed.
            return (f"path '{name}' passes through a symlink under {target.root}; file the "
                    f"real path ({real.relative_to(target.real_root)})")
        info = real.stat()
    except FileNotFoundError:
        return f"file '{name}' does not exist under {target.root}"
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
        return f"cannot access '{name}' under {target.root}: {exc}"
    if not stat.S_ISREG(info.st_mode):
        return f"'{name}' is not a regular file"
    if spec.size is not None and spec.size != info.st_size:
        return f"size mismatch for '{name}': declared {spec.size}, on disk {info.st_size}"
    if spec.checksum is not None and not CHECKSUM.fullmatch(spec.checksum.lower()):
        return f"checksum of '{name}' is not 32 hex digits ({ALGORITHM}): {spec.checksum!r}"
    return _Checked(spec, name, real, info.st_size, inode=info.st_ino,
                    mtime_ns=info.st_mtime_ns)


def _hash(item: _Checked) -> _Checked | str:
    try:
        checksum, size = hash_file(item.real)
    except OSError as exc:
        return f"cannot read '{item.name}': {exc}"
    if size != item.size:
        return f"'{item.name}' changed size while being checksummed ({item.size} -> {size} " \
               "bytes); is it still being written?"
    declared = item.spec.checksum
    if declared is not None and declared.lower() != checksum:
        return f"checksum mismatch for '{item.name}': declared {declared}, computed {checksum}"
    try:
        after = item.real.stat()
    except OSError as exc:
        return f"cannot stat '{item.name}' after checksumming it: {exc}"
    if (after.st_ino, after.st_mtime_ns) != (item.inode, item.mtime_ns):
        return f"'{item.name}' changed while being checksummed; is it still being written?"
    return _Checked(item.spec, item.name, item.real, size, checksum, item.inode, item.mtime_ns)


def _record(opsdb: OpsDB, target: _Target, items: list[_Checked], prefix: str) -> FilingResult:
    """Compare with earlier filings and insert the new files, all in one transaction."""
    with opsdb.session() as session:
        obs = session.get(ExecutedObsUnit, target.observation_id)
        if obs is None or obs.status != ObservationStatus.OPEN:
            raise FilingError(f"{prefix} was finished while its files were being checked; "
                              "nothing was filed")
        names = [item.name for item in items]
        existing: dict[str, RawDataFile] = {}
        for start in range(0, len(names), _IN_CHUNK):
            chunk = names[start:start + _IN_CHUNK]
            existing.update((row.relative_path, row) for row in session.scalars(select(RawDataFile)
                            .where(RawDataFile.source_location_id == target.location_id,
                                   RawDataFile.relative_path.in_(chunk))))
        problems: list[str] = []
        new: list[_Checked] = []
        for item in items:
            row = existing.get(item.name)
            if row is None:
                new.append(item)
            elif (row.observation_id, row.module_id) != (target.observation_id, target.module_id):
                problems.append(f"'{item.name}' is already filed under observation "
                                f"'{row.observation.name}', module {row.module.label}")
            elif row.checksum != item.checksum:
                problems.append(f"'{item.name}' is already filed with checksum {row.checksum}; "
                                f"refusing to re-file it with checksum {item.checksum}")
            elif row.size != item.size:
                problems.append(f"'{item.name}' is already filed with size {row.size}; "
                                f"refusing to re-file it with size {item.size}")
        _raise_if(problems, prefix, len(items))
        now = utcnow()  # the checksum was just computed at the source: the copy is verified
        for item in new:
            raw = RawDataFile(source_location_id=target.location_id, relative_path=item.name,
                              size=item.size, checksum_algorithm=ALGORITHM,
                              checksum=item.checksum, observation_id=target.observation_id,
                              module_id=target.module_id, filed_at=now)
            session.add(raw)
            session.add(RawDataFileCopy(
                location_id=target.location_id, relative_path=item.name, size=item.size,
                checksum=item.checksum, status=CopyStatus.PRESENT, created_at=now,
                verified_at=now, raw_data_file=raw, inode=item.inode, mtime_ns=item.mtime_ns))
        try:
            session.flush()
        except IntegrityError:
            raise FilingError(f"{prefix}: some of these files were filed concurrently by "
                              "another process; nothing was filed, retry") from None
    return FilingResult(filed=len(new), unchanged=len(items) - len(new),
                        bytes=sum(item.size for item in new))


def _raise_if(problems: list[str], prefix: str, total: int) -> None:
    """One error for the whole batch, so an instrument can fix everything in one go."""
    if len(problems) == 1:
        raise FilingError(f"{prefix}: {problems[0]}; nothing was filed")
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = (f"\n  ... and {len(problems) - MAX_LISTED} more"
                if len(problems) > MAX_LISTED else "")
        raise FilingError(f"{prefix}: {len(problems)} of {total} files rejected, nothing was "
                          f"filed:\n  {listed}{more}")
