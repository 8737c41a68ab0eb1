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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import ColumnElement, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dt.checksums import ALGORITHM, hash_file
from ccat_dt.config import Config
from ccat_dt.marker import is_marker
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
    new_uuid,
    utcnow,
)
from ccat_dt.topology import UnknownLocation, get_location, primary_location
from ccat_dt.transports.base import DENIED_ERRNO, local_user, refusal_here

OBSERVATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CHECKSUM = re.compile(r"[0-9a-f]{32}")
# Longest path filed, in UTF-8 bytes below the source root. A staged file lives at
# PROCESSING_ROOT/REQUEST/.ccat-dt-staging.PACKAGE/PATH while it is verified: within Linux's
# 4096-byte PATH_MAX for a processing root of up to ~780 bytes. A longer path is archived
# fine but could never be staged.
MAX_PATH_BYTES = 3072
MAX_LISTED = 20  # problems spelled out in one error; the rest are counted
_IN_CHUNK = 500  # keeps IN (...) lists under SQLite's bound-parameter limit


Hook = Callable[[Session], None]  # runs inside the filing transaction (the service's marker)


class FilingError(Exception):
    """Input rejected, nothing filed; the message names the observation, file and problem.

    `fields` names the offending input for an HTTP answer (`module`, `files[3].checksum`);
    `conflict` is true when the input is well-formed but clashes with what OpsDB holds."""

    def __init__(self, message: str, fields: Sequence[tuple[str, str]] = (),
                 conflict: bool = False) -> None:
        super().__init__(message)
        self.fields = list(fields)
        self.conflict = conflict


class _Clash(FilingError):
    """Rows another transaction inserted at the same moment (the unique path or uuid)."""


@dataclass(frozen=True)
class FileSpec:
    """What an instrument declares: a path relative to the source root, optionally size/checksum
    (and, through the filing service, the uuid the new OpsDB row gets)."""

    path: str
    size: int | None = None
    checksum: str | None = None
    uuid: str | None = None


@dataclass(frozen=True)
class FilingResult:
    filed: int
    unchanged: int
    bytes: int
    uuids: dict[str, str] = field(default_factory=dict, compare=False)  # path -> file uuid
    # Entries `file --directory` passed over: symlinks (never followed), FIFOs, sockets.
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """A source location's root, enough to check files without OpsDB (the filing service
    builds it from the configuration while the link is down)."""

    label: str
    root: Path  # as configured, for messages
    real_root: Path  # symlinks resolved, for containment checks


@dataclass(frozen=True)
class _Target(Source):
    """Where a call files, resolved once so the slow checks need no open transaction."""

    observation_id: int = 0
    module_id: int = 0
    location_id: int = 0


@dataclass(frozen=True)
class _Problem:
    field: str  # path, size or checksum
    message: str


@dataclass(frozen=True)
class _Checked:
    spec: FileSpec
    name: str  # normalised posix path relative to the root
    real: Path
    size: int
    checksum: str = ""
    index: int = 0  # position in the caller's list, for field names
    inode: int | None = None  # identity before hashing; a deletion re-hashes if it changes
    mtime_ns: int | None = None


@dataclass(frozen=True)
class CheckedFile:
    """A file that passed every check: its normalised path, size and computed checksum."""

    path: str
    size: int
    checksum: str
    uuid: str | None = None
    # What the file was when hashed (st_ino, st_mtime_ns); not journaled. Recording keeps it
    # only if the file still is that one, so a later deletion can skip re-hashing it.
    inode: int | None = None
    mtime_ns: int | None = None

    def spec(self) -> FileSpec:
        return FileSpec(self.path, self.size, self.checksum, self.uuid)


def check_observation_name(name: str) -> None:
    if not OBSERVATION_NAME.fullmatch(name):
        raise FilingError(f"invalid observation name {name!r}: use 1-128 letters, digits, '_', "
                          "'.' or '-', starting with a letter or digit",
                          [("name", "invalid observation name")])


@dataclass(frozen=True)
class Started:
    """An observation `open_observation` found open or opened."""

    uuid: str
    created: bool  # False: it was open already (started before, or by another at that moment)


def start_observation(opsdb: OpsDB, name: str, *, uuid: str | None = None,
                      hook: Hook | None = None) -> str:
    """Open an observation (idempotent while open) and return its uuid."""
    return open_observation(opsdb, name, uuid=uuid, hook=hook).uuid


