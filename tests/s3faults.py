"""A TCP relay in front of moto's S3 server that loses the answer to one request (a large one,
or one whose request line matches): the store carried it out, then the connection dropped
before the client heard so (the endpoint restarted, a load balancer reset the connection)."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

from tests.faults.link import _reset


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    sent: int = 0  # client -> server bytes since the server last began an answer
    head: bytes = b""  # and the first of them: the request line


class LostAnswerEndpoint:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        self.lose_answer_after: int | None = None  # one-shot: a request of more bytes
        self.lose_answer_to: bytes | None = None  # one-shot: a request line holding these
        self.lost = 0
        self.pairs: list[_Pair] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            pair = _Pair(client, upstream)
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _pump(self, pair: _Pair, upload: bool) -> None:
        source, sink = (pair.client, pair.upstream) if upload else (pair.upstream, pair.client)
        try:
            while data := source.recv(65536):
                with self.lock:
                    if upload:
                        pair.sent += len(data)
                        pair.head = (pair.head + data)[:512]
                    elif not data.startswith(b"HTTP/1.1 100"):  # not "100 Continue"
                        limit, line = self.lose_answer_after, pair.head.split(b"\r\n")[0]
                        big = limit is not None and pair.sent > limit
                        if big or (self.lose_answer_to is not None
                                   and self.lose_answer_to in line):
                            self.lose_answer_after = self.lose_answer_to = None
                            self.lost += 1
                            _reset(pair.client)
                            _reset(pair.upstream)
                            return
                        pair.sent, pair.head = 0, b""
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.server.close()
        with self.lock:
            for pair in self.pairs:
                _reset(pair.client)
                _reset(pair.upstream)
