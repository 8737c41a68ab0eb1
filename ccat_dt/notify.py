"""Telling a person when a person is needed: by e-mail (SMTP) and by a webhook (a JSON POST
of {"text": ...}, which Slack, Mattermost and most chat tools accept).

De-duplicated per problem (a stable key) and channel, with the state in OpsDB: one message
when a problem appears, a reminder after `notifications.remind_after_hours`, a "resolved"
message once it clears. A delivery that fails for now (mail server or webhook down, a 4xx
reply) is logged and tried again at the next tick; it never raises into the caller, and a
channel that failed once in a tick is not tried again in that tick, so a dead server costs one
short time-out a tick (a server that accepts the connection and stays silent two: the second
asks whether it waits for a TLS handshake). A delivery refused for good (a 5xx reply: no such
mailbox, a bad address, authentication failed, TLS required; an unknown host; a server
certificate that TLS (STARTTLS or implicit) does not trust, found before the password is sent;
the TLS mode not the port's: plain SMTP at an implicit-TLS port, found as no greeting and a TLS
handshake that succeeds, or implicit TLS at a plain port; a login whose password variable is
not in this process's environment, found before connecting; a webhook's 4xx, or its redirect,
which is not followed: a POST redirected is not the message delivered) would be refused again
at every tick, for ever, and nobody told: the channel is recorded undeliverable
(UndeliverableChannel), logged once, named by `status`, the overview and the other channels
(a problem of its own), and its messages wait, tried once per `remind_after_hours`, until its
settings change (a new address or server, the password's variable): then they go. Recipients
refused while the others got the message are recorded the same way, without holding the
others' messages.
A channel failing for now at every attempt (a relay answering 421 for days, a webhook's server
down), nothing delivered over it since, is tried at every tick as ever, and once that lasts
`remind_after_hours` it is told over the other channels and named by `status` (FailingChannel:
since when, and its last error); it is resolved once a message over it is delivered.
A message delivered is recorded at once (a tick cut off later never sends it again), and a tick
starts no delivery past TICK_BUDGET_S: a slow server with many messages waits for later ticks.
Nothing is sent, and no row is written, while no channel is configured.

What counts as a problem (`current_problems`) is only what does not heal by itself: a package
quarantined (a source file changed after filing), a source file changed after archiving (its
new bytes are in no archive), a source file refused to ccat-dt's user for lack of permission
(again on the next attempt), a copy whose re-read (its check, the scrub) was so refused, a
deletion or a copy refused for a file ccat-dt did not write,
a copy refused because the package is larger than the destination takes (EFBIG: its file
system's largest file, a file-size limit of the user writing there), work escalated past the
re-attempt horizon, an archive site down past its failover horizon, a disk full (of bytes or
inodes), over its quota or read-only (only a person makes room, raises the quota or remounts
it), a disk that fails with I/O errors again and again, or that failed the read of a copy sent
from it (the work healed from another copy, so nothing reads that one again soon), a buffer
filling faster than it drains, a filing-service request that can never be applied (a dead
letter, which each site's service mirrors into OpsDB), a notification channel through which
nothing got for `remind_after_hours` (above). Transient faults are never told.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dt.claims import process_running, this_host
from ccat_dt.config import Config, SmtpConfig, WebhookConfig
from ccat_dt.diagnosis import stopped_reason
from ccat_dt.health import (
    archive_disks_failing,
    archives_unreadable,
    failing_disks,
    refuses_writes,
    refusing_locations,
    sites_down,
    source_reads_failing,
)
from ccat_dt.loss import packages_in_danger
from ccat_dt.opsdb.database import OpsDB, insert_absent
from ccat_dt.opsdb.models import (
    CopyStatus,
    DataLocation,
    FailingChannel,
    FilingDeadLetter,
    Lease,
    LocationType,
    Notification,
    Operation,
    OperationStatus,
    OperationType,
    PackageCopy,
    PackageState,
    PhysicalCopy,
    RawDataFileCopy,
    RawDataPackage,
    Reattempt,
    UndeliverableChannel,
    _aware,
)
from ccat_dt.reattempt import unsettled
from ccat_dt.routing import refused_reread
from ccat_dt.stages import Stage
from ccat_dt.transports.base import (
    DELETION_DENIED,
    FOREIGN_FILE,
    IN_THE_WAY,
    READABLE_BY,
    TOO_LARGE,
    refused_source,
)

if TYPE_CHECKING:
    import smtplib
    import urllib.request

LOG = logging.getLogger("ccat_dt.notify")


@dataclass(frozen=True)
class Problem:
    key: str  # stable while the problem lasts, e.g. "quarantined:obs-0_primecam-f280_p00"
    kind: str  # quarantined | escalated | lost | at_risk | site_down | buffer_filling | dead_letter
    # | deletion_refused | foreign_file | source_changed | source_refused | copy_refused
    # | archive_unreadable | disk_full | over_quota | read_only | disk_error | too_large
    # | in_the_way | deletion_denied | undeliverable | channel_failing
    subject: str
    detail: str  # what happened and what to do


class Undeliverable(Exception):
    """A delivery refused for good: sent again with the same settings, it is refused again.
    Its text names the recipient or the server, and the reply."""


class Channel(Protocol):
    @property
    def name(self) -> str: ...

    def send(self, subject: str, body: str) -> str | None:
        """Deliver, or raise (Undeliverable when refused for good). Returns who was refused
        (and why) when others got the message."""


def _reply(code: int, text: bytes | str) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    return " ".join(f"{code} {text}".split())


def _recipients(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{address}: {_reply(code, text)}" for address, (code, text) in
                     sorted(refused.items()))


# OpenSSL's reasons for a TLS handshake answered with plain text ("220 relay ESMTP ..."):
# `tls: implicit` at a port that speaks plain SMTP first.
_PLAIN_TEXT = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
_NO_PASSWORD = "notifications.smtp.username is set but $"  # how such a reason starts


class _ImplicitTlsPort(Exception):
    """No SMTP greeting, and a TLS handshake on the same connection succeeded: the server
    waits for the client to start TLS (SMTPS) while plain SMTP waits for its greeting."""


def _speaks_tls(sock: socket.socket) -> bool:
    """Whether the server on `sock`, silent so far, answers a TLS handshake: it was waiting
    for one. Nothing is sent over it (the handshake only; no certificate looked at)."""
    import ssl

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    try:
        with probe.wrap_socket(sock):
            return True
    except ssl.SSLError as exc:  # answered in TLS, refusing something of ours (its version)
        return "ALERT" in (exc.reason or "") or exc.reason == "UNSUPPORTED_PROTOCOL"
    except OSError:  # still silent (a server hung), or gone
        return False
    finally:
        sock.close()


@functools.cache
def _plain_smtp() -> type[smtplib.SMTP]:
    import smtplib  # here: `ccat-dt status` reads open problems and sends nothing

    class Greeted(smtplib.SMTP):
        """smtplib.SMTP that, when the server says nothing within the time-out, tells an
        implicit-TLS port (it answers a TLS handshake) from a server that is down or slow."""

        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
            try:
                sock.recv(1, socket.MSG_PEEK)  # the greeting's first byte, left for smtplib
            except TimeoutError:
                if _speaks_tls(sock):
                    raise _ImplicitTlsPort() from None
                raise
            except BaseException:
                sock.close()
                raise
            return sock

    return Greeted


def _process() -> str:
    """This process, as `ps` shows it: which one lacks what its environment should hold."""
    return f"{' '.join([Path(sys.argv[0]).name, *sys.argv[1:3]]).strip()}, pid {os.getpid()}"


def fix_for(channel: str, reason: str) -> str:
    """What a person does about a channel refused for good with `reason` (for `status`)."""
    if reason.startswith(_NO_PASSWORD):
        return ("set the variable in the environment of the process that sends notifications "
                "and restart it")
    return f"fix notifications.{channel} in the configuration"


@dataclass(frozen=True)
class SmtpChannel:
    settings: SmtpConfig
    name: str = "smtp"
    ca_file: str | None = None  # settings.ca_file resolved (relative to the config's directory)

    def send(self, subject: str, body: str) -> str | None:
        import smtplib  # here: `ccat-dt status` reads open problems and sends nothing
        import ssl
        from email.message import EmailMessage

        settings = self.settings
        password = ""
        if settings.username:  # an empty one would be refused (535): the relay is not at fault
            password = os.environ.get(settings.password_env, "")
            if not password:
                raise Undeliverable(
                    f"{_NO_PASSWORD}{settings.password_env} is not set in this process's "
                    f"environment ({_process()}): nothing was sent, no empty password "
                    "either; give it to the process that sends notifications (the Dagster "
                    "daemon's code server, `ccat-dt drive`: e.g. in /etc/ccat-dt/ccat-dt.env, "
                    "their systemd units' EnvironmentFile) and restart it")
        message = EmailMessage()
        message["Subject"], message["From"] = subject, settings.from_
        message["To"] = ", ".join(settings.to)
        message.set_content(body)
        server = f"server {settings.host}:{settings.port}"
        # Either TLS mode verifies the certificate and host name before anything is said: the
        # password (after it) and the alerts go to this server or nowhere.
        context = (ssl.create_default_context(cafile=self.ca_file) if settings.tls != "none"
                   else None)
        try:
            client = (smtplib.SMTP_SSL(settings.host, settings.port, timeout=settings.timeout_s,
                                       context=context) if settings.tls == "implicit"
                      else _plain_smtp()(settings.host, settings.port,
                                         timeout=settings.timeout_s))
            with client as smtp:
                if settings.tls == "starttls":
                    smtp.starttls(context=context)
                if settings.username:
                    smtp.login(settings.username, password)
                refused = smtp.send_message(message)
        except _ImplicitTlsPort as exc:  # a time-out at every attempt else, for ever
            raise Undeliverable(
                f"{server}: no SMTP greeting within {settings.timeout_s:g} s, and a TLS "
                "handshake there succeeds: an implicit-TLS (SMTPS) port; set "
                "notifications.smtp.tls: implicit (nothing was sent)") from exc
        except smtplib.SMTPRecipientsRefused as exc:  # every recipient: for good if all 5xx
            if all(code >= 500 for code, _ in exc.recipients.values()):
                raise Undeliverable(_recipients(exc.recipients)) from exc
            raise
        except smtplib.SMTPSenderRefused as exc:
            if exc.smtp_code >= 500:
                raise Undeliverable(f"{exc.sender} (from) at {server}: "
                                    f"{_reply(exc.smtp_code, exc.smtp_error)}") from exc
            raise
        except smtplib.SMTPResponseException as exc:  # 535 authentication failed, 554 ...
            if exc.smtp_code >= 500:
                raise Undeliverable(f"{server}: {_reply(exc.smtp_code, exc.smtp_error)}") \
                    from exc
            raise  # 421, 451: for now
        except smtplib.SMTPNotSupportedError as exc:  # STARTTLS or AUTH not offered
            raise Undeliverable(f"{server}: {exc}") from exc
        except ssl.SSLCertVerificationError as exc:  # nothing sent, the password neither
            trusted = f"the CAs in {self.ca_file}" if self.ca_file else "the system's CAs"
            raise Undeliverable(
                f"{server}: TLS certificate not trusted ({exc.verify_message}) by {trusted}; "
                "nothing was sent, no password either: set notifications.smtp.ca_file to the "
                "CA that signed it, or fix the relay's certificate") from exc
        except ssl.SSLError as exc:
            if settings.tls == "implicit" and exc.reason in _PLAIN_TEXT:
                raise Undeliverable(
                    f"{server}: answered in plain text, not TLS: not an implicit-TLS (SMTPS) "
                    "port; set notifications.smtp.tls: starttls (or none) for this port, or "
                    "give the relay's SMTPS port (usually 465); nothing was sent") from exc
            raise
        except socket.gaierror as exc:  # EAI_AGAIN (DNS unreachable) is for now
            if exc.errno == socket.EAI_NONAME:
                raise Undeliverable(f"{server}: unknown host ({exc.strerror})") from exc
            raise
        return _recipients(refused) if refused else None


@functools.cache
def _not_following() -> type[urllib.request.HTTPRedirectHandler]:
    import urllib.request

    class NotFollowing(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None  # the redirect is answered as it is: an HTTPError with its 3xx

    return NotFollowing


@dataclass(frozen=True)
class WebhookChannel:
    settings: WebhookConfig
    name: str = "webhook"

    def send(self, subject: str, body: str) -> str | None:
        import urllib.error
        import urllib.parse
        import urllib.request

        data = json.dumps({"text": f"{subject}\n{body}"}).encode()
        request = urllib.request.Request(self.settings.url, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        host = urllib.parse.urlsplit(self.settings.url).netloc  # its path is a secret
        # A redirect is not followed: urllib asks a 301/302/303's new address with a GET,
        # without the message (a sign-in page's 200 taken for a delivery), and a 307/308's
        # not at all.
        opener = urllib.request.build_opener(_not_following())
        try:
            with opener.open(request, timeout=self.settings.timeout_s) as response:
                if response.status >= 300:
                    raise OSError(f"webhook answered {response.status}")
        except urllib.error.HTTPError as exc:  # a hook revoked or mistyped: 403, 404, 410
            if 300 <= exc.code < 400:
                to = urllib.parse.urlsplit(urllib.parse.urljoin(
                    self.settings.url, exc.headers.get("Location") or ""))
                raise Undeliverable(
                    f"webhook at {host}: {exc.code} {exc.reason}, redirected to "
                    f"{to.scheme}://{to.netloc}, not followed (a message redirected is not "
                    "delivered): set notifications.webhook.url to the address that takes the "
                    "POST itself (where a permanent redirect points; none behind a sign-in "
                    "page)") from exc
            if 400 <= exc.code < 500 and exc.code not in (408, 425, 429):
                raise Undeliverable(f"webhook at {host}: {exc.code} {exc.reason}") from exc
            raise
        return None


def settings_digest(channel: Channel) -> str:
    """Identifies a channel's settings, the mail password's value included (a 535 is fixed in
    the environment, not in the file): an undeliverable one is tried again once they change."""
    secret = ca = ""
    if isinstance(channel, SmtpChannel) and channel.settings.username:
        secret = os.environ.get(channel.settings.password_env, "")
    if isinstance(channel, SmtpChannel) and channel.ca_file:  # a CA added to the same file
        try:
            with open(channel.ca_file, "rb") as bundle:
                ca = hashlib.sha256(bundle.read()).hexdigest()
        except OSError:
            ca = "unreadable"
    return hashlib.sha256(f"{channel!r}\0{secret}\0{ca}".encode()).hexdigest()[:16]


def undeliverable(session: Session, config: Config) -> list[UndeliverableChannel]:
    """The channels configured that refused for good. Not compared with their settings here
    (`status` runs without the daemon's password): changed ones are tried at the next tick,
    which forgets the refusal once delivered."""
    configured = {channel.name for channel in channels(config)}
    return [row for row in session.scalars(select(UndeliverableChannel).order_by(
        UndeliverableChannel.channel)) if row.channel in configured]


def failing_channels(session: Session, config: Config,
                     now: datetime) -> list[FailingChannel]:
    """The channels configured whose every delivery failed for now (nothing delivered over
    them) for `remind_after_hours` or longer, none of them refused for good (told as that)."""
    configured = {channel.name for channel in channels(config)}
    horizon = timedelta(hours=config.settings.notifications.remind_after_hours)
    refused = {row.channel for row in undeliverable(session, config)}
    return [row for row in session.scalars(select(FailingChannel).order_by(
        FailingChannel.channel)) if row.channel in configured and row.channel not in refused
        and _aware(now) - _aware(row.since) >= horizon]


def _failure(channel: Channel, exc: Exception) -> str:
    """A failure for now as a person reads it: the server, and the reply or the error."""
    import urllib.parse

    where = channel.name
    if isinstance(channel, SmtpChannel):
        where = f"server {channel.settings.host}:{channel.settings.port}"
    elif isinstance(channel, WebhookChannel):  # its host only: a hook's path is a secret
        where = f"webhook at {urllib.parse.urlsplit(channel.settings.url).netloc}"
    recipients = getattr(exc, "recipients", None)
    if isinstance(recipients, dict):  # smtplib.SMTPRecipientsRefused: every one, for now
        return f"{where}: {_recipients(recipients)}"
    code = getattr(exc, "smtp_code", None)
    if isinstance(code, int):  # 421, 450, 451 ...
        return f"{where}: {_reply(code, getattr(exc, 'smtp_error', b''))}"
    return f"{where}: {type(exc).__name__}: {exc}"


def channels(config: Config) -> list[Channel]:
    settings = config.settings.notifications
    out: list[Channel] = []
    if settings.smtp is not None:
        ca_file = settings.smtp.ca_file
        out.append(SmtpChannel(settings.smtp, ca_file=str(config.resolve_root(ca_file))
                               if ca_file else None))
    if settings.webhook is not None:
        out.append(WebhookChannel(settings.webhook))
    return out


def current_problems(session: Session, config: Config, now: datetime,
                     buffers: Sequence[tuple[str, float]] = ()) -> list[Problem]:
    """What needs a person now. `buffers`: (location, hours until full) of the buffers the
    forecast puts below its threshold (the caller runs the forecast)."""
    problems = []
    failed = session.scalars(select(RawDataPackage).where(
        RawDataPackage.state == PackageState.FAILED).order_by(RawDataPackage.id))
    for package in failed:
        error = session.scalar(select(Operation.error).where(
            Operation.package_id == package.id,
            Operation.operation_type == OperationType.PACKAGING)
            .order_by(Operation.id.desc()).limit(1)) or "no error recorded"
        problems.append(Problem(
            f"quarantined:{package.name}", "quarantined",
            f"package {package.name} quarantined: nothing of it leaves the observatory",
            f"{error.strip().splitlines()[-1] if error.strip() else error}\n"
            "The source files stay where they are. Either restore the file as it was filed, "
            f"then `ccat-dt retry --rebuild-failed --package {package.name}`; or take it out "
            "of the package with `ccat-dt exclude FILE --reason \"...\"` (the file stays on "
            "disk; the rest is rebuilt and goes by itself). "
            f"`ccat-dt why {package.name}` shows every stage."))
    for site, broken in sites_down(session, config, now).items():
        since = _aware(broken.failing_since or now)
        problems.append(Problem(
            f"site_down:{site}", "site_down",
            f"archive site {site} {refuses_writes(broken) or 'unreachable'} since "
            f"{since:%Y-%m-%d %H:%M} UTC",
            f"{broken.unhealthy_reason or 'its buffer failed'}\nPast the failover horizon "
            f"({config.settings.policies.site_failover_hours:g} h): packages not yet sent go to "
            f"another archive site; {site} gets them by replication once it is back. Bring "
            f"{site} back (`ccat-dt status` shows its locations)."))
    for refusing, how in refusing_locations(session):
        since = _aware(refusing.failing_since or now)
        kind, state, refused, remedy = _refusal(how, refusing.unhealthy_reason or "")
        problems.append(Problem(
            f"{kind}:{refusing.label}", kind,
            f"{refusing.location_type.value.replace('_', ' ')} {refusing.label} {state} since "
            f"{since:%Y-%m-%d %H:%M} UTC",
            f"{refusing.unhealthy_reason or 'no reason recorded'}\n{refused} there fail and "
            "are tried again after a back-off; nothing is lost and the copies there are read "
            f"as ever. {remedy}: the next attempt then goes on by itself. `ccat-dt status` "
            "shows every location."))
    disks = failing_disks(session, config)
    for failing in disks:
        since = _aware(failing.failing_since or now)
        problems.append(Problem(
            f"disk_error:{failing.label}", "disk_error",
            f"{failing.location_type.value.replace('_', ' ')} {failing.label}: its disk fails "
            f"with I/O errors since {since:%Y-%m-%d %H:%M} UTC",
            f"{failing.unhealthy_reason or 'no reason recorded'}\nThe same error came back on "
            "the next attempt. A file that cannot be read is not taken for a bad copy and "
            "nothing is deleted on its word; work there is tried again after a back-off. Check "
            "the disk (kernel log, SMART) and replace it if it fails; `ccat-dt status` shows "
            "every location."))
    archives = archive_disks_failing(session, config, now)
    for archive in archives:
        if archive.id in {disk.id for disk in disks}:
            continue  # told above: the same disk, the same key
        since = _aware(archive.failing_since or now)
        problems.append(Problem(
            f"disk_error:{archive.label}", "disk_error",
            f"archive location {archive.label}: its disk failed with an I/O error since "
            f"{since:%Y-%m-%d %H:%M} UTC",
            f"{archive.unhealthy_reason or 'no reason recorded'}\nThe disk is mounted and "
            "answers, but failed that operation (a bad sector, a failing disk), and nothing "
            "succeeded there since. A file that cannot be read is not taken for a bad copy: it "
            "is neither quarantined nor deleted nor written over, other copies are sent from "
            "instead, and it is not relied on for a deletion until it reads again (the scrub "
            "reads it again). Check the disk (kernel log, SMART) and replace it if it fails; "
            "`ccat-dt status` shows every location."))
    for source in source_reads_failing(session):
        if source.id in {disk.id for disk in (*disks, *archives)}:
            continue  # told above: the same disk, the same key
        since = _aware(source.failing_since or now)
        problems.append(Problem(
            f"disk_error:{source.label}", "disk_error",
            f"{source.location_type.value.replace('_', ' ')} {source.label}: its disk failed "
            f"to read a file since {since:%Y-%m-%d %H:%M} UTC",
            f"{source.unhealthy_reason or 'no reason recorded'}\nThe disk is mounted and "
            "answers, but failed the read of that file (a bad sector, a failing disk) when it "
            "was the source of a copy. The work is sent from another verified copy instead, "
            "by itself, while there is one. The unreadable copy is not taken for a bad one: it "
            "is neither quarantined nor written over, and no deletion relies on it unless it "
            "reads intact just then (the purge and the scrub read it again). Check the disk "
            "(kernel log, SMART) and replace it if it fails; `ccat-dt status` shows every "
            "location."))
    for archive in archives_unreadable(session, config, now):
        since = _aware(archive.failing_since or now)
        problems.append(Problem(
            f"archive_unreadable:{archive.label}", "archive_unreadable",
            f"archive location {archive.label} cannot be looked at since "
            f"{since:%Y-%m-%d %H:%M} UTC",
            f"{archive.unhealthy_reason or 'no reason recorded'}\nIts copies are neither "
            "re-checked nor relied on for a deletion, and a loss there cannot be seen. Bring it "
            "back (mount the disk, restore the bucket or its marker, fix the credentials); "
            "`ccat-dt audit` shows what it could not audit."))
    # An escalation stays a problem until its work is done (its row unsettled no more, by
    # whatever did the work): an operator's retry that fails again starts a new episode of
    # automatic attempts, not a resolution.
    told = set(session.scalars(select(Notification.problem_key).where(
        Notification.closed.is_(False), Notification.problem_key.like("escalated:%"))))
    rows = unsettled(session, config)
    for row in rows:
        if row.escalated_at is None and f"escalated:{row.stage}:{row.partition}" not in told:
            continue
        if any(text in (row.last_error or "") for text in (FOREIGN_FILE, TOO_LARGE,
                                                           IN_THE_WAY, DELETION_DENIED)) \
                or _refused(row):
            continue  # told below
        hours = (_aware(now) - _aware(row.first_failed_at)).total_seconds() / 3600
        problems.append(Problem(
            f"escalated:{row.stage}:{row.partition}", "escalated",
            f"{Stage(row.stage).label} {row.partition} still failing after {row.attempts} attempts "
            f"({hours:.0f} h)",
            f"Last error: {row.last_error or 'none recorded'}\n"
            f"Automatic attempts stopped at the re-attempt horizon "
            f"({config.settings.policies.retry_horizon_hours:g} h). Fix the cause, then "
            f"`ccat-dt retry --package {row.package}`; `ccat-dt why {row.package}` shows "
            "the stage."))
    # Work stopped again and again with no person's doing (reattempt._stopped), told once and
    # open until the work is done, as an escalation: a new series (an operator's retry or
    # Terminate, a failed run) resolves nothing while the work still waits.
    told_stopped = set(session.scalars(select(Notification.problem_key).where(
        Notification.closed.is_(False), Notification.problem_key.like("stopped:%"))))
    for row in rows:
        key = f"stopped:{row.stage}:{row.partition}"
        if row.stopped_told_at is None and key not in told_stopped:
            continue
        problems.append(Problem(
            key, "stopped", f"{Stage(row.stage).label} {row.partition} "
            + (stopped_reason(row.stopped_runs, row.stopped_since) if row.stopped_runs
               else "canceled again and again, each time before it finished"),
            "Each of its runs was stopped before it finished, with no operator's Terminate "
            "recorded: its drive (or its process) was stopped, by `timeout` in a cron job, a "
            "service manager's run-time limit (RuntimeMaxSec) or the host's shutdown, sooner "
            "than the work takes; it starts again from zero each time, so the data does not "
            "leave. It is no failure: it is still re-attempted automatically after the "
            "back-off. Give the drive longer (a longer timeout or run-time limit, a drive "
            "not stopped by the shutdown, or the Dagster daemon instead of a time-limited "
            f"drive); `ccat-dt why {row.package}` "
            "shows the stage. Resolved once the work is done."))
    for name, assessment in packages_in_danger(session, config):
        kind = assessment.health.value.replace(" ", "_")  # lost | at_risk
        problems.append(Problem(
            f"{kind}:{name}", kind, f"package {name}: {assessment.health.value.upper()}",
            f"{assessment.reason}\n`ccat-dt why {name}` shows every copy and stage."))
    problems += _refused_deletions(session)
    problems += _changed_sources(session)
    problems += _foreign_files(rows)
    problems += _too_large(session, config, rows)
    problems += _in_the_way(config, rows)
    problems += _deletions_denied(config, rows)
    problems += _refused_sources(config, rows)
    problems += _refused_copies(session, now)
    for letter in session.scalars(select(FilingDeadLetter).order_by(FilingDeadLetter.site,
                                                                    FilingDeadLetter.seq)):
        problems.append(Problem(
            f"dead_letter:{letter.site}:{letter.request_id}", "dead_letter",
            f"filing service at {letter.site}: a '{letter.kind}' request of observation "
            f"{letter.observation} can never be applied",
            f"Journal entry #{letter.seq} (request {letter.request_id}) was acknowledged to the "
            f"instrument but OpsDB refuses it: {letter.error}\n"
            "On the service's host: `ccat-dt journal list` shows it; fix the cause, then "
            f"`ccat-dt journal retry {letter.seq}`, or give it up with `ccat-dt journal "
            f"discard {letter.seq} --reason TEXT`."))
    for location, hours in buffers:
        problems.append(Problem(
            f"buffer_filling:{location}", "buffer_filling",
            f"buffer {location} full in {hours:.0f} h at the current rates",
            f"{location} fills faster than it drains (threshold "
            f"{config.settings.metrics.warn_below_hours:g} h). Check the links out of it "
            "(`ccat-dt status`), add space, or lower its retention."))
    for refusal in undeliverable(session, config):  # told over the other channels
        problems.append(Problem(
            f"undeliverable:{refusal.channel}:{refusal.settings}", "undeliverable",
            f"notifications over {refusal.channel} undeliverable: {refusal.reason}",
            f"Refused for good since {_aware(refusal.since):%Y-%m-%d %H:%M} UTC: "
            + ("no message goes over it; they wait, tried once per `remind_after_hours`. "
               if refusal.held else "the other recipients get each message. ")
            + ("Set it in the environment of the process that sends notifications and restart "
               "it" if refusal.reason.startswith(_NO_PASSWORD) else f"Fix notifications."
               f"{refusal.channel} in the configuration (the address, the server, the account, "
               "the TLS mode)")
            + "; the messages waiting then go by themselves. `ccat-dt status` lists them."))
    for down in failing_channels(session, config, now):  # told over the other channels
        since = _aware(down.since)
        server = "mail relay" if down.channel == "smtp" else "webhook's server"
        problems.append(Problem(
            f"failing:{down.channel}", "channel_failing",
            f"notifications over {down.channel} failing since {since:%Y-%m-%d %H:%M} UTC: "
            f"{down.error}",
            f"Every delivery over {down.channel} failed since {since:%Y-%m-%d %H:%M} UTC and "
            f"none succeeded (the last at {_aware(down.failed_at):%Y-%m-%d %H:%M} UTC: "
            f"{down.error}). A failure for now (a 4xx reply, a server down or not answering), "
            "so its messages wait and are tried again at every tick; they go by themselves "
            f"once it delivers, and this is resolved then. Check the {server}: is it up and "
            "reachable from this host, is its queue or disk full, does it throttle us? "
            "`ccat-dt status` lists the messages waiting."))
    return problems


def _refusal(how: str, reason: str) -> tuple[str, str, str, str]:
    """(kind, what the disk is, what it refuses, what a person does) for a location whose disk
    refuses writes (`health.refusing_locations`): full of bytes, out of inodes while bytes are
    free, over a quota while the disk has room, or read-only."""
    if how != "full":
        return ("read_only", how, "Writes and deletions", "Remount it read-write (one the "
                "kernel remounted read-only after errors: check `dmesg` and the file system "
                "first)")
    if "disk quota exceeded" in reason.lower():
        return ("over_quota", "over its quota", "Writes", "Make room there, or raise the quota "
                "of the user (or group) ccat-dt writes as (`setquota`; a btrfs quota group: "
                "`btrfs qgroup limit`; an XFS project: `xfs_quota`)")
    if "no inode left" in reason:
        return ("disk_full", "out of inodes", "Writes", "Delete files there (many small ones "
                "use up the inodes whatever the bytes free: `df -i`), or make its file system "
                "with more inodes")
    return "disk_full", "full", "Writes", "Make room or enlarge the disk"


def _foreign_files(rows: Sequence[Reattempt]) -> list[Problem]:
    """Copies refused because their final name holds a file OpsDB does not know (an older
    archive, a restored OpsDB): nothing is written over it, and only a person can say what
    it is. Resolved once a copy is made there (its re-attempt row unsettled no more)."""
    return [Problem(
        f"foreign_file:{row.stage}:{row.partition}", "foreign_file",
        f"{Stage(row.stage).label} {row.partition} refused: a file OpsDB does not know is at "
        "its name",
        f"{row.last_error}\nNothing was written over that file. Find out what it is (another "
        "archive's, an older copy of this package?) and move it away; the next automatic "
        f"attempt then copies the package (`ccat-dt why {row.package}` shows the stage).")
        for row in rows if FOREIGN_FILE in (row.last_error or "")]


def _after_a_person(config: Config, row: Reattempt, mended: str, then: str) -> str:
    """What follows once a person has mended what only a person can (`mended`: "it is
    readable"): the next automatic attempt `then`s, or, past the re-attempt horizon,
    `ccat-dt retry`."""
    if row.escalated_at is not None:
        return ("Automatic attempts stopped at the re-attempt horizon "
                f"({config.settings.policies.retry_horizon_hours:g} h): once {mended}, "
                f"`ccat-dt retry --package {row.package}`.")
    return (f"Once {mended}, the next automatic attempt"
            + (f" ({_aware(row.next_attempt_at):%Y-%m-%d %H:%M} UTC, then less and less "
               "often)" if row.next_attempt_at is not None else "")
            + f" {then}; nothing to re-run.")


def _too_large(session: Session, config: Config, rows: Sequence[Reattempt]) -> list[Problem]:
    """Copies refused because the package is larger than the destination takes (EFBIG): not
    the location's fault (smaller packages still go there), nor one that heals by itself: only
    a person lifts the limit. Told at the first refusal; resolved once the copy is made (its
    re-attempt row unsettled no more)."""
    problems = []
    for row in rows:
        if TOO_LARGE not in (row.last_error or ""):
            continue
        size = session.scalar(select(RawDataPackage.size).where(
            RawDataPackage.name == row.package))
        then = _after_a_person(config, row, "it is lifted", "copies it")
        problems.append(Problem(
            f"too_large:{row.stage}:{row.partition}", "too_large",
            f"{Stage(row.stage).label} {row.partition} refused: the destination takes no file "
            "this big" + (f" ({size} bytes)" if size else ""),
            f"{row.last_error}\nThe file system there cannot hold a file this large (FAT: "
            "4 GiB - 1 byte), or the user ccat-dt writes as there may not write one (its "
            "file-size limit: `ulimit -f`, an `fsize` line in /etc/security/limits.conf, "
            "systemd's LimitFSIZE). Nothing was kept there and nothing is deleted at the "
            "source; smaller packages still go there. Lift the limit, or move that location to "
            f"a file system that takes such files. {then} `ccat-dt why {row.package}` shows "
            "the stage."))
    return problems


def _in_the_way(config: Config, rows: Sequence[Reattempt]) -> list[Problem]:
    """Copies refused because a file sits where the package's directory should be at the
    destination: only a person can say what it is and move it. Not the location's fault (other
    packages still go there). Told at the first refusal; resolved once the copy is made (its
    re-attempt row unsettled no more)."""
    return [Problem(
        f"in_the_way:{row.stage}:{row.partition}", "in_the_way",
        f"{Stage(row.stage).label} {row.partition} refused: a file is where the package's "
        "directory should be",
        f"{row.last_error}\nNothing was written, and the file is left as it is. Find out what "
        "it is and move it away (a directory of that name is what the package needs). "
        + _after_a_person(config, row, "it is moved away", "copies the package")
        + f" `ccat-dt why {row.package}` shows the stage.")
        for row in rows if IN_THE_WAY in (row.last_error or "")]


def _deletions_denied(config: Config, rows: Sequence[Reattempt]) -> list[Problem]:
    """Purges that could not reach a copy to delete it: a directory on its way refused to
    ccat-dt's user. The file is kept (neither known gone nor known changed); only a person
    lets that user in again, and the next automatic purge then deletes it. Told at the first
    refusal; resolved once the purge succeeds (its re-attempt row unsettled no more)."""
    return [Problem(
        f"deletion_denied:{row.partition}", "deletion_denied",
        f"{Stage(row.stage).label} {row.partition}: a copy to delete cannot be reached "
        "(permission denied)",
        f"{row.last_error}\nNothing was deleted there and nothing is recorded deleted: the "
        "file stays, and the package's archive copies are untouched. Let the user ccat-dt runs "
        "(or logs in) as enter the directories on its way again (`ls -ld`, chmod/chown, or "
        "their ACL or security label). "
        + _after_a_person(config, row, "it can enter them", "deletes it")
        + f" `ccat-dt why {row.package}` shows the stage.")
        for row in rows if row.stage == Stage.PURGE and DELETION_DENIED in (row.last_error or "")]


# Attempts that found the source refused before a person is told: the second is sent from
# another verified copy where there is one (routing.unreadable_copies), and then succeeds.
REFUSED_ATTEMPTS = 2


def _refused(row: Reattempt) -> bool:
    return row.attempts >= REFUSED_ATTEMPTS and refused_source(row.last_error or "")


def _refused_sources(config: Config, rows: Sequence[Reattempt]) -> list[Problem]:
    """Work whose source file is refused to ccat-dt's user for lack of permission (a file an
    instrument wrote 0600 as another user, a directory it cannot enter, an ACL or SELinux
    refusal), again on the next attempt: no other copy could serve it. Only a person grants
    the permission; the next automatic attempt then reads it, nothing to re-run (past the
    re-attempt horizon, `ccat-dt retry`). Resolved once the work is done (its row unsettled
    no more)."""
    problems = []
    for row in rows:
        if not _refused(row) or _REREAD in (row.last_error or ""):
            continue  # a copy there re-read (its check): told as that copy's (_refused_copies)
        then = _after_a_person(config, row, "it is readable", "reads it")
        purge = row.stage == Stage.PURGE  # its re-read of an archive copy it relies on
        problems.append(Problem(
            f"source_refused:{row.stage}:{row.partition}", "source_refused",
            f"{Stage(row.stage).label} {row.partition}: "
            + ("an archive copy it relies on cannot be read" if purge else
               "its source file cannot be read") + " (permission denied)",
            f"{row.last_error}\nThe file was refused to ccat-dt's user on {row.attempts} "
            + ("attempts of the purge, which re-reads the archive copies a deletion relies on "
               "just before deleting: nothing relying on it was deleted. The copy is not taken "
               "for a bad one and its disk is not at fault" if purge else
               "attempts and no other verified copy could be sent instead. Nothing was written "
               "at the destination") + ", and the file is left as it is. Make it readable by "
            "that user (chmod/chown, or its ACL or security label: `ls -l`, `getfacl`, "
            f"`ls -Z`). {then} `ccat-dt why {row.package}` shows the stage."))
    return problems


# How replicas.reread says a copy was not read; and how long after a re-read refused to
# ccat-dt's user its copy is told (the scrub reads a copy it could not verify every hour,
# the longest unverified first); once told it stays told until the copy reads or is gone.
_REREAD = "not re-read: "
REFUSED_REREADS_WITHIN = timedelta(days=1)


def _refused_copies(session: Session, now: datetime) -> list[Problem]:
    """Copies whose re-read (their check, the scrub) was refused to ccat-dt's user for lack
    of permission (a file mode, an owner, a directory it cannot enter, an ACL), with nothing
    read fine since: not a disk to check, not a bad copy; only a person grants the permission.
    Told at the refusal (those refused within REFUSED_REREADS_WITHIN, by the finished_at
    index), and while told, until the copy reads intact or is gone (routing.refused_reread)."""
    recent = {copy_id for copy_id in session.scalars(select(Operation.copy_id).where(
        Operation.finished_at >= now - REFUSED_REREADS_WITHIN,
        Operation.operation_type == OperationType.VERIFICATION,
        Operation.status == OperationStatus.FAILED, Operation.copy_id.is_not(None),
        Operation.error.contains(READABLE_BY))) if copy_id is not None}
    told = {int(key.rsplit(":", 1)[1]) for key in session.scalars(
        select(Notification.problem_key).where(Notification.closed.is_(False),
                                               Notification.problem_key.like("copy_refused:%")))
        if key.rsplit(":", 1)[1].isdigit()}
    problems = []
    for copy_id in sorted(recent | told):
        copy = session.get(PhysicalCopy, copy_id)
        if not isinstance(copy, PackageCopy) or (read := refused_reread(session, copy)) is None \
                or read.finished_at is None:
            continue
        name = copy.package.name
        problems.append(Problem(
            f"copy_refused:{copy.id}", "copy_refused",
            f"copy of {name} at {copy.location.label} cannot be re-read (permission denied)",
            f"{(read.error or '').removeprefix(_REREAD)}\nIts re-read (its check, or the "
            f"scrub) at {_aware(read.finished_at):%Y-%m-%d %H:%M} UTC was refused to "
            "ccat-dt's user. The copy is not taken for a bad one (not quarantined, nothing "
            "written over it), its disk is not at fault (no location is marked), and no "
            "deletion relies on it until it is read intact. Make it readable by that user "
            "(chmod/chown, or its ACL or security label: `ls -l`, `getfacl`, `ls -Z`); the "
            "next re-read (the scrub's, hourly, the longest unverified first) then verifies "
            f"it, nothing to re-run. `ccat-dt why {name}` shows the copy."))
    return problems


def _refused_deletions(session: Session) -> list[Problem]:
    """Copies whose deletion found a file that is not the recorded copy (DELETION_FAILED):
    something other than ccat-dt wrote there, and only a person can say what it is."""
    problems = []
    for copy in session.scalars(select(PhysicalCopy).where(
            PhysicalCopy.status == CopyStatus.DELETION_FAILED).order_by(PhysicalCopy.id)):
        error = session.scalar(select(Operation.error).where(
            Operation.copy_id == copy.id, Operation.operation_type == OperationType.DELETION)
            .order_by(Operation.id.desc()).limit(1)) or "no error recorded"
        package = (copy.package if isinstance(copy, PackageCopy)
                   else copy.raw_data_file.package if isinstance(copy, RawDataFileCopy) else None)
        name = package.name if package is not None else "?"
        path = f"{copy.location.root}/{copy.relative_path}"
        problems.append(Problem(
            f"deletion_refused:{copy.id}", "deletion_refused",
            f"deletion refused at {copy.location.label}: {path} is not the recorded copy",
            f"{error}\nNothing was deleted. The file at {path} on {copy.location.label} is not "
            f"the bytes OpsDB recorded for {name} there: something other than ccat-dt wrote it. "
            f"The package's verified archive copies are untouched (`ccat-dt why {name}`). Find "
            "out what wrote it and take the file away from that path (or put the recorded "
            f"bytes back); then `ccat-dt purge --package {name}` records the copy deleted (or "
            "decides it afresh) and this notice is resolved."))
    return problems


def _changed_sources(session: Session) -> list[Problem]:
    """Source files changed after their package was built: the filed bytes are in the package,
    the new ones in no archive, and the file is never deleted; only a person can say what they
    are. Resolved once a purge finds the path empty or the filed bytes back (or `audit
    --repair` finds them back). Changed before the build, the package is quarantined instead:
    told above."""
    problems = []
    for copy in session.scalars(select(RawDataFileCopy).join(DataLocation).where(
            RawDataFileCopy.status == CopyStatus.CORRUPT,
            DataLocation.location_type == LocationType.SOURCE).order_by(RawDataFileCopy.id)):
        package = copy.raw_data_file.package
        if package is None or package.state in (PackageState.PLANNED, PackageState.FAILED):
            continue  # not built yet: its packaging quarantines it (told above)
        path = f"{copy.location.root}/{copy.relative_path}"
        error = session.scalar(select(Operation.error).where(
            Operation.copy_id == copy.id, Operation.status == OperationStatus.FAILED)
            .order_by(Operation.id.desc()).limit(1)) or "its bytes differ from the filed ones"
        problems.append(Problem(
            f"source_changed:{copy.id}", "source_changed",
            f"source file changed after its package was built, at {copy.location.label}: "
            f"{path}",
            f"{error}\nThe bytes filed for package {package.name} are in its tar, untouched; "
            f"the file now at {path} holds other bytes, which are in no archive, so ccat-dt "
            "never deletes it. Find out what rewrote it; keep the new bytes elsewhere if they "
            "matter (file them under a new name), then take the file away from that path (or "
            f"put the filed bytes back) and run `ccat-dt purge --package {package.name}`: the "
            "copy is decided afresh and this notice is resolved."))
    return problems


# How long one tick may spend starting deliveries: the rest waits for the next tick. Half of
# Dagster's sensor time-out (60 s, DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS), past which the daemon
# fails a tick while its code server may still be sending; in `drive`, the loop that launches
# runs waits for the tick.
TICK_BUDGET_S = 30.0

# The sending is claimed (a Lease row) for this long past each message started, by the
# claimer's clock: one tick's budget and a margin for the message in flight. A process killed
# while it holds it holds it no longer than that.
SEND_LEASE = "notifications"
SEND_LEASE_S = TICK_BUDGET_S + 60.0

_Update = tuple["_Row | None", "Problem | None", str, str, "str | None"]


def claim_lease(opsdb: OpsDB, name: str, holder: str, seconds: float) -> bool:
    """Whether `holder` now holds lease `name` for `seconds` more: a conditional UPDATE that
    takes it only if it is free, run out or already the holder's (renewed), or the row's
    INSERT for a lease never taken (another process inserting it at the same moment: False).
    One process at a time holds it, on SQLite and PostgreSQL alike (the UPDATE's row lock, or
    SQLite's write lock, orders two at once; the second sees the first's holder). A holder
    whose process is gone from this host is taken over at once (_gone); one on another host
    when its lease runs out, by this host's clock."""
    now = datetime.now(UTC)  # wall clocks, not a tick's (possibly given) `now`
    until = now + timedelta(seconds=seconds)
    try:
        with opsdb.session() as session:
            if session.execute(update(Lease).where(
                    Lease.name == name,
                    or_(Lease.holder == holder, Lease.until.is_(None), Lease.until < now))
                    .values(holder=holder, until=until)).rowcount:  # type: ignore[attr-defined]
                return True
            if (row := session.get(Lease, name)) is not None:
                # its holder's process gone from this host (killed mid-tick): taken over at
                # once, not when the lease runs out; unless another took it meanwhile
                return _gone(row.holder) and bool(session.execute(update(Lease).where(
                    Lease.name == name, Lease.holder == row.holder)
                    .values(holder=holder, until=until)).rowcount)  # type: ignore[attr-defined]
            session.add(Lease(name=name, holder=holder, until=until))
    except IntegrityError:
        return False
    return True


