"""Section 8: what the deletion-time re-check costs (issue 12).

N packages archived at both LTAs with their sources kept are purged, package by package, as the
purge runs do: with the re-check (each relied-on LTA copy looked at on its storage; hashed only
when its last hash is older than `policies.deletion_recheck_hours` or its inode/mtime changed),
with the re-check forced to hash every copy (window 0), and with the re-check replaced by trust
in OpsDB's record (what the purge did before). Each round restores the same archived state from
a snapshot (untimed) and the variants alternate.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from bench.common import Comparison, SectionResult, Settings, interleaved, timed
from ccat_dt.config import Config, load_config
from ccat_dt.defaults import write_default_config
from ccat_dt.filing import file_directory, finish_observation, start_observation
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import LocationType
from ccat_dt.packages import build, plan_packages
from ccat_dt.recheck import Rechecked, RecheckReport
from ccat_dt.replicas import NotReady, place, plan_placement
from ccat_dt.topology import prepare_opsdb

FILES_PER_PACKAGE = 4
FILE_BYTES = 64 * 1024


def _archived(root: Path, packages: int, log: Callable[[str], None]) -> list[str]:
    """A deployment with `packages` packages verified at both LTAs, nothing purged yet."""
    config = load_config(write_default_config(root))
    prepare_opsdb(config)
    opsdb = OpsDB(config.opsdb_url)
    source = config.resolve_root("sites/ccat/instruments")
    for n in range(packages):
        name = f"obs-{n:05d}"
        directory = source / name
        directory.mkdir(parents=True)
        for i in range(FILES_PER_PACKAGE):
            (directory / f"scan-{i}.dat").write_bytes(os.urandom(FILE_BYTES))
        start_observation(opsdb, name)
        file_directory(opsdb, observation=name, module="primecam/f280", directory=name)
        finish_observation(opsdb, name)
    with opsdb.session() as session:
        names = [p.name for p in plan_packages(session, config)]
    for i, package in enumerate(names):
        build(opsdb, config, package)
        for site in ("cologne", "us", "cologne"):  # the primary site first, then the other
            for kind in (LocationType.BUFFER, LocationType.LONG_TERM_ARCHIVE):
                with contextlib.suppress(NotReady):
                    place(opsdb, config, plan_placement(opsdb, config, package, site, kind),
                          kind)
        if (i + 1) % 100 == 0:
            log(f"    {i + 1}/{len(names)} packages archived")
    opsdb.dispose()
    return names


def _with_window(config_path: Path, hours: float) -> Config:
    settings = yaml.safe_load(config_path.read_text())
    settings.setdefault("policies", {})["deletion_recheck_hours"] = hours
    config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return load_config(config_path)


def _trusting(opsdb: OpsDB, config: Config, package_name: str, **_: object) -> RecheckReport:
    """The purge before issue 12: every verified LTA copy OpsDB records is taken at its word."""
    from ccat_dt.packages import get_package
    from ccat_dt.recheck import _lta_copies

    with opsdb.session() as session:
        copies = _lta_copies(session, get_package(session, package_name))
    return RecheckReport({c.id: Rechecked(c.id, c.verified_at, c.size, c.verified_at, False,
                                          c.root, c.host)
                          for c in copies}, [])


def bench_purge(settings: Settings, result: SectionResult, log: Callable[[str], None]) -> None:
    import ccat_dt.reaper as reaper

    packages = min(settings.packages, 500)
    template, live = settings.work / "purge-template", settings.work / "purge-live"
    log(f"  archiving {packages} packages ({FILES_PER_PACKAGE} x {FILE_BYTES // 1024} KiB "
        "files each) at both LTAs")
    names = _archived(template, packages, log)
    config_path = live / "ccat-dt.yaml"

    def restore() -> None:
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(template, live, symlinks=True)
        # the copied OpsDB names the template's roots; point them at the live copy
        prepare_opsdb(load_config(config_path))

    def purge_all(hours: float, trusting: bool) -> dict[str, float]:
        config = _with_window(config_path, hours)
        opsdb = OpsDB(config.opsdb_url)
        real = reaper.recheck_lta_copies
        if trusting:
            reaper.recheck_lta_copies = _trusting  # type: ignore[assignment]
        try:
            seconds = timed(lambda: [reaper.purge_package(opsdb, config, n) for n in names])
        finally:
            reaper.recheck_lta_copies = real
            opsdb.dispose()
        return {f"purge ({'trusting OpsDB' if trusting else f'window {hours:g} h'})": seconds}

    stats = interleaved({
        "recheck": lambda: purge_all(24.0, False),
        "rehash": lambda: purge_all(0.0, False),
        "trust": lambda: purge_all(24.0, True),
    }, settings.repeat, prepare=restore, log=log)
    checked = stats["purge (window 24 h)"]
    hashed = stats["purge (window 0 h)"]
    trusted = stats["purge (trusting OpsDB)"]
    result.comparisons.append(Comparison(
        "purge", f"purge of {packages} archived packages: re-check on the storage (stat, "
        "identity; hashed when older than 24 h) vs trusting OpsDB's record", checked, trusted,
        0.8, "with re-check", "trusting OpsDB"))
    result.comparisons.append(Comparison(
        "purge", f"purge of {packages} archived packages: every LTA copy re-hashed (window 0) vs "
        "trusting OpsDB's record", hashed, trusted, None, "re-hash all", "trusting OpsDB"))
    result.facts.update(packages=packages, files_per_package=FILES_PER_PACKAGE,
                        file_bytes=FILE_BYTES, copies_deleted_per_package=FILES_PER_PACKAGE + 3)
    shutil.rmtree(live, ignore_errors=True)
