"""A sensor's cursor as the sensor reads it. An operator can set any text there (the UI's
sensor page: "Edit cursor", "Clear cursor"; the daemon and `ccat-dt drive` then tick from
it): text the sensor cannot read is read as a cleared cursor, with a warning in the tick's
log, instead of failing every tick until a person clears it. Every sensor's cursor is made
so that a cleared one launches nothing twice (run keys, the runs in flight)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from dagster import SensorEvaluationContext

T = TypeVar("T")


def read_cursor(context: SensorEvaluationContext, parse: Callable[[str], T], cleared: T,
                instead: str = "starts from the beginning, as from a cleared cursor") -> T:
    """`parse` of the cursor; `cleared` for none, or for one `parse` raises on (ValueError,
    TypeError, KeyError, AttributeError, OverflowError), saying so and what the sensor does
    `instead`."""
    if not context.cursor:
        return cleared
    try:
        return parse(context.cursor)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        context.log.warning(f"the cursor {context.cursor[:200]!r} could not be read "
                            f"({type(exc).__name__}: {exc}): the sensor {instead}")
        return cleared


def json_object(text: str) -> dict[str, Any]:
    """A JSON object, else ValueError (a number or a list is JSON too)."""
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON object was expected, not {type(value).__name__}")
    return value


def number(value: object) -> float:
    """A JSON number (not a string, not a boolean), else TypeError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a number was expected, not {value!r}")
    return float(value)