def lease_holder() -> str:
    """A new holder's name: this host (and pid namespace), this process, and a nonce (two
    calls in one process are two holders)."""
    return f"{this_host()}|{os.getpid()}|{os.urandom(6).hex()}"


def _gone(holder: str) -> bool:
    """Whether the process that holds a lease (lease_holder) provably runs no more: on this
    host and in this pid namespace, another process than this one, not running."""
    host, _, rest = holder.partition("|")
    pid = rest.partition("|")[0]
    return (host == this_host() and pid.isdigit() and int(pid) != os.getpid()
            and not process_running(int(pid)))


def release_lease(opsdb: OpsDB, name: str, holder: str) -> None:
    """Lease `name` free again, if `holder` still holds it (best effort: it runs out)."""
    try:
        with opsdb.session() as session:
            session.execute(update(Lease).where(Lease.name == name, Lease.holder == holder)
                            .values(until=None))
    except Exception as exc:  # noqa: BLE001 - it runs out by itself
        LOG.warning("cannot release the %s lease: %s", name, exc)


@dataclass
class Delivery:
    sent: list[str] = field(default_factory=list)  # "channel kind key", in order
    failed: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # past the tick's budget: next tick
    held: list[str] = field(default_factory=list)  # over a channel that refused for good
    busy: str = ""  # another process sends now (holds the lease): nothing done here


