"""JSON-schema checks for metadata read from files (checkpoint headers, architecture records).

Integers are strict (``true`` and ``3.0`` are not integers), and an error names the file and the
field, e.g. ``q.safetensors: field layers['features.2'].padding[0]: -1 is less than the minimum of 0``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator, validators

_TYPES = (Draft202012Validator.TYPE_CHECKER
          .redefine("integer", lambda _c, v: isinstance(v, int) and not isinstance(v, bool))
          .redefine("number", lambda _c, v: isinstance(v, (int, float)) and not isinstance(v, bool)))
_Strict = validators.extend(Draft202012Validator, type_checker=_TYPES)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

MODULE_PATH = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"  # dotted submodule name (Sequential children are digits)


def integer(lo: int, hi: int) -> dict[str, Any]:
    """Schema of an integer in ``[lo, hi]``."""
    return {"type": "integer", "minimum": lo, "maximum": hi}


def int_list(lo: int, hi: int, min_len: int, max_len: int) -> dict[str, Any]:
    """Schema of a list of ``min_len..max_len`` integers in ``[lo, hi]``."""
    return {"type": "array", "items": integer(lo, hi), "minItems": min_len, "maxItems": max_len}


def input_shape() -> dict[str, Any]:
    """Schema of a recorded model input shape without the batch (``[C, H, W]``, ``[T]``) or null."""
    return {"type": ["array", "null"], "items": integer(1, 1 << 20), "minItems": 1, "maxItems": 4}


def record(properties: dict[str, Any], optional: Iterable[str] = ()) -> dict[str, Any]:
    """Schema of an object with exactly these keys (those in ``optional`` may be absent)."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": [k for k in properties if k not in set(optional)]}


def field_name(root: str, path: Iterable[Any]) -> str:
    """``root`` followed by the JSON path: ``.key``, ``['odd.key']`` or ``[index]``."""
    out = root
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _IDENT.match(p):
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out


def check(value: Any, schema: dict[str, Any], where: str, root: str) -> None:
    """Raise ``ValueError("<where>: field <root...>: <problem>")`` if ``value`` breaks ``schema``."""
    # the first problem in document order (a container's own problem before its items')
    errors = sorted(_Strict(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        shown = err.message if len(err.message) <= 300 else err.message[:300] + "..."
        raise ValueError(f"{where}: field {field_name(root, err.absolute_path)}: {shown}")
