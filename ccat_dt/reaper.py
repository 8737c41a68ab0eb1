"""Carries out deletion decisions: certificate committed first, then the unlink, then the record.

Each deletion re-reads OpsDB in its own transaction and re-runs the plan for that one copy, so a
plan that went stale (an LTA copy found corrupt since) deletes nothing.

A process that dies between the certificate and the record, or an attempt that could not
record (OpsDB locked or cut off), leaves its copy DELETION_IN_PROGRESS, which the planner never
touches. The deletion operation is a claim of its process (`claims.hold`, a lease of
claims.DELETION_LEASE, longer than any deletion takes): once its process is gone (on this
host), its attempt ended in this process (a step's retry), or its lease ran out (another
host), the next purge of the package finishes it: a file already gone is recorded deleted
under the certificate that allowed it; a file still there goes back to PRESENT and is decided
afresh, with a new certificate, like any other copy. An unlink or `rm` that failed (the link
dropped under it, an I/O error) leaves the copy the same way, its operation FAILED, and the
next purge (the step's retry within its run, else the re-attempt of this one) finishes it at
once: no person is needed for a fault that passes, and one that persists fails every
re-attempt until the re-attempt sensor tells a person. An unlink the storage refuses (a
read-only file system, an immutable file) says what to do; a read-only one marks its location,
which tells a person at once (health.py, notify.py) until a deletion there succeeds. Only a
file that is not the recorded one is DELETION_FAILED (or CORRUPT for a source), for a person
to look at: a refusal (`PurgeReport.refused`), which no retry within the run changes.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.orm import Session

from ccat_dt import claims
from ccat_dt.config import Config
from ccat_dt.health import mark_failed, mark_ok, write_refused
from ccat_dt.marker import LABEL, another_location, is_marker, label_in, root_problem
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    LocationType,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    PhysicalCopy,
    RawDataFile,
    RawDataFileCopy,
    RawDataPackage,
    _aware,
    utcnow,
)
from ccat_dt.purge_cycle import DiskUsage, measure, pressure_gone
from ccat_dt.recheck import RecheckReport, recheck_lta_copies
from ccat_dt.retention import (
    UNFINISHED,
    Action,
    Decision,
    decide_copy,
    lta_requirement,
    plan_deletions,
)
from ccat_dt.staged_files import clear_scratch
from ccat_dt.storage import (
    StorageUnavailable,
    Wanted,
    look,
    look_local,
    open_parent,
)
from ccat_dt.transports.base import DELETION_DENIED, Endpoint, SshSettings, TransferError
from ccat_dt.transports.factory import ssh_settings
from ccat_dt.transports.remote import (
    SHORT_TIMEOUT_S,
    classify_ssh,
    remote_command,
    remote_size,
    run,
)


@dataclass(frozen=True)
class PurgeReport:
    package: str
    deleted: int
    deleted_bytes: int
    kept: list[Decision]
    failures: list[str]
    # Those of `failures` that are decided (a file that is not the recorded copy, kept and
    # recorded for a person): looking again within the run changes nothing. The others are
    # transient (a storage or link that could not be looked at, an unlink that failed).
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Unlooked:
    """A deletion kept because an LTA copy it relies on could not be looked at just now."""

    decision: Decision
    problems: list[str]


@dataclass(frozen=True)
class _Claim:
    copy_id: int
    operation_id: int
    path: Path
    root: Path
    relative_path: str
    prune_dirs: bool
    host: str | None  # a remote location: deleted over ssh
    size: int
    checksum: str
    inode: int | None
    mtime_ns: int | None
    source: bool  # a raw file at its source: the filed bytes themselves
    rehash: bool  # re-hash the content before the unlink even when its identity is unchanged
    label: str | None = None  # the location: its root's marker must name it
    # Where this deletion looked, as (location id, root, host, label): the copy's location
    # first, then those of the LTA copies its certificate relies on, as re-checked. Each must
    # still be there in OpsDB at the unlink (`_moved_since`).
    looked: tuple[tuple[int, str, str | None, str], ...] = ()


def _package(session: Session, name: str) -> RawDataPackage:
    package = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
    if package is None:
        raise LookupError(f"unknown package '{name}'")
    return package


def _claim(opsdb: OpsDB, config: Config, package_id: int, planned: Decision, now: datetime,
           run_id: str | None, early_ids: Collection[int],
           recheck: RecheckReport) -> _Claim | _Unlooked | Decision:
    """Re-decide from fresh reads; if still DELETE, commit the certificate and mark the copy.

    The certificate rests only on LTA copies this purge just looked at on their storage."""
    with opsdb.session() as session:
        package = session.get_one(RawDataPackage, package_id)
        copy = session.get(PhysicalCopy, planned.copy_id)
        if copy is None:
            return replace(planned, action=Action.KEEP, reason="copy no longer in OpsDB")
        decision, lta = decide_copy(session, config, package, copy, now, early_ids)
        if decision.action != Action.DELETE:
            return decision
        required, own_site = lta_requirement(config, decision.site, decision.location_type)
        relied = [c for c in lta if own_site in (None, c.location.site.short_name)]
        rechecked = recheck.passed
        unchecked = [c for c in relied if c.id not in rechecked]
        if unchecked:
            names = ", ".join(f"{c.location.label} copy {c.id}" for c in unchecked)
            kept = replace(decision, action=Action.KEEP, reason=(
                f"not re-checked on its storage just now: {names}; kept until it can be"))
            unlooked = [recheck.unavailable[c.id] for c in unchecked
                        if c.id in recheck.unavailable]
            return _Unlooked(kept, unlooked) if unlooked else kept
        if moved := [_moved(c.location, rechecked[c.id].root, rechecked[c.id].host)
                     for c in relied if (c.location.root, c.location.host)
                     != (rechecked[c.id].root, rechecked[c.id].host)]:
            # `ccat-dt migrate` recorded a disk move since the look: it saw another root.
            # This purge fails, so that its retry looks there (the step's, or the re-attempt).
            return _Unlooked(replace(decision, action=Action.KEEP, reason=(
                "an LTA copy it relies on was re-checked at a root its location has left: "
                "kept until re-checked where it is now")),
                [f"{line}: the LTA copy it relies on there is re-checked at the next purge"
                 for line in moved])
        result = session.execute(update(PhysicalCopy).where(
            PhysicalCopy.id == copy.id, PhysicalCopy.status == copy.status)
            .values(status=CopyStatus.DELETION_IN_PROGRESS))
        if not isinstance(result, CursorResult) or result.rowcount != 1:
            return replace(decision, action=Action.KEEP, reason="claimed by another deletion")
        # Where the copy is, read now under a shared lock on its location's row, which
        # `ccat-dt migrate` takes first (topology._lock_leaving): a move recorded before is
        # read here (the new root), one after finds this claim and is refused until it ends.
        location = session.scalars(select(DataLocation).where(
            DataLocation.id == copy.location_id).with_for_update(read=True)
            .execution_options(populate_existing=True)).one()
        started = utcnow()
        certificate: dict[str, Any] = {
            "required": required, "decided_at": started.isoformat(),
            "copies": [{**_certified(c), **rechecked[c.id].evidence()} for c in relied]}
        operation = Operation(operation_type=OperationType.DELETION,
                              status=OperationStatus.IN_PROGRESS, package_id=package_id,
                              copy_id=copy.id, source_location_id=copy.location_id,
                              reason=decision.reason, run_id=run_id, evidence=certificate,
                              started_at=started)
        claims.hold(operation, started, lease=claims.DELETION_LEASE)
        session.add(operation)
        session.flush()
        prune = copy.kind == "raw_file" and decision.location_type in (
            LocationType.SOURCE, LocationType.PROCESSING)
        source = decision.location_type == LocationType.SOURCE
        looked = ((location.id, location.root, location.host, location.label),
                  *((c.location_id, rechecked[c.id].root, rechecked[c.id].host,
                     c.location.label) for c in relied))
        return _Claim(copy.id, operation.id, Path(location.root) / copy.relative_path,
                      Path(location.root), copy.relative_path, prune, location.host,
                      copy.size, copy.checksum, copy.inode, copy.mtime_ns, source,
                      source and config.settings.policies.rehash_sources_before_deletion,
                      location.label, looked)


def _shown(root: str, host: str | None) -> str:
    return f"{host}:{root}" if host else root


def _moved(location: DataLocation | None, root: str, host: str | None) -> str:
    """What a location OpsDB records at another place than `root` on `host` says."""
    if location is None:
        return f"{_shown(root, host)}: its location is no longer in OpsDB"
    return (f"location {location.label} is at {_shown(location.root, location.host)} in "
            f"OpsDB now, no longer at {_shown(root, host)}, where this deletion looked "
            "(`ccat-dt migrate` recorded a move meanwhile)")


def _moved_since(opsdb: OpsDB, claim: _Claim) -> list[str]:
    """The locations this deletion looked at (`_Claim.looked`: the copy's, where it would
    unlink; those of the LTA copies its certificate relies on, where they were re-checked)
    that OpsDB records at another root or host now, each in words; read just before the
    unlink. Nothing may go at a root OpsDB no longer points to, nor on a look at one."""
    if not claim.looked:
        return []
    with opsdb.session() as session:
        rows = {row.id: row for row in session.scalars(select(DataLocation).where(
            DataLocation.id.in_([entry[0] for entry in claim.looked])))}
        return [_moved(rows.get(id_), root, host) for id_, root, host, _label in claim.looked
                if (row := rows.get(id_)) is None or (row.root, row.host) != (root, host)]


def _withdraw(opsdb: OpsDB, claim: _Claim, moved: list[str],
              clock: float) -> tuple[int, str, bool]:
    """End a claimed deletion with nothing deleted, its copy PRESENT again to be decided
    afresh (where OpsDB says it is now, under a new look at what it relies on); a failure,
    so that its purge is tried again (the step's retry, the re-attempt). A claim `migrate`
    closed meanwhile (its process taken for gone) is left as closed, its copy to the next
    purge (`_resume_unfinished` looks at its path at the new root)."""
    why = (f"not deleted: {'; '.join(moved)}; nothing was deleted at either place: the next "
           "purge decides it afresh where it is now")
    with opsdb.session() as session:
        ended = session.execute(update(Operation).where(
            Operation.id == claim.operation_id, Operation.status == OperationStatus.IN_PROGRESS)
            .values(status=OperationStatus.FAILED, error=why[:2000], finished_at=utcnow(),
                    duration_s=time.monotonic() - clock))
        if isinstance(ended, CursorResult) and ended.rowcount == 1:
            session.execute(update(PhysicalCopy).where(
                PhysicalCopy.id == claim.copy_id,
                PhysicalCopy.status == CopyStatus.DELETION_IN_PROGRESS)
                .values(status=CopyStatus.PRESENT))
    return 0, f"{claim.path}: {why} (operation {claim.operation_id})", False


def _certified(copy: PackageCopy) -> dict[str, Any]:
    assert copy.verified_at is not None
    return {"copy_id": copy.id, "site": copy.location.site.short_name,
            "location": copy.location.name,
            "path": str(Path(copy.location.root) / copy.relative_path),
            "checksum": copy.checksum, "verified_at": _aware(copy.verified_at).isoformat()}


def _inside(path: Path, root: Path) -> bool:
    path, root = Path(os.path.normpath(path)), Path(os.path.normpath(root))
    return path != root and path.is_relative_to(root)


def _prune_empty_dirs(path: Path, root: Path) -> None:
    """Remove now-empty parent directories of `path`, up to but never including `root`."""
    parent = Path(os.path.normpath(path.parent))
    while _inside(parent, root):
        try:
            parent.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return  # not empty (or not ours to remove): stop climbing
        parent = parent.parent


class _Changed(Exception):
    """The file at the path is not the one recorded: it is kept, and the copy marked CORRUPT."""


def _unlink_local(claim: _Claim) -> int:
    """Unlink the claimed file if it still is the recorded one; returns the bytes freed.

    Reached from the location root without following any symlink (a directory replaced by a
    symlink cannot redirect the unlink); a size, inode or mtime that differs from the record,
    an identity never recorded, or a policy that asks, means re-hashing it first: a changed
    file is never deleted."""
    if problem := root_problem(claim.root, claim.label):
        raise OSError(problem)
    try:
        directory, name = open_parent(claim.root, claim.relative_path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(str(claim.path)) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise _denied(claim, exc.strerror or str(exc)) from exc
        raise _Changed(f"{claim.relative_path} passes through a symlink or a non-directory; "
                       "kept") from exc
    try:
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise _Changed(f"{claim.path} is no longer a regular file; kept")
        if info.st_size != claim.size:
            raise _Changed(f"{claim.path} changed since it was recorded: {info.st_size} bytes "
                           f"on disk, {claim.size} recorded; kept")
        recorded = (claim.inode, claim.mtime_ns)
        unknown = None in recorded  # e.g. filed from the service's journal
        moved = None not in recorded and recorded != (info.st_ino, info.st_mtime_ns)
        if claim.rehash or unknown or moved:
            found = look_local(claim.root, Wanted(claim.relative_path, rehash=True))
            if found.checksum != claim.checksum or found.inode != info.st_ino:
                raise _Changed(f"{claim.path} changed since it was recorded: content "
                               f"{found.checksum or found.problem}, recorded {claim.checksum}; "
                               "kept")
            # hashing a large file takes minutes: what is at the name now must be the file
            # just hashed, not one renamed over it or written to meanwhile
            now = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if (now.st_ino, now.st_mtime_ns, now.st_size) != (found.inode, found.mtime_ns,
                                                               found.size):
                raise _Changed(f"{claim.path} changed while it was hashed; kept")
        os.unlink(name, dir_fd=directory)
        return info.st_size
    finally:
        os.close(directory)


# Constant script: $1 the root, $2 the path below it, $3 the recorded size, $4 the identity
# ("INODE MTIME", as `stat -c '%i %.9Y'` prints it) the file must still have, or "" for none,
# $5 the marker's line naming the location, or "" for none.
# A marker naming another location exits 7 (printing its line); refuses a symlink in any
# component, a non-regular file and a size that differs (exit 3: "changed"); another identity
# exits 5 (hash it first); nothing at the path exits 6.
_REMOVE_SCRIPT = """
LC_ALL=C; export LC_ALL;
root=$1; rel=$2; want=$3; ident=$4;
[ -f "$root/.ccat-dt-location" ] || { echo "location root $root has no marker" >&2; exit 4; };
m=$(grep -m1 '^LABEL' "$root/.ccat-dt-location");
[ -z "$5" ] || [ -z "$m" ] || [ "$m" = "$5" ] || { printf '%s\\n' "$m" >&2; exit 7; };
p=$root; set -f; IFS=/;
for part in $rel; do p=$p/$part; [ -L "$p" ] && { echo "symlink at $p" >&2; exit 3; }; done;
if ! e=$(stat -c %i -- "$p" 2>&1 >/dev/null); then
  case $e in *"ermission denied"*|*"not permitted"*) printf '%s\\n' "$e" >&2; exit 8;; esac;
  exit 6;