def reconcile(opsdb: OpsDB, problems: Sequence[Problem], targets: Sequence[Channel],
              now: datetime, *, remind_after: timedelta, prefix: str = "[ccat-dt]",
              log: Callable[[str], None] = LOG.warning) -> Delivery:
    """Send what the problems call for and record it. Never raises for a delivery failure.

    OpsDB is read, then every message is sent with no transaction open (a slow mail server
    never holds a database lock). Each message delivered is recorded at once, in a short
    transaction of its own: a tick cut off later (its process killed or stopped, OpsDB failing
    at its end) never has the messages it delivered sent again; only one in flight at the cut
    can be. Failures and the rest are written in one transaction at the end. Messages not
    started within TICK_BUDGET_S of the tick's start are left for the next tick. A channel
    held (refused for good with its settings unchanged, tried less than `remind_after` ago)
    is not tried: its messages are recorded as waiting, with why.

    One process at a time sends (the SEND_LEASE, claimed before OpsDB is read and renewed
    before each message): two ticks at once (the daemon's and the UI's "Test sensor", a
    drive's) never send one notice twice; the second does nothing (`busy`), and what is
    still due after the first is sent at the next tick. Before, both read the same rows and
    both sent every message due."""
    delivery = Delivery()
    if not targets:
        return delivery
    holder = lease_holder()
    try:
        claimed = claim_lease(opsdb, SEND_LEASE, holder, SEND_LEASE_S)
    except Exception as exc:  # noqa: BLE001 - OpsDB unreachable: nothing sent, next tick
        log(f"notifications not sent (tried again next tick): {exc}")
        delivery.busy = f"OpsDB: {exc}"
        return delivery
    if not claimed:
        delivery.busy = "another process is sending the notifications (tried again next tick)"
        return delivery
    try:
        _reconcile(opsdb, problems, targets, now, delivery, holder, remind_after=remind_after,
                   prefix=prefix, log=log)
    finally:
        release_lease(opsdb, SEND_LEASE, holder)
    return delivery


