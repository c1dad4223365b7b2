"""Wire codec: typed messages <-> map-encoded msgpack bytes.

Every message on NATS and every value in Redis goes through `encode`/`decode`, so a malformed
payload surfaces as one exception type (`DecodeError`) with a readable reason, and a message that
cannot be carried (an integer beyond 64 bits, a string that is not Unicode) as `EncodeError`.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack
import pydantic

T = TypeVar("T", bound=pydantic.BaseModel)


class DecodeError(ValueError):
    """A payload that is not valid msgpack or does not match the expected schema."""


class EncodeError(ValueError):
    """A message msgpack cannot carry; the reason names the first offending value's kind."""


def encode(message: pydantic.BaseModel) -> bytes:
    """Map-encode a message (field names as keys) so services can deploy independently."""
    try:
        return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    except (OverflowError, UnicodeEncodeError, TypeError, ValueError) as exc:
        raise EncodeError(f"{type(message).__name__} cannot be encoded: {type(exc).__name__}: {exc}") from exc


def decode(kind: type[T], payload: bytes) -> T:
    """Decode and validate; raise DecodeError naming what is wrong."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"not msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise DecodeError(f"{kind.__name__}: expected a map, got {type(raw).__name__}")
    try:
        return kind.model_validate(raw)
    except pydantic.ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise DecodeError(f"{kind.__name__}: {fields}") from exc
