"""The filing service's durable journal: a local SQLite file in WAL mode with synchronous=FULL.

A request is acknowledged only after its entry is committed (fsync'ed), so it survives kill -9
and a power cut; the drainer applies entries to OpsDB in `seq` order and marks them applied or
dead. SQLite needs no daemon whose persistence must itself be configured and monitored (unlike
Redis AOF), and one file is easy to back up and inspect with `sqlite3`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ccat_dt.service.tokens import TokenInfo

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,               -- start, files, finish
    observation TEXT NOT NULL,
    payload TEXT NOT NULL,            -- what the drainer applies (JSON)
    response TEXT NOT NULL,           -- the acknowledgement the client got (JSON)
    token_name TEXT,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending, applied, dead, discarded
    accepted_at REAL NOT NULL,
    applied_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX IF NOT EXISTS entries_state ON entries (state, seq);
CREATE INDEX IF NOT EXISTS entries_observation ON entries (observation, seq);
CREATE TABLE IF NOT EXISTS files (
    uuid TEXT PRIMARY KEY,
    seq INTEGER NOT NULL REFERENCES entries (seq) ON DELETE CASCADE,
    location TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_path ON files (location, path);
CREATE TABLE IF NOT EXISTS tokens (   -- last known tokens, so auth works while OpsDB is away
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    site TEXT NOT NULL,
    instruments TEXT NOT NULL,
    revoked INTEGER NOT NULL
);
"""


class JournalConflict(Exception):
    """A request id reused for a different request."""


class JournalInUse(Exception):
    """Another `ccat-dt serve` has this journal."""