fi;
[ -f "$p" ] || { echo "$p is not a regular file" >&2; exit 3; };
size=$(stat -c %s -- "$p") || exit 1;
[ "$size" = "$want" ] || { echo "$p has $size bytes, $want recorded" >&2; exit 3; };
[ -z "$ident" ] || [ "$(stat -c '%i %.9Y' -- "$p")" = "$ident" ] || exit 5;
exec rm -f -- "$p";""".strip().replace(  # ssh arguments cannot carry line breaks
    "\n", " ").replace("LABEL", LABEL)


class _Moved(Exception):
    """The remote file's identity is not the one expected: hash it before deciding."""


def _unlink_remote(ssh: SshSettings, claim: _Claim) -> int:
    """As _unlink_local, over ssh: the `rm` runs only on the file with the recorded size and
    identity (inode and mtime, recorded when its transfer verified it), checked in the same
    shell. A copy without a recorded identity, or whose identity differs (exit 5), or a policy
    that asks, is hashed on its host first; the `rm` then checks it is still the file hashed."""
    recorded = None if claim.rehash else _identity_text(claim.inode, claim.mtime_ns)
    if recorded is not None:
        with suppress(_Moved):
            return _rm_remote(ssh, claim, recorded)
    try:
        return _rm_remote(ssh, claim, _hash_remote(ssh, claim))
    except _Moved:
        raise _Changed(f"{claim.host}:{claim.path} changed while it was hashed; kept") from None


