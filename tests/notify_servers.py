"""A real SMTP server (aiosmtpd) and a real HTTP receiver, each on a free loopback port, that
keep what they receive, or answer as told (a refusal, for good or for now)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Mailbox:
    port: int
    messages: list[Message] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)  # each message's, as accepted
    # What to answer instead of accepting: "MAIL", "DATA" or a recipient's address -> the
    # reply ("550 5.1.1 mailbox unavailable"); changed while the server runs.
    refuse: MutableMapping[str, str] = field(default_factory=dict)
    refusals: int = 0  # replies given from `refuse`
    auths: list[str] = field(default_factory=list)  # each AUTH command's mechanism, as received

    @property
    def subjects(self) -> list[str]:
        return [" ".join(str(m["Subject"]).split()) for m in self.messages]  # unfolded


class _Handler:
    """Keeps each message as it arrives; answers it `delay_s` later (a slow relay); refuses
    what `box.refuse` says."""

    def __init__(self, box: Mailbox, delay_s: float = 0.0) -> None:
        self.box = box
        self.delay_s = delay_s

    def _refused(self, what: str) -> str | None:
        reply = self.box.refuse.get(what)
        self.box.refusals += reply is not None
        return reply

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          options: list[str]) -> str:
        if reply := self._refused("MAIL"):
            return reply
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          options: list[str]) -> str:
        if reply := self._refused(address):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if reply := self._refused("DATA"):
            return reply
        self.box.messages.append(message_from_bytes(envelope.content))
        self.box.recipients.append(list(envelope.rcpt_tos))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return "250 Message accepted for delivery"


def certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (an IP address or a name), which is also its own
    CA: (certificate, key), PEM files in `directory`."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"relay {host}")])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.now(UTC)
    identifier = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(identifier, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                identifier), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "relay.pem", directory / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@contextmanager
def mail_server(delay_s: float = 0.0, refuse: dict[str, str] | None = None,
                password: str | None = None, tls: tuple[Path, Path] | None = None,
                implicit: bool = False) -> Iterator[Mailbox]:
    """An SMTP server on a free port that answers each message `delay_s` after taking it,
    refuses as `refuse` says, and with `password` requires AUTH (refused with 535 for any
    other password; over plain text: loopback only). With `tls` (certificate, key) it
    offers STARTTLS with that certificate and requires it before mail or AUTH; with
    `implicit` too, it speaks TLS from the first byte instead (SMTPS, as on port 465: no
    greeting before the client's TLS handshake). Every AUTH command it receives is kept in
    `auths`, whatever its answer."""
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP, AuthResult

    box = Mailbox(free_port(), refuse=dict(refuse or {}))

    class Server(SMTP):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if implicit:  # the whole session is TLS (aiosmtpd knows only STARTTLS's)
                self._auth_require_tls = False

        async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802
            box.auths.append(arg.split()[0] if arg else "")
            await super().smtp_AUTH(arg)

    class Listening(Controller):
        def factory(self) -> SMTP:
            return Server(self.handler, **self.SMTP_kwargs)

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     data: Any) -> AuthResult:
        ok = password is not None and data.password == password.encode()
        box.refusals += not ok
        return AuthResult(success=ok, handled=False)

    auth: dict[str, Any] = {} if password is None else {
        "authenticator": authenticate, "auth_required": True, "auth_require_tls": tls is not None}
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
        if implicit:  # TLS from the first byte
            auth.update(ssl_context=context)
        else:
            auth.update(tls_context=context, require_starttls=True)
    controller = Listening(_Handler(box, delay_s), hostname="127.0.0.1", port=box.port, **auth)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[Mailbox]:
    with mail_server() as box:
        yield box


@dataclass
class Receiver:
    port: int
    posts: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200  # what it answers (a post answered otherwise is not kept)
    location: str = ""  # with a 3xx status: where it redirects to
    gets: list[str] = field(default_factory=list)  # the paths asked for with GET (a web page
    # answers them: 200 and HTML, like a sign-in page or a proxy's)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/ccat"

    @property
    def texts(self) -> list[str]:
        return [str(p.get("text", "")) for p in self.posts]


@pytest.fixture
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver(0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if receiver.status == 200:
                receiver.posts.append(json.loads(body))
            self.send_response(receiver.status)
            if receiver.location:
                self.send_header("Location", receiver.location)
            self.end_headers()
            self.wfile.write(b"ok")

        def do_GET(self) -> None:  # noqa: N802
            receiver.gets.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>Sign in</body></html>")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