def _reconcile(opsdb: OpsDB, problems: Sequence[Problem], targets: Sequence[Channel],
               now: datetime, delivery: Delivery, holder: str, *, remind_after: timedelta,
               prefix: str, log: Callable[[str], None]) -> None:
    """reconcile's work, the lease held (renewed before each message: one lost, to another
    process after this one stalled past it, sends nothing more)."""
    deadline = time.monotonic() + TICK_BUDGET_S
    lost = False
    with opsdb.session() as session:
        open_rows = {(r.problem_key, r.channel): _Row.of(r) for r in session.scalars(
            select(Notification).where(Notification.closed.is_(False)))}
        before = {r.channel: (r.settings, r.reason, r.held, r.tried_at) for r in
                  session.scalars(select(UndeliverableChannel))}
        was_failing = set(session.scalars(select(FailingChannel.channel)))
    current = {p.key: p for p in problems}
    updates: list[_Update] = []
    broken: dict[str, str] = {}  # channel -> why it failed in this tick (not tried again)
    held: set[str] = set()
    refused: dict[str, tuple[str, bool]] = {}  # channel -> (who and why, nothing delivered)
    complete: set[str] = set()  # channels that delivered a message to every recipient
    for_now: dict[str, str] = {}  # channel -> its failure for now in this tick, as told
    due: set[str] = set()  # channels with a message to deliver in this tick

    def deliver(channel: Channel, subject: str, body: str) -> str | None:
        if channel.name in broken:
            return broken[channel.name]
        try:
            partly = channel.send(f"{prefix} {subject}", body)
        except Undeliverable as exc:
            refused[channel.name] = (str(exc), True)
            broken[channel.name] = f"undeliverable: {exc}"
            return broken[channel.name]
        except Exception as exc:  # noqa: BLE001 - any other failure: log, retry next tick
            broken[channel.name] = f"{type(exc).__name__}: {exc}"
            for_now[channel.name] = _failure(channel, exc)
            log(f"notification over {channel.name} failed (tried again later): {exc}")
            return broken[channel.name]
        if partly:
            refused[channel.name] = (partly, False)
        else:
            complete.add(channel.name)
        return None

    def tell(channel: Channel, row: _Row | None, told: Problem | None, what: str,
             subject: str, body: str, line: str) -> None:
        nonlocal lost
        due.add(channel.name)
        if channel.name not in held:
            if not lost and time.monotonic() < deadline:
                lost = not _renewed(opsdb, holder, log)
            if lost or time.monotonic() >= deadline:
                delivery.deferred.append(line)  # nothing recorded: still due next tick
                return
        error = deliver(channel, subject, body)
        if error is None:
            _record(opsdb, [(row, told, channel.name, what, None)], now)  # never sent twice
        else:
            updates.append((row, told, channel.name, what, error))
        (delivery.held if channel.name in held else delivery.failed if error
         else delivery.sent).append(line)

    for channel in targets:
        settings, reason, was_held, tried_at = before.get(channel.name, ("", "", False, now))
        if (was_held and settings == settings_digest(channel)
                and _aware(now) - _aware(tried_at) < remind_after):
            held.add(channel.name)
            broken[channel.name] = (
                f"held: {channel.name} refused for good ({reason}); tried again once its "
                f"settings change, or at {_aware(tried_at) + remind_after:%Y-%m-%d %H:%M} UTC")
        for problem in problems:
            if was_held and problem.key.startswith(f"undeliverable:{channel.name}:"):
                continue  # told over the other channels, not over the one that refused
            if problem.key == f"failing:{channel.name}":
                continue  # likewise: delivered over it, it is resolved
            row = open_rows.get((problem.key, channel.name))
            if row is None or row.sent_at is None:
                what = "problem"
                subject = problem.subject
            elif _aware(now) - _aware(row.sent_at) >= remind_after:
                what, subject = "reminder", f"REMINDER: {problem.subject}"
            else:
                if row.resolved_at is not None:  # came back before "resolved" was delivered
                    updates.append((row, problem, channel.name, "reopen", None))
                continue
            tell(channel, row, problem, what, subject, problem.detail,
                 f"{channel.name} {what} {problem.key}")
        for (key, name), row in open_rows.items():
            if name != channel.name or key in current:
                continue
            if row.sent_at is None:  # never told: nothing to take back
                updates.append((row, None, name, "drop", None))
                continue
            tell(channel, row, None, "resolved", f"RESOLVED: {row.subject}",
                 f"{row.subject}\nThis no longer needs anyone (first reported "
                 f"{_aware(row.opened_at):%Y-%m-%d %H:%M} UTC).", f"{name} resolved {key}")

    _record(opsdb, updates, now)
    _settle(opsdb, targets, before, refused, complete, now, log)
    _failing(opsdb, (was_failing - due) | (was_failing & (complete | set(refused))), for_now,
             now)