# What a person does about a copy ccat-dt's user may not reach to delete (DELETION_DENIED).
LET_IN = ("kept. Let that user enter the directories on its way again (`ls -ld`, chmod/chown, "
          "or their ACL or security label): the next purge then deletes it")


def _denied(claim: _Claim, said: str) -> PermissionError:
    """The deletion of a copy that ccat-dt's user may not reach (a directory on its way it
    cannot enter): the file is neither known gone nor known changed, and stays; the next purge
    looks again (`_execute` says what to do)."""
    where = f"{claim.host}:{claim.path}" if claim.host else str(claim.path)
    return PermissionError(errno.EACCES, f"{where} {DELETION_DENIED} ({said})")


def _identity_text(inode: int | None, mtime_ns: int | None) -> str | None:
    """An identity as the remote `stat -c '%i %.9Y'` prints it; None if not known."""
    if inode is None or mtime_ns is None or mtime_ns < 0:
        return None
    return f"{inode} {mtime_ns // 10**9}.{mtime_ns % 10**9:09d}"


def _hash_remote(ssh: SshSettings, claim: _Claim) -> str:
    """The identity of the remote file, found to hold the recorded bytes; raises _Changed if
    it holds others, FileNotFoundError if nothing is there (an `rm` without an identity to
    check could then delete a file that appeared since)."""
    assert claim.host is not None
    try:
        [seen] = look(str(claim.root), claim.host, ssh,
                      [Wanted(claim.relative_path, rehash=True)], claim.label)
    except StorageUnavailable as exc:  # whether it is the recorded file is unknown
        raise OSError(str(exc)) from exc
    if seen.problem is not None and seen.problem.startswith("missing"):
        raise FileNotFoundError(f"{claim.host}:{claim.path}")
    if seen.refused:  # not another file: one ccat-dt's user may not reach
        raise _denied(claim, seen.problem or "")
    if seen.problem is not None or seen.checksum != claim.checksum:
        raise _Changed(f"{claim.host}:{claim.path} is not the recorded file (content "
                       f"{seen.checksum or seen.problem}, recorded {claim.checksum}); kept")
    return _identity_text(seen.inode, seen.mtime_ns) or ""


