"""Canonical JSON: the one byte encoding that everything hashed in JSON goes through.

Sorted keys, no whitespace, UTF-8, no NaN/Infinity (floats that need exact bits are
stored as hex strings by the caller). Two equal values always encode to equal bytes.
"""

from __future__ import annotations

import json
from typing import Any

from torch_integrity.errors import MalformedFileError


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` canonically.

    Args:
        value: JSON-compatible data (dict keys must be strings).

    Returns:
        UTF-8 bytes with sorted keys and no insignificant whitespace.

    Example:
        >>> canonical_json({"b": 1, "a": [True, None]})
        b'{"a":[true,null],"b":1}'
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise MalformedFileError(f"duplicate JSON key {key!r}")
        result[key] = item
    return result


def _refuse_constant(name: str) -> Any:
    raise MalformedFileError(f"non-standard JSON constant {name}")


def strict_loads(data: bytes | bytearray | str, *, what: str = "JSON") -> Any:
    """Parse JSON, refusing duplicate keys, NaN/Infinity and invalid UTF-8.

    Args:
        data: the encoded document.
        what: a description used in error messages.

    Returns:
        The decoded value.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as exc:
        raise MalformedFileError(f"{what} is not valid UTF-8: {exc}") from None
    try:
        return json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except MalformedFileError as exc:
        raise MalformedFileError(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise MalformedFileError(f"{what} is not valid JSON: {exc}") from None