def open_observation(opsdb: OpsDB, name: str, *, uuid: str | None = None,
                     hook: Hook | None = None) -> Started:
    """start_observation, saying whether this call opened it: of two starts of one name at
    once, the second waits for the first's INSERT, fails on the unique name, looks again and
    finds the first's observation (created False)."""
    check_observation_name(name)
    for attempt in (1, 2):  # a concurrent start of the same name fails once, then is found
        try:
            with opsdb.session() as session:
                found = start_in(session, name, uuid)
                if hook is not None:
                    hook(session)
                return found
        except IntegrityError:
            if attempt == 2:
                raise FilingError(f"observation '{name}': uuid {uuid} is already used by "
                                  "another observation", [("uuid", "already used")],
                                  conflict=True) from None
    raise AssertionError("unreachable")


def start_in(session: Session, name: str, uuid: str | None = None, *,
             uuid_given: bool = True) -> Started:
    """open_observation inside the caller's transaction (the filing service's, with its
    request's marker): raises IntegrityError when another process started the same name or
    used the uuid at the same moment. A uuid the caller gave (`uuid_given`; not one made up
    for it, as the filing journal does) must be the open observation's: an instrument that
    names its observation by its own uuid is told it is another's (before, the observation
    answered "already open" with its own uuid, which a client reading only the status took
    for its own)."""
    obs = session.scalar(select(ExecutedObsUnit).where(ExecutedObsUnit.name == name))
    if obs is None:
        obs = ExecutedObsUnit(name=name, uuid=uuid or new_uuid())
        session.add(obs)
        session.flush()
        return Started(obs.uuid, created=True)
    if obs.status != ObservationStatus.OPEN:
        raise FilingError(f"observation '{name}' already finished at "
                          f"{obs.finished_at}; it cannot be restarted, use a new name",
                          [("name", "observation already finished")], conflict=True)
    if uuid_given and uuid is not None and uuid != obs.uuid:
        raise started_with_another_uuid(name, obs.uuid)
    return Started(obs.uuid, created=False)


def started_with_another_uuid(name: str, known: str) -> FilingError:
    return FilingError(f"observation '{name}' was started with uuid {known}; nothing changed",
                       [("uuid", "differs")], conflict=True)


def finish_observation(opsdb: OpsDB, name: str, *, hook: Hook | None = None
                       ) -> datetime | None:
    """Close an observation so no more files can be filed against it (idempotent). Returns
    when it had been finished before, or None when this call finished it."""
    with opsdb.session() as session:
        earlier = finish_in(session, name)
        if hook is not None:
            hook(session)
    return earlier


def finish_in(session: Session, name: str) -> datetime | None:
    """finish_observation inside the caller's transaction. The observation's row is locked
    first: a filing of it (which locks it too) either commits before, and its files are the
    observation's, or waits and then finds it finished; of two finishes at once the second
    finds it finished by the first."""
    obs = lock_observation(session, ExecutedObsUnit.name == name)
    if obs is None:
        raise FilingError(f"observation '{name}' is unknown; nothing to finish",
                          [("name", "unknown observation")], conflict=True)
    if obs.status != ObservationStatus.OPEN:
        return obs.finished_at
    obs.status, obs.finished_at = ObservationStatus.FINISHED, utcnow()
    session.flush()
    return None


def lock_observations(session: Session, names: Iterable[str]) -> None:
    """Take the row locks of several observations (those that exist) for the rest of the
    transaction, in one order, by name, whatever order the transaction then works in: two
    transactions locking overlapping observations (two filing services draining their journals
    into one OpsDB) wait for each other instead of each holding one the other wants, which
    PostgreSQL ends by aborting one ("deadlock detected"). One statement a name: an UPDATE of
    several rows locks them in the order it finds them."""
    for name in sorted(set(names)):
        session.execute(update(ExecutedObsUnit).where(ExecutedObsUnit.name == name)
                        .values(status=ExecutedObsUnit.status)
                        .execution_options(synchronize_session=False))


