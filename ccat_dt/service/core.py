"""The filing service without HTTP: authorise, validate with the CLI's filing code, then apply
to OpsDB at once or, while OpsDB is out of reach (or older requests still wait), commit to the
journal and acknowledge; a drainer thread applies the journal in order, exactly once.

Exactly once: each applied request writes its id into OpsDB's `api_requests` in the same
transaction as its effect, and the drainer skips an entry whose id is already there (the
service was killed between the OpsDB commit and marking the entry applied).

Speed: a request is one OpsDB transaction of a few statements whatever its number of files
(filing.record_checked inserts many rows per statement); the drainer applies up to
DRAIN_BATCH entries in one transaction (the observations they touch locked first, by name:
two services draining the same observations never deadlock), consecutive file requests of
one observation and module as one, and falls back to one entry at a time when the batch is
refused, so that only the entry at fault becomes a dead letter.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.orm import Session

from ccat_dt.config import Config, ConfigError
from ccat_dt.filing import (
    CheckedFile,
    FileSpec,
    FilingError,
    check_files,
    check_module,
    check_observation_name,
    finish_in,
    lock_observations,
    record_checked,
    source_from_config,
    start_in,
    started_with_another_uuid,
)
from ccat_dt.opsdb.database import (
    OpsDB,
    SchemaOutOfDate,
    check_schema,
    conflict_of,
    lock_timed_out,
    lock_timeout_s,
    statement_canceled,
    takes_no_writes,
    wait_for_locks_at_most,
)
from ccat_dt.opsdb.models import (
    ApiRequest,
    ExecutedObsUnit,
    FilingDeadLetter,
    RawDataFile,
    RawDataPackage,
    new_uuid,
    utcnow,
)
from ccat_dt.service.journal import Entry, Journal, JournalConflict, hold
from ccat_dt.service.tokens import TokenInfo, hash_token, list_tokens

log = logging.getLogger("ccat_dt.service")
LINK_ERRORS = (OperationalError, InterfaceError, DisconnectionError, SchemaOutOfDate)
DRAIN_BATCH = 100  # journal entries applied in one OpsDB transaction
SCHEMA_EVERY_S = 5.0  # how often the OpsDB's schema is looked at again
CONFLICT_ATTEMPTS = 5  # a transaction PostgreSQL aborts for a conflict is run again at once
# A request waits at most this long for a lock another session holds (an operator's psql
# idle in transaction, a VACUUM FULL), then is journaled (a read answered 503): the client is
# answered at once, and the drainer waits the lock out (lock_timeout) without holding it up.
# The service's connections' own lock_timeout on PostgreSQL: no statement of its own per
# request.
DIRECT_LOCK_WAIT_S = 2.0
T = TypeVar("T")


class Unreachable(Exception):
    """OpsDB cannot be reached right now; the request goes to the journal."""


class Contended(Exception):
    """OpsDB is reachable but did not apply the request now: it aborted the transaction
    CONFLICT_ATTEMPTS times in a row for a conflict with concurrent ones (a deadlock with
    another filing service or a command), or a lock another session holds was waited for
    (55P03: lock_timeout, DIRECT_LOCK_WAIT_S for a request applied at once). The request
    goes to (or stays in) the journal, the drainer applies it at its next step; a read is
    answered 503 (retry)."""


class JournalUnavailable(Exception):
    """The journal cannot be written (its disk full or read-only): nothing was stored, so the
    request is not acknowledged; the client retries (503)."""


class AuthError(Exception):
    """No valid token (401) or a token not allowed to do this (403)."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field = status, field