def _renewed(opsdb: OpsDB, holder: str, log: Callable[[str], None]) -> bool:
    """Whether this process still holds the sending, renewed for SEND_LEASE_S."""
    try:
        if claim_lease(opsdb, SEND_LEASE, holder, SEND_LEASE_S):
            return True
        log("notifications: the sending was taken over by another process (this one stalled "
            "past its lease); the rest is left to it")
    except Exception as exc:  # noqa: BLE001 - OpsDB failing: sent at the next tick
        log(f"notifications: cannot renew the sending's lease ({exc}); the rest next tick")
    return False


def _settle(opsdb: OpsDB, targets: Sequence[Channel],
            before: dict[str, tuple[str, str, bool, datetime]],
            refused: dict[str, tuple[str, bool]], complete: set[str], now: datetime,
            log: Callable[[str], None]) -> None:
    """Record which channels refused for good in this tick (logged when that is new: new
    settings or a new reply), and forget those that delivered to every recipient."""
    if not refused and not complete.intersection(before):
        return
    with opsdb.session() as session:
        for channel in targets:
            name = channel.name
            row = session.get(UndeliverableChannel, name)
            if name in refused:
                reason, held = refused[name]
                digest = settings_digest(channel)
                if row is None:  # or inserted by a tick that took the sending over from
                    # this one (stalled past its lease) at the same moment: kept, not failed
                    insert_absent(session, UndeliverableChannel, {
                        "channel": name, "settings": digest, "reason": reason, "held": held,
                        "since": now, "tried_at": now}, ("channel",))
                    row = session.get_one(UndeliverableChannel, name)
                if before.get(name, ("", ""))[:2] != (digest, reason):
                    row.since = now
                    log(f"notifications over {name} undeliverable: {reason} (refused for good; "
                        + ("nothing goes over it until its settings change, tried again once "
                           "per remind_after_hours" if held else "the other recipients get "
                           "each message") + "; `ccat-dt status` names it)")
                row.settings, row.reason, row.held, row.tried_at = digest, reason, held, now
            elif name in complete and row is not None:
                session.delete(row)