def lock_observation(session: Session, where: ColumnElement[bool]) -> ExecutedObsUnit | None:
    """The observation `where` selects, read after taking its row lock for the rest of the
    transaction (a no-op UPDATE, as packages.lock_package: PostgreSQL's row lock, which a
    concurrent finish or filing of it waits for; SQLite's database write lock, taken before
    anything is read, so a writer waits in the busy timeout instead of failing with "database
    is locked"). What it reads is then final until the transaction ends: in READ COMMITTED a
    finish committed while this waited is seen, never an OPEN read a moment before. A
    transaction that locks several observations takes them all first (lock_observations)."""
    session.execute(update(ExecutedObsUnit).where(where)
                    .values(status=ExecutedObsUnit.status)
                    .execution_options(synchronize_session=False))
    return session.scalar(select(ExecutedObsUnit).where(where)
                          .execution_options(populate_existing=True))


def file_raw_files(opsdb: OpsDB, *, observation: str, module: str, files: Sequence[FileSpec],
                   site: str | None = None, location: str | None = None,
                   hook: Hook | None = None) -> FilingResult:
    """Check every file, then record all new ones (file row + verified source copy) at once.
    `hook` runs in the recording transaction just before the rows are inserted."""
    prefix = f"observation '{observation}'"
    with opsdb.session() as session:
        target = _resolve(session, observation, module, site, location)
    checked = _check(target, files, prefix, hashing=True)
    return _record(opsdb, target, checked, prefix, hook)


def check_files(source: Source, files: Sequence[FileSpec], observation: str) -> list[CheckedFile]:
    """Every check filing makes on the files themselves (containment, symlinks, size, checksum),
    without OpsDB: the filing service runs it before it acknowledges a request."""
    checked = _check(source, files, f"observation '{observation}'", hashing=True)
    return [CheckedFile(c.name, c.size, c.checksum, c.spec.uuid, c.inode, c.mtime_ns)
            for c in checked]


def record_checked(session: Session, *, observation: str, module: str,
                   files: Sequence[CheckedFile], site: str | None = None,
                   location: str | None = None, hook: Hook | None = None) -> FilingResult:
    """Record files `check_files` accepted earlier (a moment ago, or hours ago from a journal)
    inside the caller's transaction: the cheap checks run again (the file is still there, same
    size) but the bytes are not re-read; the packaging pass re-reads them against the checksum
    anyway. A file's identity from its hashing is kept only if it is still the same file.
    The observation's row is locked for the rest of the transaction (see _record)."""
    prefix = f"observation '{observation}'"
    target = _resolve(session, observation, module, site, location, lock=True)
    checked = _check(target, [f.spec() for f in files], prefix, hashing=False)
    for i, c in enumerate(checked):
        if (files[c.index].inode, files[c.index].mtime_ns) != (c.inode, c.mtime_ns):
            checked[i] = replace(c, inode=None, mtime_ns=None)
    return _record_in(session, target, checked, prefix, hook)


def _check(target: Source, files: Sequence[FileSpec], prefix: str,
           hashing: bool) -> list[_Checked]:
    checked: list[_Checked] = []
    problems: list[tuple[int, _Problem]] = []
    seen: dict[str, str] = {}
    parents: dict[str, str] = {}  # each directory resolved once per call
    for index, spec in enumerate(files):
        found = _inspect(spec, target, parents, index)
        if isinstance(found, _Problem):
            problems.append((index, found))
        elif found.name in seen:
            problems.append((index, _Problem("path", f"path '{found.name}' is listed twice (as "
                                             f"'{seen[found.name]}' and '{spec.path}')")))
        else:
            seen[found.name] = spec.path
            checked.append(found)
    _raise_if(problems, prefix, len(files))
    if not hashing:
        return checked
    hashed = [_hash(item) for item in checked]  # only once every cheap check has passed
    _raise_if([h for h in hashed if isinstance(h, tuple)], prefix, len(files))
    return [h for h in hashed if isinstance(h, _Checked)]


