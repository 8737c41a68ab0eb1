"""Per package, the number of distinct sites holding a verified long-term-archive copy of it,
kept by the database in `raw_data_packages.verified_lta_sites`: the service level ("packages
not yet in N verified LTA copies") then reads the few unsafe packages by an index instead of
counting the sites of every package ever archived.

Triggers, as for the totals (ccat_dt/opsdb/totals.py says why): every INSERT, UPDATE and
DELETE of a copy, whoever sends it, recounts the packages whose count it may change, in the
writer's own transaction. The count is recounted from the copies, never incremented, so it
cannot drift; a copy counts while it is PRESENT and verified since it was made (the predicate
of the partial index ix_physical_copies_verified, which the recount reads).

On PostgreSQL a trigger locks the package rows (in id order) before it counts: a concurrent
writer of the same package waits, then counts with a fresh snapshot that includes what the
first one committed (counting first could let the second miss the first's copy). The lock is
FOR NO KEY UPDATE, which does not block inserting copies that reference the package.
A migration that rebuilds physical_copies, data_locations or raw_data_packages (SQLite batch
mode) must call `install()` again.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

LTA = "'long_term_archive'"


def _counted(row: str) -> str:
    """True when the copy `row` counts for its package's site (NULLs count as not)."""
    return f"COALESCE({row}.status = 'present' AND {row}.verified_at >= {row}.created_at, FALSE)"


def _sites(package: str) -> str:
    """The recount of one package's verified LTA sites."""
    return (f"(SELECT count(DISTINCT l.site_id) FROM physical_copies c "
            f"JOIN data_locations l ON l.id = c.location_id "
            f"WHERE c.package_id = {package} AND c.status = 'present' "
            f"AND c.verified_at >= c.created_at AND l.location_type = {LTA})")


def install(connection: Connection) -> None:
    """(Re)create the triggers and recount every package from its copies as they are now."""
    postgres = connection.dialect.name == "postgresql"
    for statement in _postgres_triggers() if postgres else _sqlite_triggers():
        connection.execute(text(statement))
    connection.execute(text(f"UPDATE raw_data_packages SET verified_lta_sites = "
                            f"{_sites('raw_data_packages.id')}"))


def uninstall(connection: Connection) -> None:
    postgres = connection.dialect.name == "postgresql"
    for table, event in _TRIGGERS:
        name = f"archived_sites_{table}_{event}"
        if postgres:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {table}"))
            connection.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))
        else:
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name}"))
    if postgres:
        connection.execute(text("DROP FUNCTION IF EXISTS archived_sites_recount(integer[])"))


def read(connection: Connection) -> dict[int, int]:
    """The kept counts: package id -> verified LTA sites."""
    rows = connection.execute(text("SELECT id, verified_lta_sites FROM raw_data_packages"))
    return {int(package): int(sites) for package, sites in rows}


def recount(connection: Connection) -> dict[int, int]:
    """The same counted afresh from the copies (slow at scale: for checks)."""
    rows = connection.execute(text(
        f"SELECT id, {_sites('raw_data_packages.id')} FROM raw_data_packages"))
    return {int(package): int(sites) for package, sites in rows}


_TRIGGERS = (("physical_copies", "insert"), ("physical_copies", "update"),
             ("physical_copies", "delete"), ("physical_copies", "truncate"),
             ("data_locations", "update"))