def _rm_remote(ssh: SshSettings, claim: _Claim, identity: str) -> int:
    assert claim.host is not None
    done = run(remote_command(ssh, claim.host, [
        "sh", "-c", _REMOVE_SCRIPT, "sh", str(claim.root), claim.relative_path,
        str(claim.size), identity, f"{LABEL}{claim.label}" if claim.label else ""]),
        timeout_s=SHORT_TIMEOUT_S)
    if done.rc == 7 and claim.label:  # another location's disk (disks swapped): nothing deleted
        raise OSError(another_location(f"{claim.root} on {claim.host}", claim.label,
                                       label_in(done.stderr)))
    if done.rc == 3:
        raise _Changed(f"{claim.host}:{claim.path} is not the recorded file "
                       f"({done.stderr.strip()}); kept")
    if done.rc == 5:
        raise _Moved
    if done.rc == 6:
        raise FileNotFoundError(f"{claim.host}:{claim.path}")
    if done.rc == 8:  # a directory on its way cannot be entered: whether it is there is unknown
        raise _denied(claim, done.stderr.strip())
    if done.rc != 0:
        raise OSError(str(classify_ssh(done.rc, done.stderr, what=f"rm {claim.path}")))
    return claim.size


def _kernel_refused(exc: BaseException) -> bool:
    """Whether the storage refused the unlink itself (a read-only file system, an immutable
    file or directory, no permission): the recorded file is intact and stays."""
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
        return True
    text = str(exc).lower()  # `rm` over ssh says it in words
    return "cannot remove" in text and any(words in text for words in (
        "read-only file system", "operation not permitted", "permission denied"))


