"""Typed reads of JSON fields sent by the other side; every bad value is a ``ProtocolError``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from he_service.protocol.errors import ProtocolError

__all__ = ["is_finite_number", "object_field", "read_float", "read_int", "read_object", "read_str"]


def read_object(value: Any, where: str) -> Mapping[str, Any]:
    """Return ``value`` if it is a JSON object, else refuse it naming ``where``."""
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def object_field(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    """Return the JSON object ``doc[key]``."""
    return read_object(doc.get(key), f"{where}.{key}")


def read_int(doc: Mapping[str, Any], key: str, where: str, *, minimum: int = 0) -> int:
    """Return the integer ``doc[key]`` (not a bool, not a float) if it is at least ``minimum``."""
    value = doc.get(key)
    if type(value) is not int or value < minimum:
        raise ProtocolError(f"{where}.{key} must be an integer >= {minimum}, got {value!r:.40}")
    return value


def is_finite_number(value: Any) -> bool:
    """Tell whether ``value`` is a JSON number (not a bool) that a float holds finitely."""
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def read_float(doc: Mapping[str, Any], key: str, where: str) -> float | None:
    """Return the finite number ``doc[key]``, or None when it is absent or null."""
    value = doc.get(key)
    if value is None:
        return None
    if not is_finite_number(value):
        raise ProtocolError(f"{where}.{key} must be a finite number, got {value!r:.40}")
    return float(value)


def read_str(doc: Mapping[str, Any], key: str, where: str) -> str:
    """Return the string ``doc[key]``."""
    value = doc.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}.{key} must be a string, got {value!r:.40}")
    return value
