"""Acting at a fault's moment from a test: once a condition holds (a transfer has landed some
bytes), and bounding how long an action may wait on a fault (a silent network path)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def when(condition: Callable[[], bool], action: Callable[[], None],
         timeout_s: float = 60.0) -> threading.Thread:
    """Run `action` once `condition` holds (polled), in a thread."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def size_of(path: Path) -> int:
    """The file's size, 0 while it does not exist (yet, or any more)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def outcome_within(action: Callable[[], Any], what: str, bound_s: float) -> Any:
    """What `action` returned or raised; a test failure if it still runs after `bound_s`."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(action())
        except BaseException as exc:  # noqa: BLE001 - what the caller sees, kept to look at
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=bound_s)
    assert not thread.is_alive(), f"{what}: still waiting {bound_s:g} s after the fault"
    return outcome[0]
