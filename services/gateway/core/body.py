"""Safe JSON for request bodies: strict numbers, valid Unicode, bounded nesting.

`load_body` turns hostile bytes into a 400 naming the problem: NaN or infinite numbers, lone
surrogates (text that cannot be UTF-8), nesting deeper than `MAX_DEPTH`, or anything not JSON.
Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any

from services.gateway.core.errors import ApiError

MAX_DEPTH = 32  # deeper than any OpenAI request (tool schemas included) needs


class _NotFinite(ValueError):
    pass


def _constant(name: str) -> float:
    raise _NotFinite(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(f"{text} is out of range for a number")
    return value


def load_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; raise ApiError(400) naming what is wrong."""
    try:
        data = json.loads(body, parse_constant=_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json")
    except _NotFinite as exc:
        raise ApiError(400, f"request body has a non-finite number: {exc}", code="invalid_json")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    _check_tree(data)
    return data


def _check_tree(data: dict[str, Any]) -> None:
    """Walk the tree without recursion: bounded depth, every string and key valid Unicode."""
    pending: list[tuple[str, Any, int]] = [("", data, 1)]
    while pending:
        path, value, depth = pending.pop()
        if isinstance(value, str):
            _check_text(path, value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep (at {path})",
                               code="invalid_json")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                child = f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]"
                child = child.removeprefix(".")
                if isinstance(key, str):
                    _check_text(f"{child} (key)", key)
                pending.append((child, item, depth + 1))


def _check_text(path: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{path or 'body'}: text is not valid Unicode ({exc.reason} at position {exc.start})",
                       param=path or None, code="invalid_value") from None