def _execute(opsdb: OpsDB, config: Config, claim: _Claim) -> tuple[int, str | None, bool]:
    """Unlink the claimed file and record the outcome; returns (bytes freed, failure or None,
    whether the failure is a refusal: the file is not the recorded one)."""
    clock, note, size = time.monotonic(), None, 0
    if moved := _moved_since(opsdb, claim):  # a disk move recorded since it was certified
        return _withdraw(opsdb, claim, moved, clock)
    try:
        if not _inside(claim.path, claim.root):
            raise OSError(f"refusing to delete {claim.path}: outside location root {claim.root}")
        if is_marker(claim.relative_path):  # filed by mistake: the root would read unmounted
            raise _Changed(f"{claim.path} is the location marker `ccat-dt init` wrote, not raw "
                           "data: never deleted; `ccat-dt exclude` it from its package")
        try:
            size = (_unlink_local(claim) if claim.host is None
                    else _unlink_remote(ssh_settings(config), claim))
        except FileNotFoundError:
            where = f"{claim.host}:{claim.path}" if claim.host else str(claim.path)
            note = f"file already missing at deletion time: {where}; treated as deleted"
    except (OSError, _Changed) as exc:
        if DELETION_DENIED in str(exc):
            exc = OSError(f"{exc}: {LET_IN}")
        elif _kernel_refused(exc):
            exc = OSError(f"{exc}: the storage refuses the deletion; kept. Remount it "
                          "read-write, or clear the immutable flag of the file or its "
                          "directory (`lsattr`, `chattr -i`) or fix their permissions: the "
                          "next purge then deletes it")
        with opsdb.session() as session:
            operation = session.get_one(Operation, claim.operation_id)
            copy = session.get_one(PhysicalCopy, claim.copy_id)
            location_id = copy.location_id
            if isinstance(exc, _Changed):
                # A source file that is not what was filed holds bytes no archive has: it
                # freezes the package's purge and says so (`why`, `purge --plan`).
                copy.status = CopyStatus.CORRUPT if claim.source else CopyStatus.DELETION_FAILED
            # else: still DELETION_IN_PROGRESS, whether the file went unknown until the next
            # purge looks (_resume_unfinished)
            operation.status, operation.error = OperationStatus.FAILED, str(exc)
            operation.finished_at = utcnow()
            operation.duration_s = time.monotonic() - clock
        if write_refused(exc):  # the whole disk's: `status` and a person (notify.py) are told
            where = f"{claim.host}:{claim.path}" if claim.host else str(claim.path)
            mark_failed(opsdb, config, location_id, f"deleting {where}: {exc}")
        refused = isinstance(exc, _Changed)
        return 0, f"{claim.path}: {exc} (operation {claim.operation_id})", refused
    with opsdb.session() as session:
        finished = utcnow()
        copy = session.get_one(PhysicalCopy, claim.copy_id)
        copy.status, copy.deleted_at = CopyStatus.DELETED, finished
        mark_ok(session, copy.location_id)  # a disk found read-only is writable again
        operation = session.get_one(Operation, claim.operation_id)
        operation.status, operation.error = OperationStatus.COMPLETED, note
        operation.bytes, operation.finished_at = size, finished
        operation.duration_s = time.monotonic() - clock
    if claim.prune_dirs and claim.host is None:
        if not claim.source:  # a staged file: its ended request's scratch goes with it
            clear_scratch(claim.root, PurePosixPath(claim.relative_path).parts[0])
        _prune_empty_dirs(claim.path, claim.root)
    return size, None, False