def _failing(opsdb: OpsDB, done: set[str], for_now: dict[str, str], now: datetime) -> None:
    """Record the channels that failed for now in this tick (since when, the last error), and
    forget those `done`: that delivered a message (to any recipient), refused for good (told as
    undeliverable instead) or had nothing to deliver (nothing waits over them)."""
    if not for_now and not done:
        return
    with opsdb.session() as session:
        for name in done:
            if (row := session.get(FailingChannel, name)) is not None:
                session.delete(row)
        session.flush()  # one that delivered, then failed in this tick: failing from now
        for name, error in for_now.items():
            insert_absent(session, FailingChannel, {  # kept if there: failing since then
                "channel": name, "error": error, "since": now, "failed_at": now}, ("channel",))
            row = session.get_one(FailingChannel, name)
            row.error, row.failed_at = error, now


def _record(opsdb: OpsDB, updates: Sequence[_Update], now: datetime) -> None:
    if not updates:
        return
    with opsdb.session() as session:
        for row, told, name, what, error in updates:
            record = (session.get_one(Notification, row.id) if row is not None else None)
            if record is None:
                assert told is not None
                record = Notification(problem_key=told.key, channel=name, kind=told.kind,
                                      subject=told.subject, detail=told.detail,
                                      opened_at=now, sends=0, closed=False)
                session.add(record)
            if what == "reopen":
                record.resolved_at = None
                continue
            if what == "drop":
                record.resolved_at, record.closed = now, True
                continue
            record.last_error = error
            if what == "resolved":
                record.resolved_at = record.resolved_at or now
                record.closed = error is None
            elif error is None:
                record.sent_at, record.sends = now, record.sends + 1
                record.resolved_at = None
                if told is not None:
                    record.detail = told.detail


@dataclass(frozen=True)
class _Row:
    id: int
    subject: str
    opened_at: datetime
    sent_at: datetime | None
    resolved_at: datetime | None

    @classmethod
    def of(cls, row: Notification) -> _Row:
        return cls(row.id, row.subject, row.opened_at, row.sent_at, row.resolved_at)


def open_problems(session: Session) -> list[Notification]:
    """Problems told (or being told) and not yet resolved, for `status`."""
    return list(session.scalars(select(Notification).where(
        Notification.closed.is_(False), Notification.resolved_at.is_(None))
        .order_by(Notification.id)))
