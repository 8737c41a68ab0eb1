"""A TCP relay in front of the test sshd, or any TCP service (PostgreSQL for the filing
service), that a test can break like a real WAN link: cut one connection once it has carried
some bytes (the link drops mid-transfer), reset every new connection while the link is down, or
cut() everything until restore(). ssh and rsync talk to the relay's port; the host key is the
sshd's, listed for the relay's port in a known_hosts file of its own."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from tests.sshd import SshServer


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    sent: int = 0  # bytes from the client (ssh, rsync) to the server


class Link:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.lock = threading.Lock()
        self.cut_after: int | None = None  # one-shot: cut the first connection past this
        self.down = False  # reset every new connection
        self.cuts = self.refused = 0
        self.connections: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self.lock:
                self.connections += [client, upstream]
            pair = _Pair(client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, pair, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: _Pair,
              upload: bool) -> None:
        try:
            while data := source.recv(65536):
                if upload and self._cut(pair, len(data)):
                    _reset(pair.client)
                    _reset(pair.upstream)
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def _cut(self, pair: _Pair, nbytes: int) -> bool:
        with self.lock:
            pair.sent += nbytes
            if self.cut_after is None or pair.sent <= self.cut_after:
                return False
            self.cut_after, self.cuts = None, self.cuts + 1
            return True

    def cut_all(self) -> int:
        """Drop every connection open now (the link fails under whatever uses it)."""
        with self.lock:
            connections, self.connections = self.connections, []
            self.cuts += 1 if connections else 0
        for connection in connections:
            _reset(connection)
        return len(connections)

    def through(self, sshd: SshServer, directory: Path) -> SshServer:
        """The same server, reached through this link."""
        known = Path(str(sshd.ssh.known_hosts_file)).read_text().splitlines()
        mine = directory / "known_hosts_via_link"
        mine.write_text("".join(line.replace(f"]:{sshd.port} ", f"]:{self.port} ") + "\n"
                                for line in known))
        return replace(sshd, port=self.port, ssh=replace(sshd.ssh, port=self.port,
                                                         known_hosts_file=str(mine)))

    def cut(self) -> None:
        """The link goes down: open connections are reset, new ones refused, until restore()."""
        with self.lock:
            self.down = True
            connections, self.connections = self.connections, []
        for connection in connections:
            _reset(connection)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.closed = True
        self.server.close()
        with self.lock:
            for connection in self.connections:
                _reset(connection)


def _reset(connection: socket.socket) -> None:
    """Close with RST, as a dropped link looks to the other end. Shut down first: a drive's
    run processes, forked from the test's, hold copies of the relay's sockets, and a close
    that is not the last one sends nothing (ssh then waited ~150 s for its keep-alives)."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        connection.close()
