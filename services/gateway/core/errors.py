"""The gateway's client-facing error: an HTTP status and an OpenAI-format body naming the problem.

Messages may quote the client's input, which can hold text that is not Unicode (lone surrogates):
it is escaped here, so an error body can always be rendered."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None):
        message, param = _printable(message), _printable(param)
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.retry_after_s = param, code, retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")
