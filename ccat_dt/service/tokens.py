"""API tokens for the filing service: created and revoked with `ccat-dt token`, stored as a
sha256 of the secret (the secret is shown once), scoped to one site and some instruments."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from ccat_dt.config import Config
from ccat_dt.opsdb.database import OpsDB
from ccat_dt.opsdb.models import ApiToken, LocationType, utcnow

TOKEN_PREFIX = "ccat_"
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}")


class TokenError(Exception):
    """A token command that cannot be carried out; nothing was changed."""


@dataclass(frozen=True)
class TokenInfo:
    """What the service needs to authorise a request (never the secret)."""

    name: str
    token_hash: str
    site: str
    instruments: tuple[str, ...] = ()  # empty: every instrument
    revoked_at: datetime | None = None
    created_at: datetime | None = field(default=None, compare=False)

    def allows_instrument(self, instrument: str) -> bool:
        return not self.instruments or instrument in self.instruments


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(opsdb: OpsDB, config: Config, *, name: str, site: str,
                 instruments: list[str]) -> str:
    """Store a new token's hash and return the secret (the only time it is known)."""
    if not TOKEN_NAME.fullmatch(name):
        raise TokenError(f"invalid token name {name!r}: 1-100 letters, digits, '_', '.', '@', '-'")
    sites = [s.short_name for s in config.settings.sites
             if s.locations_of(LocationType.SOURCE)]  # where instruments write: files are filed
    if site not in sites:
        other = any(s.short_name == site for s in config.settings.sites)
        raise TokenError(f"{'site' if other else 'unknown site'} '{site}'"
                         f"{' has no source location' if other else ''}: a token files raw "
                         f"files at a site's source location; sites with one: {', '.join(sites)}")
    known = [i.name for i in config.settings.instruments]
    unknown = sorted(set(instruments) - set(known))
    if unknown:
        raise TokenError(f"unknown instrument(s) {', '.join(unknown)}; instruments: "
                         f"{', '.join(known)}")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with opsdb.session() as session:
        if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
            raise TokenError(f"a token named '{name}' exists already (revoked ones keep their "
                             "name); choose another name")
        session.add(ApiToken(name=name, token_hash=hash_token(secret), site=site,
                             instruments=sorted(set(instruments))))
    return secret


def revoke_token(opsdb: OpsDB, name: str) -> bool:
    """Revoke by name; False when it was already revoked."""
    with opsdb.session() as session:
        token = session.scalar(select(ApiToken).where(ApiToken.name == name))
        if token is None:
            raise TokenError(f"no token named '{name}'; see `ccat-dt token list`")
        if token.revoked_at is not None:
            return False
        token.revoked_at = utcnow()
        return True


def list_tokens(opsdb: OpsDB) -> list[TokenInfo]:
    with opsdb.session() as session:
        return [TokenInfo(t.name, t.token_hash, t.site, tuple(t.instruments or ()),
                          t.revoked_at, t.created_at)
                for t in session.scalars(select(ApiToken).order_by(ApiToken.name))]