def source_from_config(config: Config, site: str | None = None,
                       location: str | None = None) -> Source:
    """The source location a request files at, from the configuration (which `ccat-dt migrate`
    mirrors into OpsDB), so that a request can be checked while OpsDB is out of reach."""
    settings = config.settings
    sources = [f"{s.short_name}/{loc.name}" for s in settings.sites
               for loc in s.locations_of(LocationType.SOURCE)]
    site, location = _site_and_location(site, location)
    site_name = site or settings.observatory
    try:
        site_cfg = settings.site(site_name)
    except ValueError:
        raise FilingError(f"unknown site '{site_name}'; source locations: {', '.join(sources)}",
                          [("site", "unknown site")]) from None
    candidates = site_cfg.locations_of(LocationType.SOURCE)
    if location is not None:
        candidates = [loc for loc in site_cfg.locations if loc.name == location]
        if not candidates:
            raise FilingError(f"unknown location '{site_name}/{location}'; source locations: "
                              f"{', '.join(sources)}", [("location", "unknown location")])
        if candidates[0].type != LocationType.SOURCE:
            raise FilingError(f"location {site_name}/{location} is a {candidates[0].type.value},"
                              f" raw files are filed at a source location ({', '.join(sources)})",
                              [("location", "not a source location")])
    if not candidates:
        raise FilingError(f"site '{site_name}' has no source location; source locations: "
                          f"{', '.join(sources)}", [("site", "no source location")])
    chosen = candidates[0]
    label = f"{site_name}/{chosen.name}"
    root = config.resolve_root(chosen.root)
    if not root.is_dir():
        raise FilingError(f"root {root} of source location {label} is missing")
    return Source(label, root, root.resolve())


def check_module(config: Config, module: str) -> str:
    """`instrument/module` known to the configuration; returns the instrument."""
    instrument, _, name = module.partition("/")
    known = [f"{i.name}/{m}" for i in config.settings.instruments for m in i.modules]
    if module not in known:
        raise FilingError(f"unknown module '{module}'; known modules: {', '.join(sorted(known))}",
                          [("module", "unknown module")])
    return instrument


def file_directory(opsdb: OpsDB, *, observation: str, module: str, directory: str,
                   site: str | None = None, location: str | None = None,
                   hook: Hook | None = None) -> FilingResult:
    """File every regular file below a source directory, but the location marker; symlinks
    are not followed, and they and other non-regular entries (FIFOs, sockets) are listed in
    the result's `skipped`. A directory below it that cannot be listed or entered refuses the
    call, nothing filed: its files would be left out unsaid, and never filed once the
    observation is finished."""
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
    specs, skipped, unreadable = [], [], []

    def unlisted(exc: OSError) -> None:  # os.walk passes over what it cannot list
        unreadable.append(_unreadable(exc, "cannot read directory", target))

    for dirpath, dirs, names in os.walk(base, onerror=unlisted):
        for entry in names + dirs:
            path = Path(dirpath, entry)
            relative = path.relative_to(target.real_root).as_posix()
            try:
                mode = os.lstat(path).st_mode
            except OSError as exc:  # a directory that can be listed but not entered
                unreadable.append(_unreadable(exc, "cannot look at", target))
                continue
            if is_marker(relative) or stat.S_ISDIR(mode):  # a directory is walked
                continue
            if stat.S_ISREG(mode):  # never through a symlink
                specs.append(FileSpec(relative))
            else:
                skipped.append(relative)
    if unreadable:  # its files would be left out, unsaid, and never filed once it finishes
        shown = "\n  ".join(unreadable[:MAX_LISTED]) + (
            f"\n  ... and {len(unreadable) - MAX_LISTED} more"
            if len(unreadable) > MAX_LISTED else "")
        raise FilingError(f"{prefix}: directory '{directory}' cannot be read in full, nothing "
                          f"was filed:\n  {shown}", [("directory", "cannot be read in full")])
    result = file_raw_files(opsdb, observation=observation, module=module, site=site,
                            location=location, files=sorted(specs, key=lambda s: s.path),
                            hook=hook)
    return replace(result, skipped=sorted(skipped))


def _unreadable(exc: OSError, what: str, target: Source) -> str:
    """What `file --directory` says of an entry it could not list or look at."""
    path = Path(exc.filename if exc.filename is not None else target.root)
    relative = (path.relative_to(target.real_root).as_posix()
                if path.is_relative_to(target.real_root) else str(path))
    if exc.errno in DENIED_ERRNO:
        found = refusal_here(path)
        why = (f"permission denied{f' ({found})' if found else ''}: make it readable by "
               f"{local_user()}")
    else:
        why = exc.strerror or str(exc)
    return f"{what} '{relative}' under {target.root}: {why}"


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
        raise bad(f"unknown key(s) {', '.join(unknown)}; allowed: path, size, checksum")
    path, size, checksum = item.get("path"), item.get("size"), item.get("checksum")
    if not isinstance(path, str) or not path:
        raise bad("'path' must be a non-empty string")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise bad(f"'size' of '{path}' must be a non-negative integer, not {size!r}")
    if checksum is not None and not isinstance(checksum, str):
        raise bad(f"'checksum' of '{path}' must be a string")
    return FileSpec(path, size, checksum)


