"""One way to run a throw-away server for a test or a benchmark: start it with its output in a
log file, wait until it answers, stop it afterwards (SIGTERM, then SIGKILL).

Used by tests/sshd.py, tests/victoria.py, tests/browser.py and bench/remote.py; no pytest
here, so that the benchmarks can use it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

STOP_TIMEOUT_S = 10.0


class DidNotStart(RuntimeError):
    """The server exited or did not answer in time; the message says why (with its log)."""


def log_tail(log: Path, chars: int = 1000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


@contextmanager
def running(command: Sequence[str], *, log: Path, ready: Callable[[], str], timeout_s: float,
            name: str, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            group: bool = False, poll_s: float = 0.1) -> Iterator[subprocess.Popen[bytes]]:
    """`command` running, once `ready()` returned "" (it returns what is still wrong
    otherwise); raises DidNotStart if the process exits first or `timeout_s` passes.

    With `group`, the process gets a session of its own and the whole group is stopped
    (for servers that start children, such as dagster-webserver's code server)."""
    with open(log, "wb") as log_stream:
        try:
            process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL,
                                       stdout=log_stream, stderr=subprocess.STDOUT,
                                       env=dict(env) if env is not None else None, cwd=cwd,
                                       start_new_session=group)
        except OSError as exc:
            raise DidNotStart(f"{name}: cannot start {command[0]}: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        problem = "not answering yet"
        while True:
            if process.poll() is not None:
                raise DidNotStart(f"{name} exited with {process.returncode}: {log_tail(log)}")
            problem = ready()
            if not problem:
                break
            if time.monotonic() > deadline:
                raise DidNotStart(f"{name} not ready after {timeout_s:.0f} s: {problem}; "
                                  f"log: {log_tail(log)}")
            time.sleep(poll_s)
        yield process
    finally:
        stop(process, group=group)


def stop(process: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """SIGTERM (to its group with `group`), SIGKILL after STOP_TIMEOUT_S, then reap it."""
    def send(sig: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    if process.poll() is None or group:
        send(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
    if group:
        send(signal.SIGKILL)  # whatever of the group outlived its leader
    process.wait()
