"""Counts and byte sums the database keeps itself, so that `ccat-dt status` reads a few rows
instead of counting 10^7 copies.

Why triggers, not counters in the application: a counter the code updates is wrong the first
time a row changes by another path (a bulk insert, an operator's UPDATE, raw SQL in a
migration). A trigger sees every INSERT, UPDATE and DELETE whoever sends it and changes the
totals in the writer's own transaction, so they commit or roll back with the change itself.
Concurrent writers cannot lose counts: on PostgreSQL `INSERT ... ON CONFLICT DO UPDATE` adds to
the row's newest version under its row lock (READ COMMITTED), on SQLite writers are serialised.
On PostgreSQL each server process adds to its own slot of a key (its pid modulo SLOTS) and
readers sum the slots: two sessions writing at once seldom share a row, so they neither wait
for each other's commit nor deadlock by taking two rows in opposite orders.
PostgreSQL's triggers are per statement (transition tables): a bulk insert of 10^7 rows adds
one aggregate per key, not 10^7 increments; an update that changes no key nor size writes
nothing (and takes no lock). SQLite has only row triggers; each fires only when a key or the
size changes.

A migration that rebuilds one of these tables (SQLite batch mode copies it and drops the old
one, and its triggers with it) must call `install()` again; tests/test_totals.py checks at
head that the totals equal a fresh count.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text


@dataclass(frozen=True)
class Subject:
    """What is totalled of one table: per (location, status) key, rows and bytes. Expressions
    are written over the row alias `r`."""

    name: str
    table: str
    location: str
    status: str
    size: str

    def over(self, alias: str) -> tuple[str, str, str]:
        return tuple(e.replace("r.", f"{alias}.")  # type: ignore[return-value]
                     for e in (self.location, self.status, self.size))


SUBJECTS = (
    Subject("copy", "physical_copies", "r.location_id", "r.status", "r.size"),
    Subject("raw_file", "raw_data_files", "r.source_location_id", "'filed'", "r.size"),
    Subject("package", "raw_data_packages", "0", "r.state", "COALESCE(r.size, 0)"),
    Subject("operation", "operations", "0", "r.operation_type || '/' || r.status",
            "COALESCE(r.bytes, 0)"),
)

SLOTS = 64
_UPSERT_SET = ("ON CONFLICT (subject, location_id, status, slot) DO UPDATE SET "
               "items = totals.items + excluded.items, bytes = totals.bytes + excluded.bytes")


def install(connection: Connection) -> None:
    """(Re)create the triggers and refill the totals from the rows as they are now. On
    PostgreSQL creating the triggers locks the tables against writers until the transaction
    ends, so no change falls between the refill and the triggers."""
    postgres = connection.dialect.name == "postgresql"
    for subject in SUBJECTS:
        for statement in (_postgres_triggers(subject) if postgres else _sqlite_triggers(subject)):
            connection.execute(text(statement))
    connection.execute(text("DELETE FROM totals"))
    for subject in SUBJECTS:
        connection.execute(text(f"INSERT INTO totals (subject, slot, location_id, status, "
                                f"items, bytes) SELECT '{subject.name}', {_counted(subject, 0)}"))


def uninstall(connection: Connection) -> None:
    postgres = connection.dialect.name == "postgresql"
    for subject in SUBJECTS:
        for event in ("insert", "update", "delete", "truncate"):
            name = f"totals_{subject.table}_{event}"
            if postgres:
                connection.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {subject.table}"))
                connection.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))
            else:
                connection.execute(text(f"DROP TRIGGER IF EXISTS {name}"))


Key = tuple[str, int, str]


def read(connection: Connection) -> dict[Key, tuple[int, int]]:
    """The kept totals: (subject, location_id, status) -> (rows, bytes), zeros left out."""
    rows = connection.execute(text(
        "SELECT subject, location_id, status, sum(items), sum(bytes) FROM totals "
        "GROUP BY subject, location_id, status HAVING sum(items) <> 0 OR sum(bytes) <> 0"))
    return {(s, int(loc), st): (int(n), int(b)) for s, loc, st, n, b in rows}


def recount(connection: Connection) -> dict[Key, tuple[int, int]]:
    """The same totals counted afresh from the tables (slow at scale: for checks)."""
    counted: dict[Key, tuple[int, int]] = {}
    for subject in SUBJECTS:
        for _, loc, st, n, b in connection.execute(text(f"SELECT {_counted(subject, 0)}")):
            counted[(subject.name, int(loc), st)] = (int(n), int(b))
    return counted


def _counted(subject: Subject, slot: int) -> str:
    """The select list and source of a subject's totals counted from its table."""
    location, status, size = subject.over("r")
    return (f"{slot}, d.location_id, d.status, count(*), COALESCE(sum(d.bytes), 0) FROM "
            f"(SELECT {location} AS location_id, {status} AS status, {size} AS bytes "
            f"FROM {subject.table} r) d GROUP BY d.location_id, d.status")