def _site_and_location(site: str | None, location: str | None
                       ) -> tuple[str | None, str | None]:
    """A location given as SITE/LOCATION (as `stage --location` takes it) names its site."""
    if location is None or "/" not in location:
        return site, location
    named_site, _, name = location.partition("/")
    if site not in (None, named_site):
        raise FilingError(f"--site {site} and --location {location} name two sites: give one",
                          [("location", "two sites")])
    return named_site, name


def _resolve(session: Session, observation: str, module: str, site: str | None,
             location: str | None, *, lock: bool = False) -> _Target:
    """Where to file; with `lock`, the observation's row is locked for the transaction, which
    then records the files (lock_observation)."""
    prefix = f"observation '{observation}'"
    site, location = _site_and_location(site, location)
    named = ExecutedObsUnit.name == observation
    obs = (lock_observation(session, named) if lock else
           session.scalar(select(ExecutedObsUnit).where(named)))
    if obs is None:
        raise FilingError(f"{prefix} is unknown; start it first",
                          [("observation", "unknown observation")], conflict=True)
    if obs.status != ObservationStatus.OPEN:
        raise FilingError(f"{prefix} finished at {obs.finished_at}; no files can be added to it",
                          [("observation", "observation finished")], conflict=True)
    instrument, _, name = module.partition("/")
    mod = session.scalar(select(InstrumentModule).where(
        InstrumentModule.instrument == instrument, InstrumentModule.name == name))
    if mod is None:
        modules = ", ".join(sorted(m.label for m in session.scalars(select(InstrumentModule))))
        raise FilingError(f"{prefix}: unknown module '{module}'; known modules: {modules}",
                          [("module", "unknown module")])
    def sources() -> list[DataLocation]:  # only for a default site, or to explain an error
        return list(session.scalars(
            select(DataLocation).where(DataLocation.location_type == LocationType.SOURCE)
            .order_by(DataLocation.priority.desc(), DataLocation.id)))

    def known() -> str:
        return ", ".join(loc.label for loc in sources()) or "none (is the topology synced?)"

    try:
        if site is None:
            first = next(iter(sources()), None)
            if first is None:
                raise UnknownLocation("OpsDB has no source location")
            site = first.site.short_name
        loc = (get_location(session, site, location) if location is not None
               else primary_location(session, site, LocationType.SOURCE))
    except UnknownLocation as exc:
        raise FilingError(f"{prefix}: {exc}; source locations: {known()}",
                          [("location", str(exc))]) from None
    if loc.location_type != LocationType.SOURCE:
        kind = loc.location_type.value.replace("_", " ")
        raise FilingError(f"{prefix}: location {loc.label} is a {kind}, raw files are filed at "
                          f"a source location ({known()})",
                          [("location", "not a source location")])
    root = Path(loc.root)
    if not root.is_dir():
        raise FilingError(f"{prefix}: root {root} of source location {loc.label} is missing")
    return _Target(loc.label, root, root.resolve(), obs.id, mod.id, loc.id)