def purge_package(opsdb: OpsDB, config: Config, package_name: str, *,
                  now: datetime | None = None, run_id: str | None = None,
                  copy_ids: Collection[int] | None = None,
                  early_ids: Collection[int] = (),
                  usage: Callable[[DataLocation], DiskUsage | None] = measure) -> PurgeReport:
    """Delete the copies of the package the planner allows, one certified transaction each.

    `copy_ids` limits the deletions to those a purge cycle planned (its byte budget holds);
    `early_ids` are the ones disk pressure lets go before their retention age: each goes only
    while its disk, measured by `usage` just before, is still above the low watermark. Each is
    re-decided from fresh reads just before it is deleted. Deletions left half done (see
    `claims.abandoned_deletion`) are finished first, whatever `copy_ids` says (a cycle planned
    them before)."""
    now = now or utcnow()
    with opsdb.session() as session:
        package_id = _package(session, package_name).id
    resumed, failures = _resume_unfinished(opsdb, ssh_settings(config), package_id, now)
    resumed |= _look_again_at_changed_sources(opsdb, ssh_settings(config), package_id)
    with opsdb.session() as session:
        package = _package(session, package_name)
        plan = plan_deletions(session, config, package, now, early_ids)
    recheck = RecheckReport({}, [])
    if any(d.action == Action.DELETE for d in plan):
        # Look at the LTA copies on their storage now; any that fails is marked CORRUPT,
        # which the re-plan below honours (the whole package is then kept).
        recheck = recheck_lta_copies(opsdb, config, package_name, now=now)
        with opsdb.session() as session:
            plan = plan_deletions(session, config, _package(session, package_name), now,
                                  early_ids)
    if copy_ids is not None:
        allowed = {*copy_ids, *resumed}
        plan = [d if d.copy_id in allowed or d.action == Action.KEEP
                else replace(d, action=Action.KEEP, reason="not in this purge cycle's budget")
                for d in plan]
    kept = [d for d in plan if d.action == Action.KEEP]
    deleted = deleted_bytes = 0
    refused: list[str] = []
    for planned in plan:
        if planned.action != Action.DELETE:
            continue
        if planned.copy_id in early_ids:
            with opsdb.session() as session:
                gone = pressure_gone(session, config, planned.site, planned.location,
                                     usage=usage)
            if gone is not None:
                kept.append(replace(planned, action=Action.KEEP,
                                    reason=f"{gone}: kept for its retention age"))
                continue
        claim = _claim(opsdb, config, package_id, planned, now, run_id, early_ids, recheck)
        if isinstance(claim, _Unlooked):
            # A link or host that is down now: this purge fails, so that its re-attempt
            # looks again (a person is told if that lasts); succeeding would end the cycle.
            kept.append(claim.decision)
            failures.append(f"{planned.path}: kept for now: {'; '.join(claim.problems)}")
            continue
        if isinstance(claim, Decision):
            kept.append(claim)
            continue
        claims.track([claim.operation_id])  # live while this attempt is deleting
        try:
            size, failure, refusal = _execute(opsdb, config, claim)
        finally:
            claims.untrack([claim.operation_id])
        if failure is None:
            deleted, deleted_bytes = deleted + 1, deleted_bytes + size
        else:
            failures.append(failure)
            if refusal:
                refused.append(failure)
    return PurgeReport(package_name, deleted, deleted_bytes, kept, failures, refused)