def _postgres_triggers() -> list[str]:
    changed = (f"(n.package_id, n.location_id, {_counted('n')}) IS DISTINCT FROM "
               f"(o.package_id, o.location_id, {_counted('o')})")
    packages = {  # the packages whose count a statement may have changed
        ("physical_copies", "insert"): f"SELECT package_id FROM new_rows n WHERE {_counted('n')}",
        ("physical_copies", "delete"): f"SELECT package_id FROM old_rows o WHERE {_counted('o')}",
        ("physical_copies", "update"):
            f"SELECT unnest(ARRAY[n.package_id, o.package_id]) FROM new_rows n "
            f"JOIN old_rows o ON o.id = n.id WHERE {changed}",
        ("data_locations", "update"):
            "SELECT c.package_id FROM physical_copies c WHERE c.location_id IN "
            "(SELECT n.id FROM new_rows n JOIN old_rows o ON o.id = n.id "
            "WHERE (n.site_id, n.location_type) IS DISTINCT FROM (o.site_id, o.location_type))",
    }
    referencing = {"insert": "NEW TABLE AS new_rows", "delete": "OLD TABLE AS old_rows",
                   "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows"}
    statements = [
        "CREATE OR REPLACE FUNCTION archived_sites_recount(packages integer[]) RETURNS void "
        "LANGUAGE plpgsql SET search_path FROM CURRENT AS $$ BEGIN "
        "PERFORM 1 FROM raw_data_packages WHERE id = ANY(packages) ORDER BY id "
        "FOR NO KEY UPDATE; "
        f"UPDATE raw_data_packages r SET verified_lta_sites = s.sites FROM "
        f"(SELECT p.id, {_sites('p.id')} AS sites FROM unnest(packages) AS p(id)) s "
        f"WHERE r.id = s.id AND r.verified_lta_sites <> s.sites; END $$"]
    for (table, event), rows in packages.items():
        name = f"archived_sites_{table}_{event}"
        statements += [
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
            f"SET search_path FROM CURRENT AS $$ BEGIN PERFORM archived_sites_recount(ARRAY("
            f"SELECT DISTINCT d.id FROM ({rows}) AS d(id) WHERE d.id IS NOT NULL)); "
            f"RETURN NULL; END $$",
            f"DROP TRIGGER IF EXISTS {name} ON {table}",
            f"CREATE TRIGGER {name} AFTER {event.upper()} ON {table} "
            f"REFERENCING {referencing[event]} FOR EACH STATEMENT EXECUTE FUNCTION {name}()"]
    name = "archived_sites_physical_copies_truncate"
    statements += [
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
        f"SET search_path FROM CURRENT AS $$ BEGIN UPDATE raw_data_packages "
        f"SET verified_lta_sites = 0 WHERE verified_lta_sites <> 0; RETURN NULL; END $$",
        f"DROP TRIGGER IF EXISTS {name} ON physical_copies",
        f"CREATE TRIGGER {name} AFTER TRUNCATE ON physical_copies "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"]
    return statements


def _sqlite_triggers() -> list[str]:
    def recount(packages: str) -> str:
        return (f"UPDATE raw_data_packages SET verified_lta_sites = "
                f"{_sites('raw_data_packages.id')} WHERE id IN ({packages});")

    changed = (f"OLD.package_id IS NOT NEW.package_id OR OLD.location_id IS NOT NEW.location_id "
               f"OR {_counted('OLD')} IS NOT {_counted('NEW')}")
    triggers = {
        ("physical_copies", "insert"): (f"NEW.package_id IS NOT NULL AND {_counted('NEW')}",
                                        recount("NEW.package_id")),
        ("physical_copies", "delete"): (f"OLD.package_id IS NOT NULL AND {_counted('OLD')}",
                                        recount("OLD.package_id")),
        ("physical_copies", "update"): (changed, recount("OLD.package_id, NEW.package_id")),
        ("data_locations", "update"): (
            "OLD.site_id IS NOT NEW.site_id OR OLD.location_type IS NOT NEW.location_type",
            recount("SELECT package_id FROM physical_copies WHERE location_id = NEW.id")),
    }
    statements = []
    for (table, event), (when, body) in triggers.items():
        name = f"archived_sites_{table}_{event}"
        statements += [f"DROP TRIGGER IF EXISTS {name}",
                       f"CREATE TRIGGER {name} AFTER {event.upper()} ON {table} "
                       f"WHEN {when} BEGIN {body} END"]
    return statements