def hold(path: Path) -> TextIO:
    """Lock the journal for this service (a lock file beside it, let go when the process ends,
    kill -9 included): two services on one journal would each drain it, side by side."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = (path.parent / f"{path.name}.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "pid unknown"
        lock.close()
        raise JournalInUse(f"the filing journal {path} is in use by another `ccat-dt serve` "
                           f"({holder}); stop that one first, or give this one its own "
                           "--journal") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


@dataclass(frozen=True)
class Entry:
    seq: int
    request_id: str
    kind: str
    observation: str
    payload: dict[str, Any]
    response: dict[str, Any]
    token_name: str | None
    state: str
    accepted_at: float
    applied_at: float | None
    attempts: int
    error: str | None

    def summary(self) -> dict[str, Any]:
        files = self.payload.get("files")
        return {"seq": self.seq, "request_id": self.request_id, "kind": self.kind,
                "observation": self.observation, "state": self.state,
                "files": len(files) if isinstance(files, list) else None,
                "accepted_at": self.accepted_at, "attempts": self.attempts, "error": self.error}


@dataclass(frozen=True)
class JournalFile:
    uuid: str
    seq: int
    location: str
    path: str
    size: int
    checksum: str
    state: str


class Journal:
    """One SQLite connection shared by the request threads and the drainer, behind a lock
    (writes are serialised by SQLite anyway; reads are short)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._lock = threading.RLock()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back itself on a full disk
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._db.execute(sql, args)
            cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    # --- entries -------------------------------------------------------------------------

    def find(self, request_id: str) -> Entry | None:
        rows = self._rows("SELECT * FROM entries WHERE request_id = ?", (request_id,))
        return _entry(rows[0]) if rows else None

    def append(self, *, request_id: str, kind: str, observation: str, payload: dict[str, Any],
               response: dict[str, Any], token_name: str | None,
               files: Sequence[tuple[str, str, str, int, str]] = (),
               applied: bool = False) -> tuple[Entry, bool]:
        """Commit one entry (and the files it files: uuid, location, path, size, checksum);
        returns it and whether it was there already (a retried request). A file an earlier
        entry holds under the same uuid and path (the same file filed again) is not added twice;
        a uuid an earlier entry holds for another path is a conflict. `applied`: a request
        applied to OpsDB directly, kept so that its retries get its answer."""
        with self._tx() as db:
            old = db.execute("SELECT seq, kind, observation, payload FROM entries "
                             "WHERE request_id = ?", (request_id,)).fetchone()
            if old is not None:
                if (old[1], old[2], json.loads(old[3])) != (kind, observation, payload):
                    raise JournalConflict(f"request id {request_id} was used before for another "
                                          f"request ({old[1]} of '{old[2]}'); use a new id")
            else:
                cursor = db.execute(
                    "INSERT INTO entries (request_id, kind, observation, payload, response, "
                    "token_name, state, accepted_at, applied_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                    "?)",
                    (request_id, kind, observation, json.dumps(payload), json.dumps(response),
                     token_name, "applied" if applied else "pending", time.time(),
                     time.time() if applied else None))
                try:
                    db.executemany(
                        "INSERT INTO files (uuid, seq, location, path, size, checksum) "
                        "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM files "
                        "WHERE uuid = ? AND location = ? AND path = ?)",
                        [(u, cursor.lastrowid, loc, p, s, c, u, loc, p)
                         for u, loc, p, s, c in files])
                except sqlite3.IntegrityError:
                    raise JournalConflict("a file uuid of this request is already used by an "
                                          "earlier request; give new uuids or none") from None
        found = self.find(request_id)
        assert found is not None
        return found, old is not None

    def next_pending(self, limit: int = 1) -> list[Entry]:
        """The oldest pending entries, in order."""
        return [_entry(r) for r in self._rows(
            "SELECT * FROM entries WHERE state = 'pending' ORDER BY seq LIMIT ?", (limit,))]

    def mark_applied(self, seqs: Sequence[int]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE entries SET state = 'applied', applied_at = ?, error = NULL, "
                           "attempts = attempts + 1 WHERE seq = ?",
                           [(time.time(), seq) for seq in seqs])

    def mark(self, seq: int, state: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE entries SET state = ?, applied_at = ?, error = ?, "
                       "attempts = attempts + 1 WHERE seq = ?", (state, time.time(), error, seq))

    def note_attempt(self, seq: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE entries SET attempts = attempts + 1, error = ? WHERE seq = ?",
                       (error, seq))

    def pending(self) -> tuple[int, float | None]:
        """How many entries wait, and the age in seconds of the oldest."""
        rows = self._rows("SELECT count(*), min(accepted_at) FROM entries WHERE state='pending'")
        count, oldest = rows[0][0], rows[0][1]
        return int(count), (time.time() - oldest if oldest is not None else None)

    def get(self, seq: int) -> Entry | None:
        rows = self._rows("SELECT * FROM entries WHERE seq = ?", (seq,))
        return _entry(rows[0]) if rows else None

    def retry(self, seq: int) -> Entry:
        """A dead letter goes back to pending (its cause fixed); the drainer applies it next,
        before newer entries, as its place in the order says."""
        return self._settle(seq, "pending", None)

    def discard(self, seq: int, reason: str) -> Entry:
        """A dead letter is given up on by a person; kept, with the reason, for the record."""
        return self._settle(seq, "discarded", f"discarded: {reason} (was: {{error}})")

    def _settle(self, seq: int, state: str, error: str | None) -> Entry:
        with self._tx() as db:
            row = db.execute("SELECT state, error FROM entries WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                raise KeyError(f"no journal entry #{seq} in {self.path}")
            if row[0] != "dead":
                raise ValueError(f"journal entry #{seq} is {row[0]}, not a dead letter; only "
                                 "dead letters can be retried or discarded")
            db.execute("UPDATE entries SET state = ?, error = ? WHERE seq = ?",
                       (state, error.format(error=row[1]) if error else None, seq))
        found = self.get(seq)
        assert found is not None
        return found

    def dead_letters(self, limit: int = 50) -> tuple[int, list[Entry]]:
        count = self._rows("SELECT count(*) FROM entries WHERE state = 'dead'")[0][0]
        rows = self._rows("SELECT * FROM entries WHERE state = 'dead' ORDER BY seq LIMIT ?",
                          (limit,))
        return int(count), [_entry(r) for r in rows]

    def of_observation(self, observation: str) -> list[Entry]:
        return [_entry(r) for r in self._rows(
            "SELECT * FROM entries WHERE observation = ? AND state != 'applied' ORDER BY seq",
            (observation,))]

    def started(self, observation: str) -> str | None:
        """The uuid the latest start of this observation was answered with (buffered or
        applied), so that another start gets the same one."""
        rows = self._rows("SELECT response FROM entries WHERE observation = ? AND kind = 'start' "
                          "AND state IN ('pending', 'applied') ORDER BY seq DESC LIMIT 1",
                          (observation,))
        return str(json.loads(rows[0][0])["uuid"]) if rows else None

    def finished(self, observation: str) -> bool:
        """A finish of this observation was accepted (buffered or already applied)."""
        return bool(self._rows("SELECT 1 FROM entries WHERE observation = ? AND kind = 'finish' "
                               "AND state IN ('pending', 'applied') LIMIT 1", (observation,)))

    def counts(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._rows(
            "SELECT state, count(*) FROM entries GROUP BY state")}

    def prune(self, applied_before: float) -> int:
        """Forget applied entries older than this (OpsDB has them); dead ones stay."""
        with self._tx() as db:
            return db.execute("DELETE FROM entries WHERE state = 'applied' AND applied_at < ?",
                              (applied_before,)).rowcount

    # --- files ---------------------------------------------------------------------------

    def file(self, uuid: str) -> JournalFile | None:
        rows = self._rows("SELECT f.*, e.state FROM files f JOIN entries e USING (seq) "
                          "WHERE f.uuid = ?", (uuid,))
        return _file(rows[0]) if rows else None

    def files_at(self, location: str, paths: Sequence[str]) -> dict[str, JournalFile]:
        """Files not dead-lettered or discarded that a journal entry files at these paths."""
        found: dict[str, JournalFile] = {}
        for start in range(0, len(paths), 500):
            chunk = list(paths[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for row in self._rows(
                    f"SELECT f.*, e.state FROM files f JOIN entries e USING (seq) WHERE "
                    f"f.location = ? AND f.path IN ({marks}) AND e.state IN ('pending', 'applied')",
                    (location, *chunk)):
                found[row["path"]] = _file(row)
        return found

    # --- tokens --------------------------------------------------------------------------

    def store_tokens(self, tokens: Sequence[TokenInfo]) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM tokens")
            db.executemany("INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                           [(t.token_hash, t.name, t.site, json.dumps(list(t.instruments)),
                             int(t.revoked_at is not None)) for t in tokens])

    def load_tokens(self) -> list[tuple[TokenInfo, bool]]:
        """(token, revoked) as last seen in OpsDB."""
        return [(TokenInfo(r["name"], r["token_hash"], r["site"],
                           tuple(json.loads(r["instruments"]))), bool(r["revoked"]))
                for r in self._rows("SELECT * FROM tokens")]


def _entry(row: sqlite3.Row) -> Entry:
    return Entry(row["seq"], row["request_id"], row["kind"], row["observation"],
                 json.loads(row["payload"]), json.loads(row["response"]), row["token_name"],
                 row["state"], row["accepted_at"], row["applied_at"], row["attempts"],
                 row["error"])


def _file(row: sqlite3.Row) -> JournalFile:
    return JournalFile(row["uuid"], row["seq"], row["location"], row["path"], row["size"],
                       row["checksum"], row["state"])