def _resume_unfinished(opsdb: OpsDB, ssh: SshSettings, package_id: int,
                       now: datetime) -> tuple[set[int], list[str]]:
    """Finish the package's deletions abandoned after committing the certificate (see
    `claims.abandoned_deletion`), or whose unlink failed (at once); returns the copies put back
    to PRESENT (file still there) for a fresh decision, and one failure per copy whose
    storage could not be looked at (this purge fails: its re-attempt looks again). A refused
    deletion (DELETION_FAILED: the file was not the recorded one) is closed only once a person
    has taken the file away: its path empty, the copy is recorded deleted under the
    certificate that allowed it; a file still there is left to them."""
    with opsdb.session() as session:
        files = select(RawDataFile.id).where(RawDataFile.package_id == package_id)
        stuck = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status.in_(UNFINISHED),
            or_(PhysicalCopy.package_id == package_id, PhysicalCopy.raw_data_file_id.in_(files)))
            .order_by(PhysicalCopy.id)).all()
        found = []
        for copy in stuck:
            claim = session.scalars(select(Operation).where(
                Operation.copy_id == copy.id, Operation.operation_type == OperationType.DELETION)
                .order_by(Operation.id.desc()).limit(1)).first()
            if claim is None:
                continue
            why = ((claim.error or "it failed") if claim.status == OperationStatus.FAILED
                   else claims.abandoned_deletion(claim, now)
                   if claim.status == OperationStatus.IN_PROGRESS
                   else None)
            if why is not None:
                found.append((copy.id, copy.status, claim.id, claim.status, why,
                              copy.size, copy.checksum, copy.location.host,
                              Path(copy.location.root), copy.relative_path))
    resumed: set[int] = set()
    unknown: list[str] = []
    for copy_id, status, operation_id, was, failure, size, checksum, host, root, rel in found:
        path = root / rel
        refused = status == CopyStatus.DELETION_FAILED
        try:
            if host is None and root_problem(root):  # an unmounted disk is not an empty path
                raise OSError(root_problem(root))
            gone = (remote_size(ssh, Endpoint(PurePosixPath(path), host)) is None if host
                    else not _lexists(path))
        except (OSError, TransferError) as exc:  # whether the unlink happened is unknown
            if refused:  # a refused one waits for a person: no reason to fail this purge
                continue
            where = f"{host}:{path}" if host else str(path)
            unknown.append(f"{where} {DELETION_DENIED} (the unfinished deletion, operation "
                           f"{operation_id}: {exc}): {LET_IN}"
                           if isinstance(exc, PermissionError) or PERMISSION_WORDS in str(exc)
                           else f"{path}: the unfinished deletion (operation {operation_id}) "
                           f"cannot be looked at now ({exc}); a later purge looks again")
            continue
        if refused and not gone and not _recorded_bytes_at(ssh, root, host, rel, size,
                                                          checksum):
            continue  # not the recorded bytes: a person's to look at (notify, `why`)
        with opsdb.session() as session:
            finished = utcnow()
            done = OperationStatus.COMPLETED if gone else OperationStatus.FAILED
            if refused:
                error = (f"{failure}; the path was empty when a later purge looked (taken "
                         "away by hand): recorded deleted" if gone else f"{failure}; the "
                         "recorded bytes were back at the path when a later purge looked: "
                         "the copy is decided afresh")
            elif was == OperationStatus.FAILED:
                error = (f"{failure}; yet the file was gone when a later purge looked: "
                         "deleted" if gone else f"{failure}; the file is still there: the "
                         "copy is decided afresh")
            else:
                error = (f"abandoned after the unlink ({failure}); recorded by a later purge"
                         if gone else f"abandoned before the unlink ({failure}); the copy is "
                         "decided afresh")
            taken = session.execute(update(Operation).where(
                Operation.id == operation_id, Operation.status == was)
                .values(status=done, error=error, finished_at=finished,
                        bytes=size if gone else None))
            if not isinstance(taken, CursorResult) or taken.rowcount != 1:
                continue  # its process was alive after all, or another purge got there first
            ended: dict[str, Any] = ({"status": CopyStatus.DELETED, "deleted_at": finished}
                                     if gone else {"status": CopyStatus.PRESENT})
            session.execute(update(PhysicalCopy).where(
                PhysicalCopy.id == copy_id, PhysicalCopy.status == status).values(**ended))
        if not gone:
            resumed.add(copy_id)
    return resumed, unknown


