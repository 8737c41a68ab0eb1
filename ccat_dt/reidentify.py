"""A location's disk moved by copying it (`cp -a`, `rsync -a`: sizes and mtimes kept, every
inode new): the copies OpsDB records there are told again from other files at their names.

OpsDB records per copy its identity (size, inode, mtime_ns) so that several steps can tell "our
file, unchanged" from "another file at that name" without reading it. After such a move every
recorded inode is stale, and each of those steps took the copy for another file: the repair of
a quarantined copy refused to write over it ("holds a file OpsDB does not record there", for a
person to move away, although it was the recorded copy, only moved and then damaged); the
purge re-hashed every buffer, source or staged copy there before its unlink, and every archive
copy it relies on before a deletion; staged files read as changed (`why`: the staging failed,
changed files kept for their owner) until a staging run re-hashed them all.

So when `migrate` (or `init`) records a disk move it looks at the new root first: one stat per
recorded copy, nothing hashed (a remote root: a batch per ssh round trip, no connection left
behind). A copy whose size and mtime are the recorded ones is the same file, copied: its new
inode is recorded in the transaction that records the move (compare-and-set: a copy whose
record changed meanwhile is left alone). One whose size or mtime differ (a copy that kept no
mtimes, a file changed or damaged since) or that is missing is left as recorded, for the
checks and the audit to judge by its checksum (the purge's re-check, a re-read: each records
the identity of a copy it finds intact); `migrate` says how many. An object store (S3) has no
inodes (an object's ETag and time stand for them, and a bucket copied gets new times): its
copies are left to the checks too."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from ccat_dt.config import Config
from ccat_dt.objectstore import is_object_root
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import CopyStatus, DataLocation, PhysicalCopy, Site
from ccat_dt.storage import StorageUnavailable, Wanted, look
from ccat_dt.transports.factory import ssh_settings

LOG = logging.getLogger(__name__)

PAGE = 5000  # copies read from OpsDB at a time (a remote look sends them in chunks that fit)


@dataclass
class Moved:
    """A location the configuration moves to another root or host, as looked at there."""

    location_id: int
    label: str
    old: str  # where OpsDB records it, as shown
    root: str  # where the configuration puts it
    host: str | None
    # The copies found there as recorded (same size and mtime), each with the inode it has
    # there: (copy id, size, mtime_ns, recorded inode, inode now).
    same: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    skipped: str | None = None  # why its copies were not looked at (or not all)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.root}" if self.host else self.root


def _shown(root: str, host: str | None) -> str:
    return f"{host}:{root}" if host else root


def _moves(session: Session, config: Config) -> list[Moved]:
    """The recorded locations the configuration gives another root or host (a disk move),
    keeping their type (a location changing type is refused by `migrate`)."""
    recorded = {(row.site.short_name, row.name): row for row in session.scalars(
        select(DataLocation).join(Site))}
    out = []
    for site in config.settings.sites:
        for location in site.locations:
            row = recorded.get((site.short_name, location.name))
            root = config.location_root(location)
            if row is None or row.location_type != location.type or (
                    (row.root, row.host) == (root, location.host)):
                continue
            out.append(Moved(row.id, row.label, _shown(row.root, row.host), root, location.host))
    return out


def look_at_new_roots(opsdb: OpsDB, config: Config) -> list[Moved]:
    """Each location the configuration moves, with its recorded copies looked at (a stat, no
    hashing) at its new root: those that have their recorded size and mtime there. Read
    before `migrate`'s transaction (no lock is held while the disks are looked at); recorded
    in it (`record`). A root that cannot be looked at now leaves its copies as recorded."""
    with opsdb.session() as session:
        moves = _moves(session, config)
    # A set-up command: no shared ssh connection is left behind (as the markers are read).
    ssh = replace(ssh_settings(config), control_persist_s=0)
    for moved in moves:
        if is_object_root(moved.root):
            moved.skipped = ("an object store has no inodes: its copies are judged by their "
                             "checksums when next checked")
            continue
        after = 0
        while True:
            with opsdb.session() as session:
                page = [(id_, path, size, mtime, inode) for id_, path, size, mtime, inode in
                        session.execute(select(
                            PhysicalCopy.id, PhysicalCopy.relative_path, PhysicalCopy.size,
                            PhysicalCopy.mtime_ns, PhysicalCopy.inode).where(
                            PhysicalCopy.location_id == moved.location_id,
                            PhysicalCopy.status != CopyStatus.DELETED,
                            PhysicalCopy.inode.is_not(None), PhysicalCopy.mtime_ns.is_not(None),
                            PhysicalCopy.id > after).order_by(PhysicalCopy.id).limit(PAGE))]
            if not page:
                break
            after = page[-1][0]
            try:
                seen = look(moved.root, moved.host, ssh,
                            [Wanted(path, rehash=False) for _, path, *_ in page], moved.label)
                moved.same += [(id_, size, mtime, inode, found.inode)
                               for (id_, _, size, mtime, inode), found
                               in zip(page, seen, strict=True)
                               if found.problem is None and found.inode is not None
                               and (found.size, found.mtime_ns) == (size, mtime)]
            except StorageUnavailable as exc:
                moved.skipped = (f"its new root could not be looked at ({exc}): its copies are "
                                 "judged by their checksums when next checked")
                break
    return moves


def record(session: Session, moves: list[Moved]) -> list[str]:
    """In `migrate`'s transaction, once the moves are recorded: the new inode of each copy
    found there as recorded, unless its record changed since it was looked at
    (compare-and-set); one line per location saying what was re-identified and what not."""
    notes = []
    copy = PhysicalCopy
    change = (update(copy).where(
        copy.id == bindparam("copy_id"), copy.location_id == bindparam("location"),
        copy.status != CopyStatus.DELETED, copy.size == bindparam("was_size"),
        copy.mtime_ns == bindparam("was_mtime"), copy.inode == bindparam("was_inode"))
        .values(inode=bindparam("now_inode")))
    for moved in moves:
        row = session.get(DataLocation, moved.location_id)
        if row is None or (row.root, row.host) != (moved.root, moved.host):
            continue  # not moved there by this transaction after all
        known = session.scalar(select(func.count(PhysicalCopy.id)).where(
            PhysicalCopy.location_id == moved.location_id,
            PhysicalCopy.status != CopyStatus.DELETED,
            PhysicalCopy.inode.is_not(None), PhysicalCopy.mtime_ns.is_not(None))) or 0
        if not known:
            continue
        done = 0
        for start in range(0, len(moved.same), PAGE):
            chunk = moved.same[start:start + PAGE]
            current = {id_: (size, mtime, inode, location, status)
                       for id_, size, mtime, inode, location, status in session.execute(select(
                           PhysicalCopy.id, PhysicalCopy.size, PhysicalCopy.mtime_ns,
                           PhysicalCopy.inode, PhysicalCopy.location_id, PhysicalCopy.status)
                           .where(PhysicalCopy.id.in_([c[0] for c in chunk])))}
            still = [c for c in chunk if current.get(c[0]) is not None
                     and current[c[0]][:4] == (c[1], c[2], c[3], moved.location_id)
                     and current[c[0]][4] != CopyStatus.DELETED]
            changed = [{"copy_id": id_, "location": moved.location_id, "was_size": size,
                        "was_mtime": mtime, "was_inode": was, "now_inode": now}
                       for id_, size, mtime, was, now in still if was != now]
            if changed:
                session.connection().execute(change, changed)
            done += len(still)
        left = max(known - done, 0)
        copies = f"{done} cop{'y' if done == 1 else 'ies'}"
        note = (f"location {moved.label} moved from {moved.old} to {moved.where}: {copies} "
                "re-identified there (the same size and mtime)")
        if moved.skipped is not None:
            note += f"; {left} not looked at: {moved.skipped}"
        elif left:
            note += (f"; {left} could not be (another size or mtime, or missing: a copy that "
                     "kept no mtimes, or a file changed since): each is judged by its "
                     "checksum when next checked (the scrub, the purge's look, the audit)")
        notes.append(note)
        (LOG.warning if left else LOG.info)("%s", note)
    return notes