def _inspect(spec: FileSpec, target: Source, parents: dict[str, str],
             index: int = 0) -> _Checked | _Problem:
    """Check one declared file without reading its bytes; a _Problem is what was found.
    `parents` caches resolved directories, so a batch costs about one lstat a file."""
    rel = PurePosixPath(spec.path)
    if not spec.path.strip() or not rel.parts or "\0" in spec.path:
        return _Problem("path", f"path {spec.path!r} is empty or invalid")
    try:
        spec.path.encode("utf-8")
    except UnicodeEncodeError:
        return _Problem("path", f"path {spec.path!r} is not valid UTF-8: rename the file (OpsDB "
                        "and the package manifest record names as UTF-8)")
    if "\\" in spec.path:
        return _Problem("path", f"path '{spec.path}' contains a backslash, which a package "
                        "cannot carry: rename the file")
    outside = _Problem("path", f"path '{spec.path}' is outside source location {target.label} "
                       f"(root {target.root})")
    if rel.is_absolute():
        return _Problem("path", f"path '{spec.path}' is absolute; give it relative to the root "
                        f"of source location {target.label} ({target.root})")
    if ".." in rel.parts:
        return outside
    name = rel.as_posix()
    if (length := len(name.encode("utf-8"))) > MAX_PATH_BYTES:
        return _Problem("path", f"path '{name[:60]}...{name[-40:]}' is {length} bytes long, "
                        f"more than {MAX_PATH_BYTES}: it could be archived but never staged "
                        "(unpacked below the processing root and the package name); shorten it")
    if is_marker(name):
        return _Problem("path", f"'{name}' is the location marker `ccat-dt init` wrote at "
                        f"{target.root}, not raw data")
    parent, _, base = name.rpartition("/")
    try:
        if parent not in parents:
            parents[parent] = str((target.root / parent).resolve())
        real = os.path.join(parents[parent], base)
        try:
            info: os.stat_result | None = os.lstat(real)
        except FileNotFoundError:
            info = None
        if real != os.path.join(target.real_root, name) or (
                info is not None and stat.S_ISLNK(info.st_mode)):
            resolved = Path(real).resolve()
            if not resolved.is_relative_to(target.real_root):
                return outside
            # A symlinked directory would let one observation's purge delete another's file
            # (and a symlinked file could be swapped): only real paths below the root are filed.
            return _Problem("path", f"path '{name}' passes through a symlink under "
                            f"{target.root}; file the real path "
                            f"({resolved.relative_to(target.real_root)})")
        if info is None:
            raise FileNotFoundError(name)
    except FileNotFoundError:
        return _Problem("path", f"file '{name}' does not exist under {target.root}")
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
        return _Problem("path", f"cannot access '{name}' under {target.root}: {exc}")
    if not stat.S_ISREG(info.st_mode):
        return _Problem("path", f"'{name}' is not a regular file")
    if spec.size is not None and spec.size != info.st_size:
        return _Problem("size", f"size mismatch for '{name}': declared {spec.size}, on disk "
                        f"{info.st_size}")
    if spec.checksum is not None and not CHECKSUM.fullmatch(spec.checksum.lower()):
        return _Problem("checksum", f"checksum of '{name}' is not 32 hex digits ({ALGORITHM}): "
                        f"{spec.checksum!r}")
    return _Checked(spec, name, Path(real), info.st_size,
                    spec.checksum.lower() if spec.checksum else "", index, info.st_ino,
                    info.st_mtime_ns)


def _hash(item: _Checked) -> _Checked | tuple[int, _Problem]:
    try:
        checksum, size = hash_file(item.real)
    except OSError as exc:
        return item.index, _Problem("path", f"cannot read '{item.name}': {exc}")
    if size != item.size:
        return item.index, _Problem("size", f"'{item.name}' changed size while being "
                                    f"checksummed ({item.size} -> {size} bytes); is it still "
                                    "being written?")
    declared = item.spec.checksum
    if declared is not None and declared.lower() != checksum:
        return item.index, _Problem("checksum", f"checksum mismatch for '{item.name}': declared "
                                    f"{declared}, computed {checksum}")
    try:
        after = item.real.stat()
    except OSError as exc:
        return item.index, _Problem("path", f"cannot stat '{item.name}' after checksumming it: "
                                    f"{exc}")
    if (after.st_ino, after.st_mtime_ns) != (item.inode, item.mtime_ns):
        return item.index, _Problem("path", f"'{item.name}' changed while being checksummed; "
                                    "is it still being written?")
    return replace(item, size=size, checksum=checksum)