def _lexists(path: Path) -> bool:
    """os.path.lexists, but a path that cannot be looked at (a directory on its way refused
    to ccat-dt's user) raises instead of reading as gone."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


PERMISSION_WORDS = "Permission denied"  # what `stat` over ssh says (LC_ALL=C or not)

LOOKED_AGAIN = "a changed source looked at again"
TAKEN_AWAY = "the path was empty (taken away by hand): decided afresh"


def taken_away(session: Session, copy_ids: Collection[int]) -> set[int]:
    """Those of `copy_ids` that a purge put back to PRESENT because their path was found
    empty (a changed source a person took away; `_look_again_at_changed_sources`), with
    nothing done to them since: OpsDB says PRESENT of an empty path on purpose, until the
    purge deciding them afresh (this one, or the next if it cannot now) records the deletion
    under its certificate. An audit meanwhile must not take them for lost."""
    if not copy_ids:
        return set()
    latest = select(func.max(Operation.id)).where(
        Operation.copy_id.in_(copy_ids)).group_by(Operation.copy_id).scalar_subquery()
    return set(session.scalars(select(Operation.copy_id).where(
        Operation.id.in_(latest), Operation.reason == LOOKED_AGAIN,
        Operation.error == TAKEN_AWAY)))


def _look_again_at_changed_sources(opsdb: OpsDB, ssh: SshSettings, package_id: int) -> set[int]:
    """A source file changed after its package was built (CORRUPT: its new bytes are in no
    archive) waits for a person, who takes it away or puts the filed bytes back, then runs
    `ccat-dt purge --package`. Either way the copy goes back to PRESENT, to be decided afresh
    under a new look (a path found empty is then recorded deleted under its certificate).
    Returns those copies; a file still changed, or a storage that cannot be looked at, stays."""
    with opsdb.session() as session:
        if session.get_one(RawDataPackage, package_id).state == PackageState.FAILED:
            return set()  # quarantined before it left: `retry --rebuild-failed` or `exclude`
        changed = [(c.id, c.size, c.checksum, c.location.host, c.location.root, c.relative_path)
                   for c in session.scalars(select(RawDataFileCopy).join(RawDataFile).where(
                       RawDataFile.package_id == package_id,
                       RawDataFileCopy.status == CopyStatus.CORRUPT)
                       .order_by(RawDataFileCopy.id))
                   if c.location.location_type == LocationType.SOURCE]
    back: set[int] = set()
    for copy_id, size, checksum, host, root, rel in changed:
        try:
            [seen] = look(str(root), host, ssh, [Wanted(rel, rehash=True)])
        except (StorageUnavailable, TransferError, OSError):
            continue
        gone = seen.problem is not None and seen.problem.startswith("missing")
        if not gone and (seen.problem is not None or seen.size != size
                         or seen.checksum != checksum):
            continue  # still not the filed bytes: the person's, as `why` says
        with opsdb.session() as session:
            now = utcnow()
            taken = session.execute(update(PhysicalCopy).where(
                PhysicalCopy.id == copy_id, PhysicalCopy.status == CopyStatus.CORRUPT)
                .values(status=CopyStatus.PRESENT))
            if not isinstance(taken, CursorResult) or taken.rowcount != 1:
                continue
            location = session.get_one(PhysicalCopy, copy_id).location_id
            session.add(Operation(
                operation_type=OperationType.VERIFICATION, status=OperationStatus.COMPLETED,
                package_id=package_id, copy_id=copy_id, destination_location_id=location,
                reason=LOOKED_AGAIN,
                error=(TAKEN_AWAY if gone else
                       "the filed bytes were back at the path: decided afresh"),
                started_at=now, finished_at=now))
        back.add(copy_id)
    return back


def _recorded_bytes_at(ssh: SshSettings, root: Path, host: str | None, relative_path: str,
                       size: int, checksum: str) -> bool:
    """Whether a refused copy's path holds the recorded copy again (a person put its bytes
    back): a regular file reached without symlinks, of the recorded size and checksum, hashed
    now. Anything else, or a storage that cannot be looked at, is not."""
    try:
        [seen] = look(str(root), host, ssh, [Wanted(relative_path, rehash=True)])
    except (StorageUnavailable, TransferError, OSError):
        return False
    return seen.problem is None and seen.size == size and seen.checksum == checksum


def certificate_problems(opsdb: OpsDB, config: Config, package_name: str) -> list[str]:
    """One message per DELETED copy of the package whose deletion is not properly certified."""
    problems: list[str] = []
    with opsdb.session() as session:
        package = _package(session, package_name)
        files = select(RawDataFile.id).where(RawDataFile.package_id == package.id)
        deleted = session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETED,
            or_(PhysicalCopy.package_id == package.id, PhysicalCopy.raw_data_file_id.in_(files)))
            .order_by(PhysicalCopy.id)).all()
        for copy in deleted:
            operations = session.scalars(select(Operation).where(
                Operation.copy_id == copy.id, Operation.operation_type == OperationType.DELETION,
                Operation.status == OperationStatus.COMPLETED).order_by(Operation.id)).all()
            found = [_operation_problem(session, config, package, copy, op) for op in operations]
            if not operations:
                problems.append(f"{copy.location.label} copy {copy.id} ({copy.relative_path}) is "
                                "DELETED without a completed deletion operation")
            elif None not in found:
                problems.append(f"{copy.location.label} copy {copy.id} ({copy.relative_path}): "
                                f"{found[-1]}")
    return problems


def _operation_problem(session: Session, config: Config, package: RawDataPackage,
                       copy: PhysicalCopy, operation: Operation) -> str | None:
    evidence = operation.evidence
    if isinstance(evidence, dict) and "superseded_by" in evidence:
        # A CORRUPT copy overwritten by its repair: the new copy took its place.
        newer = session.get(PhysicalCopy, evidence["superseded_by"])
        if (isinstance(newer, PackageCopy) and newer.location_id == copy.location_id
                and newer.package_id == package.id):
            return None
        return f"operation {operation.id} names no replacing copy at {copy.location.label}"
    if not isinstance(evidence, dict) or not isinstance(evidence.get("copies"), list):
        return f"operation {operation.id} has no deletion certificate"
    location = copy.location
    required, own_site = lta_requirement(config, location.site.short_name, location.location_type)
    recorded = evidence.get("required")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
        # Judged by the policy in force when it was decided: `required_lta_copies` raised
        # since (a third archive site) does not make an earlier, proper deletion improper.
        required = recorded
    started, sites = _aware(operation.started_at), set()
    for entry in evidence["copies"]:
        copy_id = entry.get("copy_id") if isinstance(entry, dict) else None
        lta = session.get(PhysicalCopy, copy_id) if isinstance(copy_id, int) else None
        if (not isinstance(lta, PackageCopy) or lta.package_id != package.id
                or lta.location.location_type != LocationType.LONG_TERM_ARCHIVE
                or lta.location.site.short_name != entry.get("site")):
            continue
        try:
            verified_at = _aware(datetime.fromisoformat(entry["verified_at"]))
        except (KeyError, TypeError, ValueError):
            continue
        if verified_at <= started:
            sites.add(lta.location.site.short_name)
    if len(sites) < required or (own_site is not None and own_site not in sites):
        need = f"{required} required" + (f", including {own_site}" if own_site else "")
        return (f"operation {operation.id} certifies verified LTA copies at "
                f"{len(sites)} site(s) ({', '.join(sorted(sites)) or 'none'}); {need}")
    return None