def _postgres_triggers(subject: Subject) -> list[str]:
    location, status, size = subject.over("r")
    plus = f"SELECT {location} AS location_id, {status} AS status, 1 AS items, {size} AS bytes"
    minus = (f"SELECT {location} AS location_id, {status} AS status, -1 AS items, "
             f"-({size}) AS bytes")
    changes = {"insert": f"{plus} FROM new_rows r",
               "delete": f"{minus} FROM old_rows r",
               "update": f"{plus} FROM new_rows r UNION ALL {minus} FROM old_rows r"}
    referencing = {"insert": "NEW TABLE AS new_rows", "delete": "OLD TABLE AS old_rows",
                   "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows"}
    statements = []
    for event, rows in changes.items():
        name = f"totals_{subject.table}_{event}"
        # Keys in one order, so that two statements lock the rows they share in one order.
        statements += [
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
            f"SET search_path FROM CURRENT AS $$ BEGIN "
            f"INSERT INTO totals (subject, location_id, status, slot, items, bytes) "
            f"SELECT '{subject.name}', d.location_id, d.status, pg_backend_pid() % {SLOTS}, "
            f"sum(d.items), sum(d.bytes) "
            f"FROM ({rows}) d GROUP BY d.location_id, d.status "
            f"HAVING sum(d.items) <> 0 OR sum(d.bytes) <> 0 ORDER BY d.location_id, d.status "
            f"{_UPSERT_SET}; RETURN NULL; END $$",
            f"DROP TRIGGER IF EXISTS {name} ON {subject.table}",
            f"CREATE TRIGGER {name} AFTER {event.upper()} ON {subject.table} "
            f"REFERENCING {referencing[event]} FOR EACH STATEMENT EXECUTE FUNCTION {name}()"]
    name = f"totals_{subject.table}_truncate"
    statements += [
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
        f"SET search_path FROM CURRENT AS $$ BEGIN "
        f"DELETE FROM totals WHERE subject = '{subject.name}'; RETURN NULL; END $$",
        f"DROP TRIGGER IF EXISTS {name} ON {subject.table}",
        f"CREATE TRIGGER {name} AFTER TRUNCATE ON {subject.table} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"]
    return statements


def _sqlite_triggers(subject: Subject) -> list[str]:
    def add(alias: str, sign: str) -> str:
        location, status, size = subject.over(alias)
        return (f"INSERT INTO totals (subject, location_id, status, slot, items, bytes) "
                f"VALUES ('{subject.name}', {location}, {status}, 0, {sign}1, {sign}({size})) "
                f"{_UPSERT_SET};")

    changed = " OR ".join(f"{old} IS NOT {new}"
                          for old, new in zip(subject.over("OLD"), subject.over("NEW"),
                                              strict=True))
    bodies = {"insert": ("", add("NEW", "")),
              "delete": ("", add("OLD", "-")),
              "update": (f" WHEN {changed}", add("OLD", "-") + " " + add("NEW", ""))}
    statements = []
    for event, (when, body) in bodies.items():
        name = f"totals_{subject.table}_{event}"
        statements += [f"DROP TRIGGER IF EXISTS {name}",
                       f"CREATE TRIGGER {name} AFTER {event.upper()} ON {subject.table}"
                       f"{when} BEGIN {body} END"]
    return statements
