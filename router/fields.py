"""Reading a JSON request body field by field, with types and ranges checked.

Every failure is a 400 whose `param` names the field and whose message says what was expected, so
a client sees "temperature must be <= 2, got 3.5" rather than a stack trace. A JSON null counts as
absent (some clients send every field).
"""
from __future__ import annotations

import math
from typing import Any

from pagedserve.router.errors import invalid

MISSING = object()


def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value), "a value")


class Fields:
    def __init__(self, body: dict):
        self.body = body

    def raw(self, name: str, default: Any = None) -> Any:
        value = self.body.get(name)
        return default if value is None else value

    def given(self, name: str) -> bool:
        return self.body.get(name) is not None

    def integer(self, name: str, default: int | None = None, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        value = self.raw(name)
        if value is None:
            return default
        # JSON clients send 3.0 for 3 sometimes; True is an int in Python but never a count.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(name, f"'{name}' must be an integer, got {type_name(value)}.")
        check_range(name, value, minimum, maximum)
        return value

    def number(self, name: str, default: float | None = None, minimum: float | None = None,
               maximum: float | None = None, above: float | None = None) -> float | None:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(name, f"'{name}' must be a number, got {type_name(value)}.")
        if not math.isfinite(value):  # Python's JSON reads NaN and Infinity; no sampler wants them
            raise invalid(name, f"'{name}' must be a finite number, got {value}.")
        if above is not None and not value > above:
            raise invalid(name, f"'{name}' must be greater than {above:g}, got {value:g}.")
        check_range(name, value, minimum, maximum)
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(name, f"'{name}' must be a boolean, got {type_name(value)}.")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise invalid(name, f"'{name}' must be a string, got {type_name(value)}.")
        return value

    def strings(self, name: str) -> list[str]:
        """A string or an array of strings (as `stop` is)."""
        value = self.raw(name, [])
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise invalid(name, f"'{name}' must be a string or an array of strings.")
        return values

    def integers(self, name: str, minimum: int, limit: int) -> list[int]:
        """An array of integers in [minimum, limit)."""
        value = self.raw(name, [])
        if not isinstance(value, list) or not all(is_int(v) for v in value):
            raise invalid(name, f"'{name}' must be an array of integers.")
        for v in value:
            if not minimum <= v < limit:
                raise invalid(name, f"'{name}' holds {v}, outside [{minimum}, {limit}).")
        return value

    def object(self, name: str) -> dict:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise invalid(name, f"'{name}' must be an object, got {type_name(value)}.")
        return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise invalid(name, f"'{name}' must be >= {minimum:g}, got {value:g}.")
    if maximum is not None and value > maximum:
        raise invalid(name, f"'{name}' must be <= {maximum:g}, got {value:g}.")