@dataclass(frozen=True)
class Ack:
    status: int  # 201 applied, 202 journaled, 200 a replayed request
    body: dict[str, Any]


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def _uuid(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise FilingError(f"{field} {value!r} is not a UUID", [(field, "not a UUID")]) from None


class FilingService:
    def __init__(self, config: Config, *, site: str | None = None,
                 journal_path: str | None = None) -> None:
        self.config = config
        settings = config.settings.service
        self.site = site or settings.site or config.settings.observatory
        try:
            config.settings.site(self.site)
        except ValueError as exc:
            raise ConfigError(f"{config.path}: service.site: {exc}") from None
        path = config.resolve_root(journal_path or settings.journal)
        self._held = hold(path)  # this service's journal: a second one refuses to start
        self.journal = Journal(path)
        url = make_url(config.opsdb_url)
        if url.get_backend_name() == "postgresql":  # fail fast on a dead link, never hang
            # (a path gone silent later: the OpsDB engine's keepalives, PG_LINK_TIMEOUT_S)
            url = url.update_query_dict({
                "connect_timeout": str(settings.opsdb_connect_timeout_s), **url.query})
        self._url = url.render_as_string(hide_password=False)
        self._opsdb: OpsDB | None = None
        # How long a request waits for a lock. An SQLite OpsDB keeps its whole busy timeout:
        # its "database is locked" is not told from a lost file (journaled as unreachable).
        self._lock_wait_s = (min(DIRECT_LOCK_WAIT_S, lock_timeout_s())
                             if url.get_backend_name() == "postgresql" else lock_timeout_s())
        self._schema_at = 0.0  # when the OpsDB's schema was last found to be this code's
        # Requests one at a time: each either applied at once, only while the journal holds
        # none pending (so never before an older one), or journaled. The drainer applies
        # journaled entries without it: waiting for OpsDB (a lock, a slow link) it holds up no
        # request, and no request is applied at once while its entries are pending.
        self._write = threading.Lock()
        self.reachable = False
        self.last_error: str | None = "not contacted yet"
        self.last_contact: datetime | None = None
        self._retry_at = 0.0
        self._backoff = 0.25
        self._tokens = {t.token_hash: (t, revoked) for t, revoked in self.journal.load_tokens()}
        self._tokens_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0  # journal entries the drainer applied, their files, and the time
        self.applied_files = 0  # it spent applying: the drain rate /health reports
        self.drain_busy_s = 0.0
        self.conflicts = 0  # transactions OpsDB aborted for a conflict, run again at once
        self.lock_timeouts = 0  # statements that gave up a lock another session held
        self.contention: str | None = None  # why requests wait now, OpsDB being reachable
        self._mirrored: set[str] | None = None  # dead letters last copied into OpsDB
        self.journal_error: str | None = None  # the last journal write failed: why

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drain_forever, name="journal-drainer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._opsdb is not None:
            self._opsdb.dispose()
        self.journal.close()
        self._held.close()

    # --- OpsDB access --------------------------------------------------------------------

    def _call(self, action: Callable[[OpsDB], T], *, lock_wait_s: float | None = None) -> T:
        """Run against OpsDB; a lost link marks it unreachable and raises Unreachable.
        `lock_wait_s`: how long `action` lets a lock be waited for, when not the service's
        connections' own (DIRECT_LOCK_WAIT_S)."""
        try:
            if self._opsdb is None:
                self._opsdb = OpsDB(self._url, lock_wait_s=self._lock_wait_s)
                self._schema_at = time.monotonic()
            elif time.monotonic() - self._schema_at > SCHEMA_EVERY_S:
                # A `migrate` by a newer ccat-dt under this long-lived process: journal (its
                # models would write the old schema's rows) until it is upgraded and restarted.
                check_schema(self._opsdb.engine)
                self._schema_at = time.monotonic()
            result = self._retrying(action, self._opsdb)
        except Contended as exc:
            self._up(contention=str(exc))
            raise
        except LINK_ERRORS as exc:
            if lock_timed_out(exc):
                raise self._lock_timeout(exc, lock_wait_s or self._lock_wait_s) from None
            if statement_canceled(exc):
                raise self._canceled(exc) from None
            self._down(exc)
            raise Unreachable(str(exc)) from None
        except DBAPIError as exc:
            # A server that accepts only reads: out of reach for writes, journaled like a lost
            # link, the pool's connections (perhaps to a demoted primary) thrown away. Before,
            # the request failed (500, nothing stored) and the drainer's traceback repeated
            # each second, its pool kept on the read-only server, until a restart by a person.
            if not takes_no_writes(exc):
                raise
            self._down(exc)
            raise Unreachable(str(exc)) from None
        self._up()
        return result

    def _lock_timeout(self, exc: BaseException, waited_s: float) -> Contended:
        """A lock another session holds (an `idle in transaction` psql, a LOCK TABLE, a
        VACUUM FULL, a command stopped mid-transaction) waited for `waited_s`: contention
        with a live server, not a lost link. Not run again at once, as a conflict is: each
        attempt would wait again while the client waits; the request is journaled and the
        drainer tries again at each step (no back-off), waiting lock_timeout for the lock
        without holding up requests, and applies it once the lock is let go. Before, it was
        "OpsDB unreachable": said so on the log and /health, the pool thrown away, the
        entries left to the back-off."""
        self.lock_timeouts += 1
        return self._busy(f"waited {waited_s:g} s for a lock another session holds ("
                          f"{_first_line(getattr(exc, 'orig', exc)) or 'lock not available'}); "
                          "pg_locks and pg_stat_activity name that session")

    def _canceled(self, exc: BaseException) -> Contended:
        """The server cancelled the statement (a statement_timeout, a pg_cancel_backend): it
        is live, and the request is journaled and tried again at each drainer step, as in
        contention. Before, it was "OpsDB unreachable": the pool thrown away, the entries
        left to the back-off, /health saying the server could not be reached."""
        return self._busy(f"the server cancelled the statement ("
                          f"{_first_line(getattr(exc, 'orig', exc))}): a statement_timeout set "
                          "for this role or database, or pg_cancel_backend")

    def _busy(self, why: str) -> Contended:
        if self.contention is None:
            log.warning("OpsDB busy, requests stay in the journal and are tried again at each "
                        "drainer step: %s", why)
        self._up(contention=why)
        return Contended(why)

    def _retrying(self, action: Callable[[OpsDB], T], db: OpsDB) -> T:
        """`action`, run again at once when PostgreSQL aborts its transaction for a conflict
        with a concurrent one (deadlock detected, serialization failure): a conflict, not a
        lost link; the transaction was rolled back whole, so running it again is safe. Before,
        it was taken for "OpsDB unreachable": said so on the log and /health, and the
        journaled request waited out the unreachable back-off."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return action(db)
            except OperationalError as exc:
                conflict = conflict_of(exc)
                if conflict is None:
                    raise
                self.conflicts += 1
                why = _first_line(exc.orig) or conflict
                if attempt == CONFLICT_ATTEMPTS:
                    log.warning("OpsDB aborted a transaction %d times in a row for a conflict "
                                "with concurrent transactions (%s); the request stays in the "
                                "journal: %s", attempt, conflict, why)
                    raise Contended(f"{conflict} {attempt} times in a row: {why}") from None
                log.warning("OpsDB aborted a transaction for a conflict with a concurrent one "
                            "(%s), running it again at once (attempt %d of %d): %s", conflict,
                            attempt + 1, CONFLICT_ATTEMPTS, why)
        raise AssertionError("unreachable")

    def _up(self, contention: str | None = None) -> None:
        """OpsDB answered; `contention`: but did not apply the request now (Contended)."""
        if contention is None and self.contention is not None:
            log.info("OpsDB busy no more: a transaction went through (%d lock timeouts, %d "
                     "conflicts so far)", self.lock_timeouts, self.conflicts)
        self.contention = contention
        self.reachable, self.last_error, self._backoff = True, None, 0.25
        self.last_contact = utcnow()

    def _down(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self.reachable:
            log.warning("OpsDB unreachable, journaling requests: %s", first)
        self.reachable, self.last_error = False, first
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 10.0)
        if self._opsdb is not None:
            self._opsdb.engine.dispose()  # no half-dead pooled connections after the link returns

    @staticmethod
    def _marker(session: Session, entry_or_id: Entry | str, kind: str = "",
                observation: str = "", token: str | None = None) -> None:
        """Record a request as applied, in the transaction that applies it."""
        if isinstance(entry_or_id, Entry):
            entry = entry_or_id
            session.add(ApiRequest(
                request_id=entry.request_id, kind=entry.kind, observation=entry.observation,
                token_name=entry.token_name,
                accepted_at=datetime.fromtimestamp(entry.accepted_at, UTC)))
        elif session.get(ApiRequest, entry_or_id) is None:
            session.add(ApiRequest(request_id=entry_or_id, kind=kind, observation=observation,
                                   token_name=token, accepted_at=utcnow()))

    @staticmethod
    def _execute(session: Session, kind: str, payload: dict[str, Any],
                 files: list[CheckedFile] | None = None) -> dict[str, Any]:
        if kind == "start":
            started = start_in(session, payload["name"], payload["uuid"],
                               uuid_given=payload.get("uuid_given", False))
            return {"uuid": started.uuid, "changed": started.created}
        if kind == "finish":
            earlier = finish_in(session, payload["name"])
            return {"changed": True} if earlier is None else {"changed": False,
                                                              "finished_at": _iso(earlier)}
        result = record_checked(
            session, observation=payload["observation"], module=payload["module"],
            site=payload["site"], location=payload["location"],
            files=files if files is not None else [CheckedFile(**f) for f in payload["files"]])
        return {"filed": result.filed, "unchanged": result.unchanged, "bytes": result.bytes,
                "uuids": result.uuids}

    # --- tokens --------------------------------------------------------------------------

    def _refresh_tokens(self) -> None:
        tokens = self._call(list_tokens)
        self._tokens = {t.token_hash: (t, t.revoked_at is not None) for t in tokens}
        self._tokens_at = time.monotonic()
        self.journal.store_tokens(tokens)

    def authenticate(self, secret: str | None) -> TokenInfo:
        if not secret:
            raise AuthError(401, "Authorization", "no token: send 'Authorization: Bearer TOKEN' "
                            "(an operator creates one with `ccat-dt token create`)")
        digest = hash_token(secret)
        found = self._tokens.get(digest)
        now = time.monotonic()
        if found is None and now >= self._retry_at and now - self._tokens_at > 1.0:
            with contextlib.suppress(Unreachable, Contended):  # a token created since then
                self._refresh_tokens()
            found = self._tokens.get(digest)
        if found is None:
            raise AuthError(401, "Authorization", "unknown token")
        token, revoked = found
        if revoked:
            raise AuthError(401, "Authorization", f"token '{token.name}' has been revoked")
        if token.site != self.site:
            raise AuthError(403, "Authorization", f"token '{token.name}' is for site "
                            f"'{token.site}'; this service files at site '{self.site}'")
        return token

    # --- writes --------------------------------------------------------------------------

    def start_observation(self, token: TokenInfo, name: str, uuid: str | None = None,
                          request_id: str | None = None) -> Ack:
        check_observation_name(name)
        obs_uuid = _uuid(uuid, "uuid")
        rid = request_id or new_uuid()

        def journal_body() -> dict[str, Any]:
            known = self.journal.started(name)  # started before, buffered or applied
            if known is not None and obs_uuid not in (None, known):
                raise started_with_another_uuid(name, known)
            if self.journal.finished(name):
                raise FilingError(f"observation '{name}' is finished; it cannot be restarted, "
                                  "use a new name", [("name", "observation finished")],
                                  conflict=True)
            return {"uuid": known or obs_uuid or new_uuid()}

        return self._submit(token, rid, "start", name,
                            {"name": name, "uuid": obs_uuid, "uuid_given": obs_uuid is not None},
                            journal_body, {"name": name})

    def finish_observation(self, token: TokenInfo, name: str,
                           request_id: str | None = None) -> Ack:
        check_observation_name(name)
        return self._submit(token, request_id or new_uuid(), "finish", name, {"name": name},
                            lambda: {}, {"name": name})

    def file(self, token: TokenInfo, *, observation: str, module: str, files: list[FileSpec],
             site: str | None = None, location: str | None = None,
             request_id: str | None = None) -> Ack:
        try:
            check_observation_name(observation)
        except FilingError as exc:
            raise FilingError(str(exc), [("observation", "invalid observation name")]) from None
        instrument = check_module(self.config, module)
        if (site or self.site) != token.site:
            raise AuthError(403, "site", f"token '{token.name}' may file at site '{token.site}' "
                            f"only, not '{site}'")
        if not token.allows_instrument(instrument):
            raise AuthError(403, "module", f"token '{token.name}' may file for "
                            f"{', '.join(token.instruments)} only, not {instrument}")
        if not files:
            raise FilingError("no files given", [("files", "empty")])
        specs = [FileSpec(f.path, f.size, f.checksum, _uuid(f.uuid, f"files[{i}].uuid"))
                 for i, f in enumerate(files)]
        source = source_from_config(self.config, site or self.site, location)
        if request_id is not None and (entry := self.journal.find(request_id)) is not None:
            return self._replay(entry)  # a retry: no need to hash the files again
        checked = check_files(source, specs, observation)  # the CLI's checks, outside the lock
        site_name, location_name = source.label.split("/", 1)
        files_payload: list[dict[str, Any]] = [
            {"path": c.path, "size": c.size, "checksum": c.checksum, "uuid": c.uuid}
            for c in checked]

        def journal_body() -> dict[str, Any]:
            if self.journal.finished(observation):
                raise FilingError(f"observation '{observation}' is finished; no files can be "
                                  "added to it", [("observation", "observation finished")],
                                  conflict=True)
            known = self.journal.files_at(source.label, [c.path for c in checked])
            problems = []
            for index, c in enumerate(checked):
                old = known.get(c.path)
                if old is not None and (old.checksum, old.size) != (c.checksum, c.size):
                    problems.append((f"files[{index}].checksum",
                                     f"'{c.path}' was accepted before with checksum "
                                     f"{old.checksum}, size {old.size}"))
                elif old is not None and c.uuid is None:
                    files_payload[index]["uuid"] = old.uuid
                files_payload[index]["uuid"] = files_payload[index]["uuid"] or new_uuid()
            if problems:
                raise FilingError(f"observation '{observation}': " + "; ".join(
                    m for _, m in problems) + "; nothing was filed", problems, conflict=True)
            return {"uuids": {f["path"]: f["uuid"] for f in files_payload}}

        payload = {"observation": observation, "module": module, "site": site_name,
                   "location": location_name, "files": files_payload}
        return self._submit(token, request_id or new_uuid(), "files", observation, payload,
                            journal_body, {"observation": observation, "module": module,
                                           "location": source.label, "count": len(checked)},
                            files=checked)

    def _submit(self, token: TokenInfo, rid: str, kind: str, observation: str,
                payload: dict[str, Any], journal_body: Callable[[], dict[str, Any]],
                base: dict[str, Any], files: list[CheckedFile] | None = None) -> Ack:
        with self._write:
            entry = self.journal.find(rid)
            if entry is not None:
                return self._replay(entry)
            pending, _ = self.journal.pending()
            if pending == 0 and self.reachable:
                def direct(session: Session) -> dict[str, Any]:
                    result = self._execute(session, kind, payload, files)
                    self._marker(session, rid, kind, observation, token.name)
                    return result

                try:
                    result = self._call(lambda db: _transaction(db, kind, payload, direct))
                except Unreachable:  # the drainer finds the marker if it did commit
                    reason = f"OpsDB unreachable: {self.last_error}"
                except Contended as exc:
                    reason = f"OpsDB busy: {exc}"
                else:
                    # a start of an observation open already, a finish of one finished
                    # already (before, or by another at that moment) changed nothing: 200,
                    # "already open" or "already finished", as the CLI says
                    changed = result.pop("changed", True)
                    status = {"start": "started" if changed else "already open",
                              "finish": "finished" if changed else "already finished",
                              "files": "filed"}[kind]
                    response = {**base, **result, "request_id": rid, "status": status}
                    self._remember(token, rid, kind, observation, payload, response)
                    return Ack(201 if changed else 200, response)
            else:
                reason = (f"OpsDB busy: {self.contention}" if self.contention is not None
                          else f"OpsDB unreachable: {self.last_error}" if not self.reachable
                          else "the drainer is applying them")
                if pending:
                    reason = f"{pending} older requests wait in the journal; {reason}"
            extra = journal_body()
            if kind == "start":
                payload = {**payload, "uuid": extra["uuid"]}
            response = {**base, **extra, "request_id": rid, "status": "buffered",
                        "reason": reason}
            try:
                entry, replayed = self._append(token, rid, kind, observation, payload, response)
            except JournalConflict as exc:
                raise FilingError(str(exc), [("request_id", str(exc))], conflict=True) from None
            except sqlite3.Error as exc:
                if self.journal_error is None:
                    log.error("filing journal %s cannot be written, requests refused with 503: "
                              "%s", self.journal.path, exc)
                self.journal_error = f"cannot be written: {exc}"
                raise JournalUnavailable(f"the filing journal cannot be written ({exc}) while "
                                         "OpsDB is out of reach: nothing was stored; retry "
                                         "later") from None
            self.journal_error = None
        self._wake.set()
        return self._replay(entry) if replayed else Ack(202, response)

    def _append(self, token: TokenInfo, rid: str, kind: str, observation: str,
                payload: dict[str, Any], response: dict[str, Any],
                applied: bool = False) -> tuple[Entry, bool]:
        return self.journal.append(
            request_id=rid, kind=kind, observation=observation, payload=payload,
            response=response, token_name=token.name, applied=applied,
            files=[(f["uuid"], f"{payload['site']}/{payload['location']}", f["path"],
                    f["size"], f["checksum"]) for f in payload.get("files", [])])

    def _remember(self, token: TokenInfo, rid: str, kind: str, observation: str,
                  payload: dict[str, Any], response: dict[str, Any]) -> None:
        """Keep a request applied directly in the journal, as applied: its retry (its answer
        lost), or the same start or file from another process, journaled while OpsDB is out
        of reach, gets the uuids OpsDB holds. Best effort: the request is applied already."""
        if kind == "start":
            payload = {**payload, "uuid": response["uuid"]}
        elif kind == "files":
            payload = {**payload, "files": [{**f, "uuid": response["uuids"][f["path"]]}
                                            for f in payload["files"]]}
        try:
            self._append(token, rid, kind, observation, payload, response, applied=True)
        except (JournalConflict, sqlite3.Error) as exc:
            log.warning("request %s applied, but not kept in the journal for its retries: %s",
                        rid, exc)

    def _replay(self, entry: Entry) -> Ack:
        body = {**entry.response, "replayed": True, "state": entry.state}
        if entry.state in ("dead", "discarded"):
            raise FilingError(f"request {entry.request_id} was accepted but could not be "
                              f"applied: {entry.error}", [("request_id", "dead letter")],
                              conflict=True)
        return Ack(202 if entry.state == "pending" else 200, body)

    # --- the drainer ---------------------------------------------------------------------

    def _drain_forever(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.drain_step()
            except Exception as exc:  # noqa: BLE001 - keep draining; the error is on /health
                log.exception("journal drainer")
                self.last_error = f"drainer: {exc}"
                wait = 1.0
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()

    def drain_step(self) -> float:
        """Apply the oldest pending entries; returns how long to wait before the next step."""
        now = time.monotonic()
        if not self.reachable and now < self._retry_at:
            return self._retry_at - now
        if now - self._tokens_at > self.config.settings.service.token_refresh_s:
            try:
                self._refresh_tokens()
            except (Unreachable, Contended):
                return max(self._retry_at - time.monotonic(), 0.05)
        entries = self.journal.next_pending(DRAIN_BATCH)
        if not entries:
            try:
                if not self.reachable or self.contention is not None:  # (a read held up)
                    self._call(self._probe)
                self._mirror_dead_letters()
            except (Unreachable, Contended):
                return max(self._retry_at - time.monotonic(), 0.05)
            self.journal.prune(time.time() - 7 * 86400)
            return min(self.config.settings.service.token_refresh_s, 1.0)
        started = time.monotonic()
        applied = self._apply(entries)  # not under self._write: see there
        self.drain_busy_s += time.monotonic() - started
        return 0.0 if applied else 0.05

    def _mirror_dead_letters(self) -> None:
        """Copy this site's dead letters into OpsDB (filing_dead_letters) when they changed,
        so that the notifications tell a person; retried or discarded ones leave it."""
        _, letters = self.journal.dead_letters(limit=10_000)
        current = {e.request_id: e for e in letters}
        if set(current) == self._mirrored:
            return

        def sync(db: OpsDB) -> None:
            with db.session() as session:
                session.execute(delete(FilingDeadLetter).where(
                    FilingDeadLetter.site == self.site,
                    FilingDeadLetter.request_id.not_in(list(current))))
                for entry in current.values():
                    session.merge(FilingDeadLetter(
                        request_id=entry.request_id, site=self.site, seq=entry.seq,
                        kind=entry.kind, observation=entry.observation,
                        error=entry.error or "no error recorded"))
        self._call(sync)
        self._mirrored = set(current)

    @staticmethod
    def _probe(db: OpsDB) -> None:
        with db.session() as session:
            session.execute(select(1))

    def _apply(self, entries: list[Entry]) -> bool:
        """Apply entries in one transaction, in order, each once; False if OpsDB went away.
        A batch that is refused is applied again one entry at a time: the entry at fault
        becomes a dead letter, the others are applied."""
        def apply(db: OpsDB) -> None:
            def work(session: Session) -> None:
                wait_for_locks_at_most(session, lock_timeout_s())  # no request waits on it
                done = set(session.scalars(select(ApiRequest.request_id).where(
                    ApiRequest.request_id.in_([e.request_id for e in entries]))))
                todo = [e for e in entries if e.request_id not in done]  # applied before a kill
                # Every observation the batch touches locked first, in one order: another
                # service draining overlapping observations in another order waits for this
                # one, instead of a deadlock (the runs below lock theirs again, a no-op).
                lock_observations(session, [e.observation for e in todo])
                for run in _runs(todo):
                    files = ([CheckedFile(**f) for e in run for f in e.payload["files"]]
                             if run[0].kind == "files" else None)
                    self._execute(session, run[0].kind, run[0].payload, files)
                for entry in todo:
                    self._marker(session, entry)
            if len(entries) == 1:
                _transaction(db, entries[0].kind, entries[0].payload, work)
            else:
                with db.session() as session:
                    work(session)

        try:
            self._call(apply, lock_wait_s=lock_timeout_s())
        except Unreachable as exc:
            self.journal.note_attempt(entries[0].seq, f"OpsDB unreachable: {exc}")
            return False
        except Contended as exc:
            self.journal.note_attempt(entries[0].seq, f"OpsDB busy, tried again at the next "
                                      f"step: {exc}")
            return False
        except (FilingError, IntegrityError) as exc:
            if len(entries) > 1:
                return all(self._apply([entry]) for entry in entries)  # stops at a lost link
            entry = entries[0]
            log.error("journal entry %s (%s of %s) is a dead letter: %s", entry.seq, entry.kind,
                      entry.observation, exc)
            self.journal.mark(entry.seq, "dead", str(exc))
            return True
        self.journal.mark_applied([e.seq for e in entries])
        self.applied += len(entries)
        self.applied_files += sum(len(e.payload.get("files", ())) for e in entries)
        return True

    # --- reads ---------------------------------------------------------------------------

    def _read(self, action: Callable[[OpsDB], T]) -> T | None:
        """What OpsDB answers, or None while it is unreachable (the journal's view then);
        raises Contended when it is reachable but a lock another session holds kept it from
        answering (503: nothing to say "not found" about)."""
        if not self.reachable:
            return None
        try:
            return self._call(action)
        except Unreachable:
            return None

    def observation(self, name: str) -> dict[str, Any] | None:
        def query(db: OpsDB) -> dict[str, Any] | None:
            with db.session() as session:
                obs = session.scalar(select(ExecutedObsUnit)
                                     .where(ExecutedObsUnit.name == name))
                if obs is None:
                    return None
                files, size = session.execute(
                    select(func.count(RawDataFile.id), func.coalesce(func.sum(RawDataFile.size), 0))
                    .where(RawDataFile.observation_id == obs.id)).one()
                packages = session.scalars(select(RawDataPackage)
                                           .where(RawDataPackage.observation_id == obs.id)
                                           .order_by(RawDataPackage.name)).all()
                return {"name": obs.name, "uuid": obs.uuid, "status": obs.status.value,
                        "started_at": _iso(obs.started_at), "finished_at": _iso(obs.finished_at),
                        "files": int(files), "bytes": int(size),
                        "packages": [{"name": p.name, "state": p.state.value} for p in packages]}
        found = self._read(query)
        buffered = self.journal.of_observation(name)
        started = any(e.kind == "start" and e.state == "pending" for e in buffered)
        if found is None and not started and (self.reachable or not buffered):
            return None
        view: dict[str, Any] = found or {"name": name, "status": "open", "files": 0, "bytes": 0,
                                         "packages": []}
        pending = [e for e in buffered if e.state == "pending"]
        for entry in pending:
            if entry.kind == "start" and "uuid" not in view:
                view["uuid"] = entry.payload["uuid"]
            if entry.kind == "files":
                view["files"] += len(entry.payload["files"])
                view["bytes"] += sum(f["size"] for f in entry.payload["files"])
            if entry.kind == "finish":
                view["status"] = "finished"
        view["opsdb"] = "reachable" if self.reachable else "unreachable"
        view["buffered"] = [e.summary() for e in pending]
        view["dead_letters"] = [e.summary() for e in buffered if e.state == "dead"]
        return view

    def raw_file(self, uuid: str) -> dict[str, Any] | None:
        def query(db: OpsDB) -> dict[str, Any] | None:
            with db.session() as session:
                row = session.scalar(select(RawDataFile).where(RawDataFile.uuid == uuid))
                if row is None:
                    return None
                return {"uuid": row.uuid, "path": row.relative_path,
                        "location": row.source_location.label, "size": row.size,
                        "checksum": row.checksum, "checksum_algorithm": row.checksum_algorithm,
                        "observation": row.observation.name, "module": row.module.label,
                        "filed_at": _iso(row.filed_at), "state": "filed",
                        "package": row.package.name if row.package else None,
                        "copies": [{"location": c.location.label, "path": c.relative_path,
                                    "status": c.status.value, "verified_at": _iso(c.verified_at)}
                                   for c in row.copies]}
        found = self._read(query)
        if found is not None:
            return found
        buffered = self.journal.file(uuid)
        if buffered is None or buffered.state == "applied":
            return None
        return {"uuid": buffered.uuid, "path": buffered.path, "location": buffered.location,
                "size": buffered.size, "checksum": buffered.checksum,
                "state": {"pending": "buffered", "dead": "dead letter"}.get(
                    buffered.state, buffered.state),
                "copies": []}

    def package(self, name: str) -> dict[str, Any] | None:
        def query(db: OpsDB) -> dict[str, Any] | None:
            with db.session() as session:
                row = session.scalar(select(RawDataPackage).where(RawDataPackage.name == name))
                if row is None:
                    return None
                return {"name": row.name, "uuid": row.uuid, "state": row.state.value,
                        "observation": row.observation.name, "module": row.module.label,
                        "size": row.size, "checksum": row.checksum, "files": len(row.files),
                        "copies": [{"location": c.location.label, "path": c.relative_path,
                                    "status": c.status.value, "verified_at": _iso(c.verified_at)}
                                   for c in row.copies]}
        return self._read(query)

    def health(self) -> dict[str, Any]:
        pending, oldest = self.journal.pending()
        dead, letters = self.journal.dead_letters()
        discarded = self.journal.counts().get("discarded", 0)
        alive = self._thread is not None and self._thread.is_alive()
        ok = (self.reachable and self.contention is None and alive and not dead
              and self.journal_error is None)
        return {"status": "ok" if ok else "degraded",
                "site": self.site,
                "opsdb": {"reachable": self.reachable, "error": self.last_error,
                          "last_contact": _iso(self.last_contact),
                          "conflicts": self.conflicts, "lock_timeouts": self.lock_timeouts,
                          "contention": self.contention},
                "journal": {"path": str(self.journal.path), "error": self.journal_error,
                            "pending": pending,
                            "oldest_pending_age_s": oldest, "dead": dead,
                            "discarded": discarded,
                            "dead_letters": [e.summary() for e in letters]},
                "drainer": {"alive": alive, "applied": self.applied,
                            "applied_files": self.applied_files,
                            "busy_s": round(self.drain_busy_s, 4)}}


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _transaction(db: OpsDB, kind: str, payload: dict[str, Any],
                 work: Callable[[Session], T]) -> T:
    """One transaction; a unique-key clash (another process did the same thing at the same
    moment, e.g. started the observation) is tried once more, then refused."""
    for attempt in (1, 2):
        try:
            with db.session() as session:
                return work(session)
        except IntegrityError as exc:
            if attempt == 2 and kind == "start" and payload.get("uuid"):
                raise FilingError(f"observation '{payload['name']}': uuid {payload['uuid']} is "
                                  "already used by another observation", [("uuid", "already used")],
                                  conflict=True) from None
            if attempt == 2:
                raise FilingError(f"{kind} of '{payload.get('name') or payload.get('observation')}'"
                                  f" clashes with what OpsDB holds: {exc.orig}",
                                  conflict=True) from None
    raise AssertionError("unreachable")


def _runs(entries: list[Entry]) -> list[list[Entry]]:
    """Consecutive file requests for the same observation, module and location go together."""
    runs: list[list[Entry]] = []
    for entry in entries:
        if (runs and entry.kind == "files" and runs[-1][0].kind == "files"
                and _target(runs[-1][0]) == _target(entry)):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _target(entry: Entry) -> tuple[Any, ...]:
    p = entry.payload
    return p["observation"], p["module"], p["site"], p["location"]