def _record(opsdb: OpsDB, target: _Target, items: list[_Checked], prefix: str,
            hook: Hook | None = None) -> FilingResult:
    """Compare with earlier filings and insert the new files, all in one transaction, the
    observation's row locked throughout: a finish at the same moment commits before (nothing
    filed, said so) or after (with these files); a filing of the same observation at the same
    moment waits, then finds these files filed (unchanged) or in conflict."""
    for attempt in (1, 2):  # the same path filed into another observation at the same moment
        try:  # fails the INSERT once; looked at again, it is said what it clashes with
            with opsdb.session() as session:
                obs = lock_observation(session, ExecutedObsUnit.id == target.observation_id)
                if obs is None or obs.status != ObservationStatus.OPEN:
                    raise FilingError(f"{prefix} was finished while its files were being "
                                      "checked; nothing was filed",
                                      [("observation", "observation finished")], conflict=True)
                return _record_in(session, target, items, prefix, hook)
        except _Clash:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _record_in(session: Session, target: _Target, items: list[_Checked],
               prefix: str, hook: Hook | None = None) -> FilingResult:
    """_record inside the caller's transaction: a few statements whatever the number of files
    (one SELECT per 500 paths, then multi-row INSERTs of the files and their source copies).
    The caller has checked, in this transaction, that the observation is open, and holds its
    row lock (lock_observation)."""
    names = [item.name for item in items]
    existing: dict[str, tuple[str, int, int, str, int]] = {}
    for start in range(0, len(names), _IN_CHUNK):
        chunk = names[start:start + _IN_CHUNK]
        existing.update((row[0], tuple(row[1:])) for row in session.execute(  # type: ignore[misc]
            select(RawDataFile.relative_path, RawDataFile.uuid, RawDataFile.observation_id,
                   RawDataFile.module_id, RawDataFile.checksum, RawDataFile.size)
            .where(RawDataFile.source_location_id == target.location_id,
                   RawDataFile.relative_path.in_(chunk))))
    problems: list[tuple[int, _Problem]] = []
    new: list[_Checked] = []
    uuids: dict[str, str] = {}
    for item in items:
        row = existing.get(item.name)
        if row is None:
            new.append(item)
            continue
        uuid, observation_id, module_id, checksum, size = row
        if (observation_id, module_id) != (target.observation_id, target.module_id):
            other = session.get_one(ExecutedObsUnit, observation_id).name
            label = session.get_one(InstrumentModule, module_id).label
            problems.append((item.index, _Problem(
                "path", f"'{item.name}' is already filed under observation '{other}', "
                f"module {label}")))
        elif checksum != item.checksum:
            problems.append((item.index, _Problem(
                "checksum", f"'{item.name}' is already filed with checksum {checksum}; "
                f"refusing to re-file it with checksum {item.checksum}")))
        elif size != item.size:
            problems.append((item.index, _Problem(
                "size", f"'{item.name}' is already filed with size {size}; "
                f"refusing to re-file it with size {item.size}")))
        else:
            uuids[item.name] = uuid
    _raise_if(problems, prefix, len(items), conflict=True)
    if hook is not None:
        hook(session)
    now = utcnow()  # the checksum was just computed at the source: the copy is verified
    for item in new:
        uuids[item.name] = item.spec.uuid or new_uuid()
    if new:
        try:
            ids = dict(session.execute(
                insert(RawDataFile).returning(RawDataFile.uuid, RawDataFile.id),
                [{"uuid": uuids[item.name], "source_location_id": target.location_id,
                  "relative_path": item.name, "size": item.size,
                  "checksum_algorithm": ALGORITHM, "checksum": item.checksum,
                  "observation_id": target.observation_id, "module_id": target.module_id,
                  "filed_at": now} for item in new]).tuples().all())
            session.execute(insert(RawDataFileCopy), [
                {"kind": "raw_file", "location_id": target.location_id,
                 "relative_path": item.name, "size": item.size, "checksum": item.checksum,
                 "status": CopyStatus.PRESENT, "created_at": now, "verified_at": now,
                 "raw_data_file_id": ids[uuids[item.name]], "inode": item.inode,
                 "mtime_ns": item.mtime_ns} for item in new])
        except IntegrityError:
            raise _Clash(f"{prefix}: some of these files (or their uuids) were filed "
                         "concurrently by another process; nothing was filed, retry",
                         conflict=True) from None
    return FilingResult(filed=len(new), unchanged=len(items) - len(new),
                        bytes=sum(item.size for item in new), uuids=uuids)


def _raise_if(problems: Sequence[tuple[int, _Problem]], prefix: str, total: int,
              conflict: bool = False) -> None:
    """One error for the whole batch, so an instrument can fix everything in one go."""
    fields = [(f"files[{index}].{p.field}", p.message) for index, p in problems]
    if len(problems) == 1:
        raise FilingError(f"{prefix}: {problems[0][1].message}; nothing was filed", fields,
                          conflict)
    if problems:
        listed = "\n  ".join(p.message for _, p in problems[:MAX_LISTED])
        more = (f"\n  ... and {len(problems) - MAX_LISTED} more"
                if len(problems) > MAX_LISTED else "")
        raise FilingError(f"{prefix}: {len(problems)} of {total} files rejected, nothing was "
                          f"filed:\n  {listed}{more}", fields, conflict)
