"""Who owns a deployment, and refusing root on a deployment another user owns.

A deployment (its SQLite OpsDB and the files beside it, DAGSTER_HOME, log_dir, the location
roots) belongs to the service user that runs it. Root's writes all succeed there, and leave
root-owned files that user can neither write nor delete: a run's event database in
DAGSTER_HOME, package directories and tars in the buffers and LTAs, staged files (whose
purge then fails "Permission denied" at every re-attempt). So a process running as root on a
deployment another user owns is refused before it opens anything that could create a file,
naming the owner and what to type instead. Another non-root user is not refused: the
permissions stop it, and it can leave nothing behind the owner cannot remove.
"""

from __future__ import annotations

import os
import pwd
import shlex
from collections.abc import Sequence
from pathlib import Path

from ccat_dt.config import Config


class WrongUser(Exception):
    """Root on a deployment another user owns; nothing was opened or changed."""


def written_first(config: Config, dagster_home: Path | None) -> list[Path]:
    """What a command writes first on this deployment, in that order: the SQLite OpsDB (the
    file, or its directory while it does not exist yet), the Dagster instance's directory,
    log_dir. With a PostgreSQL OpsDB, the database is no file of ours: the instance and
    log_dir decide."""
    paths: list[Path] = []
    url = config.opsdb_url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        paths.append(Path(url.removeprefix("sqlite:///")))
    if dagster_home is not None:
        paths.append(dagster_home)
    paths.append(config.log_dir)
    return paths


def foreign_owner(paths: Sequence[Path]) -> tuple[int, Path] | None:
    """The owner other than root of the first of `paths` (each, while it does not exist yet,
    stands for its directory) that root does not own, with that path; None if root owns them
    all (or none exists)."""
    for path in paths:
        for candidate in (path, path.parent):
            try:
                uid = candidate.stat().st_uid
            except OSError:
                continue
            if uid != 0:
                return uid, candidate
            break
    return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"  # sudo's spelling of a user id without a name


def refuse_root_on_foreign(paths: Sequence[Path], argv: Sequence[str] | None,
                           env: dict[str, str] | None = None) -> None:
    """Raise WrongUser when this process runs as root and another user owns the deployment
    (`paths`, as `written_first` gives them). `argv`: the command's arguments, to repeat in the
    line to type (None: a run, not a command). Costs one geteuid() when not root."""
    if os.geteuid() != 0:
        return
    found = foreign_owner(paths)
    if found is None:
        return
    uid, path = found
    name = user_name(uid)
    what = (f"this deployment belongs to {name} ({path}): as root this would leave files "
            f"there that {name} cannot write or delete, nothing was done")
    if argv is None:
        raise WrongUser(f"{what}; run it as {name} (its daemon, webserver or "
                        f"`sudo -u {name} ...`)")
    prefix = ""
    env = dict(os.environ) if env is None else env
    kept = [f"{key}={env[key]}" for key in ("CCAT_DT_CONFIG", "DAGSTER_HOME") if env.get(key)]
    if kept:  # sudo does not pass them on by default
        prefix = "env " + " ".join(shlex.quote(item) for item in kept) + " "
    raise WrongUser(f"{what}; run it as {name}: sudo -u {shlex.quote(name)} {prefix}ccat-dt "
                    f"{shlex.join(argv)}")
